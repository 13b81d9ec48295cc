"""JSON logs (one object per line, ready for Loki) or readable text, configured once at start-up.

Extra fields passed with `extra={...}` become top-level keys. Secrets never reach here: the request
path logs key names, not keys.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import orjson

from sluice.config import LoggingConfig

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
        )
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname.lower():7} {record.name}: "
        line += record.getMessage() + (f" {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(settings: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())


def access_log_enabled(settings: LoggingConfig) -> bool:
    return settings.access_log and settings.level in ("debug", "info")


class AccessLog:
    """One line per request, formatted like the JSON (or text) logs but written in batches.

    Going through `logging` costs more than the rest of the request path together (a record, a
    formatter, a locked handler and a flush per request); this builds the line with orjson and writes
    what accumulated every `interval` seconds or every 64 KiB, in one system call. Lines are lost only
    if the process dies within that interval.
    """

    FLUSH_BYTES = 64 * 1024

    def __init__(self, settings: LoggingConfig, stream: Any = None, interval: float = 0.1) -> None:
        self._json = settings.format == "json"
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._lines: list[bytes] = []
        self._size = 0
        self._scheduled = False
        self._second = -1
        self._stamp = ""

    def write(self, fields: dict[str, Any]) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        ts = f"{self._stamp}.{int((now - second) * 1000):03d}Z"
        if self._json:
            line = orjson.dumps(
                {"ts": ts, "level": "info", "logger": "sluice.access", "msg": "request", **fields},
                option=orjson.OPT_APPEND_NEWLINE,
            )
        else:
            extras = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            line = f"{ts[11:19]} info    sluice.access: request {extras}\n".encode()
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        stream = self._stream
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            stream.flush()  # keep ordering with lines written through `logging`
            buffer.write(data)
            buffer.flush()
        else:
            stream.write(data.decode())
            stream.flush()
