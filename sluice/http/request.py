"""The parsed incoming HTTP request handed to the pipeline."""

from __future__ import annotations


class HttpRequest:
    """One request off the wire. Header names are lower-cased bytes; the body is fully read."""

    __slots__ = ("body", "client_ip", "headers", "http11", "keep_alive", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        http11: bool,
        client_ip: str,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http11 = http11
        self.client_ip = client_ip

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None
