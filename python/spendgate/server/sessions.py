"""Operator page sign-ins: server-side sessions, each bound to the admin token it was made from.

    sessions = Sessions(ttl_ms=..., max_sessions=...)
    session_id = sessions.create(token)             # after the token was checked to be an admin token
    sessions.valid(session_id, tokens)              # False once expired, ended, evicted, or its token is gone
    sessions.end(session_id)                        # sign-out

The browser holds only a random id (256 bits from `secrets`), never the token. The store keys sessions by the id's
SHA-256, so a lookup's timing says nothing about the ids that exist, and a memory dump holds no usable cookie. A
session keeps the SHA-256 of its token, not the token: it is valid only while that token is still one of the
configured admin tokens, so removing (rotating) a token ends the sessions made from it. The store lives in memory: a
restart signs everyone out, which is also what a token rotation through a restart needs.

Lifetimes run on the monotonic clock: a wall-clock step neither ends every session nor makes one outlive its TTL.
At most `max_sessions` live at once; a sign-in past that ends the oldest session (a forgotten browser), so that no
one is ever refused a sign-in.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from spendgate.server.security import Tokens

log = logging.getLogger("spendgate.http")

SESSION_ID_BYTES: Final[int] = 32
# Longest cookie value looked up; an id from create() is 43 characters (urlsafe base64 of 32 bytes).
MAX_SESSION_ID_CHARS: Final[int] = 128


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


@dataclass(frozen=True, slots=True)
class Session:
    token_digest: bytes
    expires_at_s: float  # on the monotonic clock


class Sessions:
    def __init__(self, *, ttl_ms: int, max_sessions: int, clock: Callable[[], float] = time.monotonic) -> None:
        assert ttl_ms > 0 and max_sessions > 0, (ttl_ms, max_sessions)
        self.ttl_ms = ttl_ms
        self.max_sessions = max_sessions
        self._clock = clock
        self._by_id_digest: dict[bytes, Session] = {}  # insertion order: oldest first

    def __len__(self) -> int:
        return len(self._by_id_digest)

    def create(self, token: bytes) -> str:
        """A new session for `token` (already known to be an admin token); returns the id for the cookie."""
        now = self._clock()
        if len(self._by_id_digest) >= self.max_sessions:
            self._drop_expired(now)
        while len(self._by_id_digest) >= self.max_sessions:
            del self._by_id_digest[next(iter(self._by_id_digest))]
            log.warning(
                "operator page: %d sessions are open (http_max_sessions); the oldest one was ended", self.max_sessions
            )
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        self._by_id_digest[_digest(session_id.encode("ascii"))] = Session(
            token_digest=_digest(token), expires_at_s=now + self.ttl_ms / 1000
        )
        return session_id

    def valid(self, session_id: str | None, tokens: Tokens) -> bool:
        """Whether the cookie value names a live session whose token is still an admin token."""
        key = self._key(session_id)
        session = None if key is None else self._by_id_digest.get(key)
        if key is None or session is None:
            return False
        if self._clock() >= session.expires_at_s or session.token_digest not in _admin_digests(tokens):
            del self._by_id_digest[key]  # for good: a token configured again later does not revive it
            return False
        return True

    def end(self, session_id: str | None) -> bool:
        """Sign-out: True when there was such a session."""
        key = self._key(session_id)
        return key is not None and self._by_id_digest.pop(key, None) is not None

    def _key(self, session_id: str | None) -> bytes | None:
        if not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
            return None
        return _digest(session_id.encode("utf-8", "replace"))

    def _drop_expired(self, now: float) -> None:
        for key in [key for key, session in self._by_id_digest.items() if now >= session.expires_at_s]:
            del self._by_id_digest[key]


def _admin_digests(tokens: Tokens) -> frozenset[bytes]:
    return frozenset(_digest(token) for token in tokens.admin)
