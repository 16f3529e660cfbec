"""Per-customer virtual API keys for the proxy: `spendgate key create CUSTOMER` prints one, once.

An app gives the key to its SDK as its API key (OpenAI(api_key=...), Anthropic(api_key=...)); the proxy maps it to
the customer and sends the provider key of proxy_openai_api_key_file / proxy_anthropic_api_key_file upstream
instead, so the app never holds the provider key.

Only the SHA-256 of a key is stored, never the key: a key is 256 random bits, so a fast hash is as good as a slow one
(there is nothing to brute-force), and a lookup costs one hash. The store is a JSON file in the data dir,
KEYS_FILE_NAME, written whole to a temporary file (mode 0600), fsynced and renamed over the old one, under an
exclusive lock on a lock file beside it, so concurrent `key create` runs never lose one another's keys and the
sidecar never reads half a file. The sidecar rereads it when its (mtime, size, inode) changes, checked on each lookup:
a key created or revoked while it runs takes effect at its next request. (The engine's LMDB has no place for
generic records that Python can reach, hence a file of its own.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

KEYS_FILE_NAME: Final[str] = "proxy-keys.json"
KEY_PREFIX: Final[str] = "sgk_"
KEY_RANDOM_BYTES: Final[int] = 32
MAX_KEYS: Final[int] = 100_000
MAX_KEYS_FILE_BYTES: Final[int] = 64 * 1024 * 1024
FILE_VERSION: Final[int] = 1
FILE_MODE: Final[int] = 0o600
# Where a key's id comes from: the first hex digits of its hash (shown by `key list`, used by `key revoke`).
KEY_ID_HEX_DIGITS: Final[int] = 12


class KeyStoreError(ValueError):
    """The key file is unreadable or invalid, or a request to it is (the message says which and how to fix it)."""


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


class KeyStore:
    """The key file of one data dir."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / KEYS_FILE_NAME
        self._signature: tuple[int, int, int] | None = None
        self._by_hash: dict[str, KeyRecord] = {}

    # -- the sidecar's side: lookups ------------------------------------------------------------------------------

    def customer_of(self, key: str) -> str | None:
        """The customer a key belongs to, or None (unknown or revoked). Rereads the file when it changed."""
        self._refresh()
        record = self._by_hash.get(digest(key))
        if record is None:
            return None
        # The dict lookup already matched the whole digest; compare once more in constant time, as for any secret.
        return record.customer_id if hmac.compare_digest(record.sha256, digest(key)) else None

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._signature, self._by_hash = None, {}
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature != self._signature:
            records = self._read()
            self._by_hash = {record.sha256: record for record in records}
            self._signature = signature

    # -- the CLI's side: changes ------------------------------------------------------------------------------------

    def create(self, customer_id: str) -> tuple[str, KeyRecord]:
        """A new key for the customer: (the key, to print once; its record, as stored)."""
        if not customer_id or len(customer_id.encode()) > 128:
            raise KeyStoreError(f"a customer id is 1..=128 bytes, got {customer_id!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
        hashed = digest(key)
        record = KeyRecord(hashed[:KEY_ID_HEX_DIGITS], hashed, customer_id, time.time_ns() // 1_000_000)
        with self._locked():
            records = self._read()
            if len(records) >= MAX_KEYS:
                raise KeyStoreError(f"{self.path} holds {len(records):_} keys, the most allowed: revoke some first")
            self._write([*records, record])
        return key, record

    def revoke(self, key_id_or_customer: str) -> list[KeyRecord]:
        """Remove the key with this id, or every key of this customer; returns what was removed."""
        with self._locked():
            records = self._read()
            gone = [r for r in records if key_id_or_customer in (r.key_id, r.customer_id)]
            if gone:
                self._write([r for r in records if r not in gone])
        return gone

    def records(self) -> list[KeyRecord]:
        return self._read()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(KEYS_FILE_NAME + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> list[KeyRecord]:
        try:
            size = os.stat(self.path).st_size
            if size > MAX_KEYS_FILE_BYTES:
                raise KeyStoreError(f"{self.path} is {size:_} bytes, over {MAX_KEYS_FILE_BYTES:_}")
            document: Any = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as error:
            raise KeyStoreError(f"{self.path}: cannot read the virtual key file: {error}") from None
        try:
            assert document["version"] == FILE_VERSION
            return [KeyRecord(r["key_id"], r["sha256"], r["customer_id"], r["created_ms"]) for r in document["keys"]]
        except (AssertionError, KeyError, TypeError) as error:
            raise KeyStoreError(f"{self.path}: not a spendgate virtual key file ({error!r})") from None

    def _write(self, records: list[KeyRecord]) -> None:
        document = {"version": FILE_VERSION, "keys": [dataclasses.asdict(r) for r in records]}
        temporary = self.path.with_name(f".{KEYS_FILE_NAME}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # also when an old temporary file was left with other bits
        with os.fdopen(fd, "wb") as file:
            file.write(json.dumps(document, indent=1).encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself must survive a crash
        finally:
            os.close(directory)
