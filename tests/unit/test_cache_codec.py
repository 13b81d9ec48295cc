"""The cache entry's byte format: round trips, the head alone, and bytes that are not an entry."""

from __future__ import annotations

import numpy as np
import pytest

from sluice.cache.codec import (
    HEAD_GUESS,
    HEADER_SIZE,
    CodecError,
    decode,
    decode_head,
    encode,
    head_size,
    vector_bytes,
    vector_from_bytes,
)
from sluice.cache.types import CacheEntry


def entry(vector: np.ndarray | None = None, body: bytes = b'{"choices": []}', probe: str = "what is é?") -> CacheEntry:
    return CacheEntry(
        id="ab" * 32, scope="cd" * 32, tenant="acme", model="llama-lora", probe=probe, vector=vector,
        embedder="minilm", body=body, created=1_700_000_123.456789,
    )  # fmt: skip


def test_an_entry_with_a_vector_round_trips() -> None:
    vector = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    original = entry(vector)
    decoded = decode(encode(original))
    assert decoded.vector is not None and decoded.vector.dtype == np.float32
    assert np.array_equal(decoded.vector, vector)
    assert decoded == CacheEntry(**{**_fields(original), "vector": decoded.vector})
    decoded.vector[0] = 5.0  # a decoded vector is its own, writable copy


def test_an_entry_without_a_vector_and_with_an_empty_body_round_trips() -> None:
    original = entry(None, body=b"", probe="")
    assert decode(encode(original)) == original


def test_the_head_is_readable_from_a_prefix_of_the_bytes() -> None:
    vector = np.arange(384, dtype=np.float32)
    data = encode(entry(vector, body=b"x" * 100_000))
    prefix = data[:HEAD_GUESS]
    assert head_size(prefix) <= len(prefix)
    head = decode_head(prefix)
    assert (head.id, head.tenant, head.model, head.embedder) == ("ab" * 32, "acme", "llama-lora", "minilm")
    assert head.created == 1_700_000_123.456789
    assert head.vector is not None and np.array_equal(head.vector, vector)
    with pytest.raises(CodecError, match="truncated"):
        decode_head(data[: head_size(data) - 1])


def test_a_long_head_says_how_much_it_needs() -> None:
    data = encode(entry(np.zeros(2048, np.float32)))
    assert head_size(data[:HEADER_SIZE]) == HEADER_SIZE + 4 * 2048 + head_size(encode(entry())) - HEADER_SIZE
    assert decode_head(data[: head_size(data)]).vector is not None


@pytest.mark.parametrize(
    "data",
    [b"", b"SC", b"XX" + bytes(30), b"SC\x02" + bytes(30), encode(entry())[:-20], b"SC\x01\x00" + bytes(20) + b"{"],
)
def test_bytes_that_are_not_an_entry_raise_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


def test_vectors_travel_as_little_endian_float32() -> None:
    vector = np.array([1.5, -2.0, 0.25], np.float32)
    assert vector_bytes(vector) == b"\x00\x00\xc0?\x00\x00\x00\xc0\x00\x00\x80>"
    restored = vector_from_bytes(vector_bytes(vector))
    assert restored is not None and np.array_equal(restored, vector)
    assert vector_bytes(None) == b"" and vector_from_bytes(b"") is None
    with pytest.raises(CodecError):
        vector_from_bytes(b"abc")


def _fields(value: CacheEntry) -> dict[str, object]:
    return {name: getattr(value, name) for name in CacheEntry.__dataclass_fields__}
