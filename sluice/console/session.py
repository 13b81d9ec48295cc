"""Console sessions: signed tokens in the `sluice_console` cookie, and the admin-key check at login.

A token is `base64url(expiry ":" id) "." base64url(HMAC-SHA256(secret, expiry ":" id))`, the expiry in
whole Unix seconds and the id 16 random bytes in hex. The secret is derived from `auth.admin_key`
(HMAC(admin_key, "sluice console session")), so every worker and replica accepts a token any of them
issued, and rotating the admin key ends every session. The token alone says nothing of logging out:
the id is what sluice/console/logouts.py remembers until the expiry, so a logged-out session is refused
everywhere, not only forgotten by the browser.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = b"sluice_console"
CONSOLE_HEADER = b"x-sluice-console"  # must be "1": a cross-site form cannot set a header (CSRF)
SECRET_LABEL = b"sluice console session"
MAX_TOKEN_BYTES = 256
PAYLOAD = re.compile(rb"([0-9]{1,12}):([0-9a-f]{32})")


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    expires: int  # Unix seconds


class ConsoleSessions:
    def __init__(self, admin_key: str, ttl: int, clock: Callable[[], float] = time.time) -> None:
        key = admin_key.encode()
        self._admin_digest = hashlib.sha256(key).digest()
        self._secret = hmac.new(key, SECRET_LABEL, hashlib.sha256).digest()
        self.ttl = ttl
        self._clock = clock

    def accepts_key(self, candidate: bytes) -> bool:
        """Whether `candidate` is the admin key (digests compared in constant time)."""
        return hmac.compare_digest(self._admin_digest, hashlib.sha256(candidate).digest())

    def issue(self) -> str:
        payload = f"{int(self._clock()) + self.ttl}:{secrets.token_hex(16)}".encode()
        return f"{_encode(payload)}.{_encode(self._sign(payload))}"

    def verify(self, token: bytes) -> Session | None:
        """The session of `token` if it was issued under this admin key and has not expired (logging out is
        checked apart: sluice/console/logouts.py)."""
        if len(token) > MAX_TOKEN_BYTES:
            return None
        encoded_payload, dot, encoded_mac = token.partition(b".")
        if not dot:
            return None
        try:
            payload, mac = _decode(encoded_payload), _decode(encoded_mac)
        except (binascii.Error, ValueError):
            return None
        matched = PAYLOAD.fullmatch(payload)
        if not hmac.compare_digest(self._sign(payload), mac) or matched is None:
            return None
        expires = int(matched.group(1))
        if self._clock() >= expires:
            return None
        return Session(matched.group(2).decode(), expires)

    def cookie(self, token: str) -> str:
        """The `Set-Cookie` value that keeps `token` for the session's lifetime."""
        return f"{COOKIE.decode()}={token}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={self.ttl}"

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()


CLEARED_COOKIE = f"{COOKIE.decode()}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"


def session_cookie(header: bytes | None) -> bytes | None:
    """The `sluice_console` value in a `Cookie` header (`a=1; b=2`), or None."""
    if header is None or COOKIE not in header:
        return None
    for part in header.split(b";"):
        name, equals, value = part.partition(b"=")
        if equals and name.strip() == COOKIE:
            return value.strip().strip(b'"')
    return None


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode(text: bytes) -> bytes:
    """Strict base64url without padding: one spelling per value (the decoder alone would skip stray bytes)."""
    raw = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    if not text or _encode(raw).encode() != text:
        raise ValueError("not canonical base64url")
    return raw
