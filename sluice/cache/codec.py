"""The byte format of a stored cache entry (docs/cache-store.md): compact, fast, and readable from its head.

Layout (little-endian):

    header   magic "SC", version 1, flags (bit 0: has a vector), created (f64), meta length (u32),
             probe length (u32), vector dimension (u32)                               -- 24 bytes
    vector   dimension × float32
    meta     orjson {"id", "scope", "tenant", "model", "embedder"}
    probe    UTF-8
    body     the rest

Everything the vector index and a purge need (header, vector, meta) comes first and is small, so a
replica rebuilding its index or a purge scanning the entries reads only a key's first few KiB
(`GETRANGE`) instead of every answer body. Never pickle: the bytes come from a shared Redis, and a
format of our own lets entries written by an older or newer replica be recognised (the version byte)
and treated as misses rather than crashing a request.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import orjson

from sluice.cache.types import CacheEntry, Vector

_HEADER = struct.Struct("<2sBBdIII")
HEADER_SIZE = _HEADER.size
_MAGIC = b"SC"
_VERSION = 1
_HAS_VECTOR = 1
HEAD_GUESS = 4096  # bytes fetched first when only the head is wanted; enough for 768 dimensions and long ids


class CodecError(ValueError):
    """The bytes are not an entry of this format (corrupt, truncated, or written by another version)."""


@dataclass(frozen=True, slots=True)
class EntryHead:
    """An entry without its probe and body: what the index and purges need."""

    id: str
    scope: str
    tenant: str
    model: str
    embedder: str
    vector: Vector | None
    created: float


def encode(entry: CacheEntry) -> bytes:
    meta = orjson.dumps(
        {"id": entry.id, "scope": entry.scope, "tenant": entry.tenant, "model": entry.model, "embedder": entry.embedder}
    )
    probe = entry.probe.encode()
    if entry.vector is None:
        flags, dim, vector = 0, 0, b""
    else:
        flags, dim = _HAS_VECTOR, int(entry.vector.shape[0])
        vector = entry.vector.astype("<f4", copy=False).tobytes()
    header = _HEADER.pack(_MAGIC, _VERSION, flags, entry.created, len(meta), len(probe), dim)
    return b"".join((header, vector, meta, probe, entry.body))


def vector_bytes(vector: Vector | None) -> bytes:
    """The vector as it travels in sync events (empty when there is none)."""
    return b"" if vector is None else vector.astype("<f4", copy=False).tobytes()


def vector_from_bytes(data: bytes) -> Vector | None:
    if not data:
        return None
    if len(data) % 4:
        raise CodecError("a vector's byte length is not a multiple of 4")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def head_size(data: bytes) -> int:
    """How many leading bytes `decode_head` needs, read from a prefix of at least HEADER_SIZE bytes."""
    _, _, dim, meta_len, _ = _parse_header(data)
    return HEADER_SIZE + 4 * dim + meta_len


def decode_head(data: bytes) -> EntryHead:
    """The head of an entry from its bytes or a prefix of at least `head_size` bytes."""
    flags, created, dim, meta_len, _ = _parse_header(data)
    vector_end = HEADER_SIZE + 4 * dim
    meta_end = vector_end + meta_len
    if len(data) < meta_end:
        raise CodecError("truncated entry head")
    meta = _meta(data[vector_end:meta_end])
    vector = np.frombuffer(data, dtype="<f4", count=dim, offset=HEADER_SIZE).astype(np.float32) if flags else None
    return EntryHead(meta["id"], meta["scope"], meta["tenant"], meta["model"], meta["embedder"], vector, created)


def decode(data: bytes) -> CacheEntry:
    flags, created, dim, meta_len, probe_len = _parse_header(data)
    vector_end = HEADER_SIZE + 4 * dim
    meta_end = vector_end + meta_len
    probe_end = meta_end + probe_len
    if len(data) < probe_end:
        raise CodecError("truncated entry")
    meta = _meta(data[vector_end:meta_end])
    try:
        probe = data[meta_end:probe_end].decode()
    except UnicodeDecodeError as exc:
        raise CodecError("the probe is not UTF-8") from exc
    vector = np.frombuffer(data, dtype="<f4", count=dim, offset=HEADER_SIZE).astype(np.float32) if flags else None
    return CacheEntry(
        id=meta["id"],
        scope=meta["scope"],
        tenant=meta["tenant"],
        model=meta["model"],
        probe=probe,
        vector=vector,
        embedder=meta["embedder"],
        body=data[probe_end:],
        created=created,
    )


def _parse_header(data: bytes) -> tuple[int, float, int, int, int]:
    if len(data) < HEADER_SIZE:
        raise CodecError("shorter than an entry header")
    magic, version, flags, created, meta_len, probe_len, dim = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise CodecError(f"not a version {_VERSION} cache entry")
    if not flags & _HAS_VECTOR and dim:
        raise CodecError("a vector dimension without a vector")
    return flags & _HAS_VECTOR, created, dim, meta_len, probe_len


def _meta(data: bytes) -> dict[str, str]:
    try:
        meta = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError("the metadata is not JSON") from exc
    keys = ("id", "scope", "tenant", "model", "embedder")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(key), str) for key in keys):
        raise CodecError("the metadata lacks a field")
    return meta
