"""The audit journal's line format: one record per line, checksummed so a replay can tell a damaged line.

Each line is `<crc32 of the JSON, 8 lowercase hex digits> <JSON array>\\n`; records come back as tuples. A line
whose checksum does not match, that does not parse or that lacks its newline decodes to None: what that means
(a torn last line or damage) is for the reader to say (journal_files.py), the Journal counts it (journal.py).
"""

from __future__ import annotations

import zlib

import orjson

from sluice.audit.record import Record


def encode_line(record: Record) -> bytes:
    """One journal line; raises TypeError (orjson.JSONEncodeError) for a value JSON cannot hold."""
    payload = orjson.dumps(record)
    return b"%08x %b\n" % (zlib.crc32(payload), payload)


def decode_line(line: bytes) -> Record | None:
    """The record on one line, or None when the line is corrupt."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    payload = line[9:-1]
    if line[:8] != b"%08x" % zlib.crc32(payload):
        return None
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return tuple(value) if isinstance(value, list) else None
