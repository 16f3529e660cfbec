"""Per-customer virtual API keys for the HTTP proxy, kept hashed in the engine's LMDB.

    keys = VirtualKeys(engine, waiter.wait)          # loads the durable set once
    key, record = await keys.create("cus_1")         # Admin.CreateVirtualKey: the key is returned this once
    keys.customer_of(key)                            # the proxy's lookup: one hash, one dict read

An app gives the key to its SDK as its API key; the proxy maps it to the customer and sends the provider key of
proxy_openai_api_key_file / proxy_anthropic_api_key_file upstream instead, so the app never holds the provider key.

Only the SHA-256 of a key is stored, never the key: a key is 256 random bits, so a fast hash is as good as a slow one
(there is nothing to brute-force), and a lookup costs one hash. The set is one engine document (DOCUMENT_NAME,
Engine.put_document), written in ticket order and acknowledged once durable, so it is in every backup and survives
kill -9; the lookup cache changes only once the write is durable. Changes go through the Admin RPCs of the running
sidecar (`spendgate key create|list|revoke`), the one process that owns the data dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from spendgate._core import EngineError

DOCUMENT_NAME: Final[str] = "proxy_virtual_keys"
KEY_PREFIX: Final[str] = "sgk_"
KEY_RANDOM_BYTES: Final[int] = 32
# A record is about 150 bytes of JSON and the document at most 4 MiB (the engine's MAX_DOCUMENT_BYTES).
MAX_KEYS: Final[int] = 20_000
DOCUMENT_VERSION: Final[int] = 1
# A key's id: the first hex digits of its hash (shown by `key list`, used by `key revoke`).
KEY_ID_HEX_DIGITS: Final[int] = 12
MAX_CUSTOMER_ID_BYTES: Final[int] = 128


class DocumentEngine(Protocol):
    def document(self, name: str) -> str | None: ...

    def put_document(self, name: str, body: str) -> int: ...

    def balance(self, customer_id: str) -> Any: ...


@dataclasses.dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    sha256: str
    customer_id: str
    created_ms: int


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(credential: str) -> bool:
    return credential.startswith(KEY_PREFIX)


class VirtualKeys:
    """The key set of one engine. Create it on the event loop that serves the proxy and the Admin service."""

    def __init__(self, engine: DocumentEngine, wait_durable: Callable[[int], Awaitable[None]]) -> None:
        self._engine = engine
        self._wait = wait_durable
        self._records = _parse(engine.document(DOCUMENT_NAME))
        self._by_hash = {record.sha256: record for record in self._records}

    def customer_of(self, key: str) -> str | None:
        """The customer a key belongs to, or None (unknown or revoked)."""
        hashed = digest(key)
        record = self._by_hash.get(hashed)
        # The dict matched the whole digest; compare once more in constant time, as for any secret.
        return record.customer_id if record is not None and hmac.compare_digest(record.sha256, hashed) else None

    def records(self, customer_id: str = "") -> list[KeyRecord]:
        return [r for r in self._records if not customer_id or r.customer_id == customer_id]

    async def create(self, customer_id: str) -> tuple[str, KeyRecord]:
        """A new key for a customer that has a budget: (the key, shown this once; its record)."""
        if not customer_id or len(customer_id.encode()) > MAX_CUSTOMER_ID_BYTES:
            raise EngineError(
                "invalid_argument", f"a customer id is 1..={MAX_CUSTOMER_ID_BYTES} bytes, got {customer_id[:40]!r}"
            )
        self._engine.balance(customer_id)  # NOT_FOUND for a customer without a budget: create the budget first
        if len(self._records) >= MAX_KEYS:
            raise EngineError(
                "resource_exhausted",
                f"{MAX_KEYS:_} virtual keys exist, the most allowed: revoke some (spendgate key revoke) first",
            )
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
        hashed = digest(key)
        record = KeyRecord(hashed[:KEY_ID_HEX_DIGITS], hashed, customer_id, time.time_ns() // 1_000_000)
        await self._store([*self._records, record])
        return key, record

    async def revoke(self, key_id_or_customer: str) -> list[KeyRecord]:
        """Remove the key with this id, or every key of this customer; returns what was removed."""
        gone = [r for r in self._records if key_id_or_customer in (r.key_id, r.customer_id)]
        if gone:
            await self._store([r for r in self._records if r not in gone])
        return gone

    async def _store(self, records: list[KeyRecord]) -> None:
        body = json.dumps({"version": DOCUMENT_VERSION, "keys": [dataclasses.asdict(r) for r in records]})
        await self._wait(self._engine.put_document(DOCUMENT_NAME, body))
        # Only now, once durable: a key is never usable (or revoked) before the change that made it is on disk.
        self._records = records
        self._by_hash = {record.sha256: record for record in records}


def _parse(body: str | None) -> list[KeyRecord]:
    if body is None:
        return []
    try:
        document = json.loads(body)
        assert document["version"] == DOCUMENT_VERSION, document["version"]
        return [KeyRecord(r["key_id"], r["sha256"], r["customer_id"], r["created_ms"]) for r in document["keys"]]
    except (ValueError, AssertionError, KeyError, TypeError) as error:
        raise EngineError("internal", f"the virtual key document {DOCUMENT_NAME!r} is not valid ({error!r})") from None
