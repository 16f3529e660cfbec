"""Read a spendgate data dir from another process, read-only, while its sidecar may be writing it.

    with StoreReader("/var/lib/spendgate") as store:
        for entry in store.ledger():          # LedgerEntry dicts, in seq order
            ...

The schema is rust/src/records.rs: named databases `budgets` (customer_id UTF-8 -> JSON), `holds` (u64 big-endian
hold id -> JSON HoldRecord; its reservation id is `rsv_` and the id in 16 hex digits), `ledger`, `outbox` and
`dead_letters` (u64 big-endian seq -> JSON). Nothing here ever opens the environment writable.

Why `lock=False`, and how reads stay sound anyway
-------------------------------------------------
The engine links LMDB from heed's `lmdb-master-sys` (LMDB's master branch, lock-file format version 2); the `lmdb`
package bundles LMDB 0.9 (lock-file format 1). Opening with `lock=True` therefore fails with MDB_VERSION_MISMATCH while
a sidecar runs, and when none runs it would re-initialise lock.mdb in the old format, so that a sidecar starting
meanwhile could not open its own data dir. The data file format is the same (version 1), so the environment is opened
with `lock=False` (MDB_NOLOCK): only data.mdb is touched, read-only.

Without the lock a read transaction is not registered in the reader table, so the writer may reuse pages that the
reader's snapshot still uses. LMDB reuses a page only after a later transaction freed it and yet another one writes:
the pages of snapshot S can be overwritten only once transaction S+2 commits (a writer reuses the pages freed by
transactions older than the newest committed one, when no reader is registered). So every read is one short
transaction over a bounded chunk of keys, and a chunk counts only if the environment's last committed transaction is
still <= S+1 once it has been read; otherwise it is read again (smaller), up to MAX_ATTEMPTS times.

A read of pages reused under it can do worse than return garbage: LMDB asserts on a page that is not what it expects
and abort()s the process. So the reads run in a worker child process (this file, run as a script): a worker that dies
is replaced and its chunk read again. Every value is also checked (JSON; for u64 keys, its `seq` equals its key).

Chunks give each entry as it was at some moment during the scan, not one snapshot of the whole database. The readers
here (reconciliation) need only that: ledger entries are appended, and otherwise change only by gaining `settled_ms`.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

__all__ = ["StoreBusyError", "StoreReadError", "StoreReader", "reservation_id", "seq_key"]

# As many named databases as the engine opens with (rust/src/limits.rs MAX_DBS).
MAX_DBS: Final[int] = 16
# Entries read in one short read transaction, at first; halved after a chunk had to be read again.
CHUNK_ENTRIES: Final[int] = 2048
MIN_CHUNK_ENTRIES: Final[int] = 16
# How often one chunk is read again (the writer committed twice meanwhile, or the worker died) before giving up.
MAX_ATTEMPTS: Final[int] = 200
# Pause between attempts, doubling up to the maximum: lets a burst of commits pass.
RETRY_PAUSE_S: Final[float] = 0.001
MAX_RETRY_PAUSE_S: Final[float] = 0.05
# A worker that has not answered one chunk in this long is killed and replaced (a read looping on reused pages).
WORKER_REPLY_TIMEOUT_S: Final[float] = 60.0

_U64: Final = struct.Struct(">Q")
_LENGTH: Final = struct.Struct(">I")


class StoreReadError(RuntimeError):
    """The data dir cannot be read: missing, not a spendgate data dir, or an entry that is not valid."""


class StoreBusyError(StoreReadError):
    """The sidecar wrote so often that no chunk could be read in one stable window (see the module docstring)."""


def seq_key(seq: int) -> bytes:
    return _U64.pack(seq)


def reservation_id(hold_key: bytes, instance_id: int, legacy_holds_below: int = 0) -> str:
    """The reservation id of a `holds` key, as Reserve returned it (rust/src/identity.rs Identity::issued_...)."""
    hold_id = _U64.unpack(hold_key)[0]
    if hold_id < legacy_holds_below:
        return f"rsv_{hold_id:016x}"  # issued before the data dir had an instance id
    return f"rsv_{instance_id:016x}{hold_id:016x}"


class StoreReader:
    """A read-only view of one data dir. close() (or a `with` block) stops its worker process."""

    def __init__(self, data_dir: str | Path, *, chunk_entries: int = CHUNK_ENTRIES) -> None:
        self.data_dir = Path(data_dir)
        self._max_chunk_entries = self._chunk_entries = chunk_entries
        if not (self.data_dir / "data.mdb").is_file():
            raise StoreReadError(
                f"{self.data_dir} is not a spendgate data dir (no data.mdb); pass the sidecar's --data-dir"
            )
        self._worker = _Worker(self.data_dir)
        self.retries = 0  # chunks read again because the writer moved on meanwhile (for tests and diagnostics)

    @property
    def worker_restarts(self) -> int:
        """Workers that died (reading reused pages) and were replaced."""
        return self._worker.restarts

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- what callers read -------------------------------------------------------------------------------------------

    def budgets(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(customer_id, BudgetRecord) in customer_id order."""
        for key, value in self._scan("budgets"):
            yield key.decode("utf-8"), value

    def holds(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(reservation_id, HoldRecord) in id order: active holds and the ended ones kept for idempotent retries
        (`status` says which: active, committed, released, expired)."""
        meta = self.meta()
        instance_id, legacy_below = int(meta.get("instance_id", 0)), int(meta.get("legacy_holds_below", 0))
        for key, value in self._scan("holds"):
            yield reservation_id(key, instance_id, legacy_below), value

    def meta(self) -> dict[str, Any]:
        """The meta database: instance id, id counters, the archive files' committed lengths."""
        return {key.decode("utf-8"): value for key, value in self._scan("meta")}

    def ledger(self, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """LedgerEntry dicts with seq > after_seq, in seq order."""
        for _, value in self._scan("ledger", after=seq_key(after_seq) if after_seq else None):
            yield value

    def tail(self, db_name: str, limit: int) -> list[dict[str, Any]]:
        """The last `limit` (<= the chunk size) values of a database keyed by seq or id, oldest first: the ledger's
        newest entries without reading the ones before."""
        assert 0 < limit <= self._max_chunk_entries, limit
        return [value for _, value in self._stable(db_name, ("tail", db_name, limit))]

    def outbox(self) -> Iterator[dict[str, Any]]:
        """OutboxEntry dicts waiting for Stripe, in seq order."""
        for _, value in self._scan("outbox"):
            yield value

    def dead_letters(self) -> Iterator[dict[str, Any]]:
        """DeadLetter dicts ({entry, reason, dead_ms, requeues}), in seq order."""
        for _, value in self._scan("dead_letters"):
            yield value

    def get_many(self, db_name: str, keys: Iterable[bytes]) -> dict[bytes, dict[str, Any]]:
        """The values of those keys that exist, read in stable chunks like the scans."""
        wanted = sorted(set(keys))
        found: dict[bytes, dict[str, Any]] = {}
        for start in range(0, len(wanted), self._chunk_entries):
            batch = wanted[start : start + self._chunk_entries]
            found.update(self._stable(db_name, ("get", db_name, batch)))
        return found

    # -- chunked, validated reads ------------------------------------------------------------------------------------

    def _scan(self, db_name: str, after: bytes | None = None) -> Iterator[tuple[bytes, Any]]:
        while True:
            limit = self._chunk_entries
            chunk = self._stable(db_name, ("scan", db_name, after, limit))
            for key, value in chunk:
                if after is not None and key <= after:
                    raise StoreReadError(f"`{db_name}`: keys out of order after {after!r}; the data dir is damaged")
                after = key
                yield key, value
            if len(chunk) < limit:
                return

    def _stable(self, db_name: str, request: tuple[Any, ...]) -> list[tuple[bytes, Any]]:
        """The worker's answer to `request` from a read transaction no writer could have disturbed, every value
        decoded and checked. Retries while the writer moved on by two or more transactions, or the worker died."""
        check = _CHECKS.get(db_name, _check_seq)
        pause = RETRY_PAUSE_S
        for _attempt in range(MAX_ATTEMPTS):
            try:
                snapshot, last_txnid, pairs, problem = self._worker.call(request)
            except _WorkerDied:
                snapshot, last_txnid, pairs, problem = 0, 2, [], None  # judged unstable below: read again
            if last_txnid <= snapshot + 1:
                decoded: list[tuple[bytes, Any]] = []
                for key, raw in pairs if problem is None else ():
                    try:
                        value = json.loads(raw)
                    except ValueError as error:
                        problem = f"key {key!r} holds no JSON ({error})"
                        break
                    problem = check(key, value)
                    if problem is not None:
                        break
                    decoded.append((key, value))
                if problem is None:
                    self._chunk_entries = min(self._max_chunk_entries, self._chunk_entries * 2)
                    return decoded
                raise StoreReadError(f"`{db_name}` in {self.data_dir}: {problem}")
            self.retries += 1
            self._chunk_entries = max(MIN_CHUNK_ENTRIES, self._chunk_entries // 2)
            time.sleep(pause)
            pause = min(pause * 2, MAX_RETRY_PAUSE_S)
        raise StoreBusyError(
            f"`{db_name}` in {self.data_dir}: the sidecar committed too often to read a stable chunk "
            f"({MAX_ATTEMPTS} attempts); retry when it is less busy"
        )


def _check_seq(key: bytes, value: Any) -> str | None:
    if len(key) != 8 or not isinstance(value, dict) or value.get("seq") != _U64.unpack(key)[0]:
        return f"key {key!r} does not hold an entry with that seq"
    return None


def _check_dead_letter(key: bytes, value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("entry"), dict):
        return f"key {key!r} does not hold a dead letter"
    return _check_seq(key, value["entry"])


def _check_budget(key: bytes, value: Any) -> str | None:
    if not isinstance(value, dict) or "limit" not in value or "stripe_customer_id" not in value:
        return f"key {key!r} does not hold a budget"
    return None


def _check_meta(key: bytes, value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"meta key {key!r} does not hold a number"
    return None


def _check_hold(key: bytes, value: Any) -> str | None:
    if len(key) != 8 or not isinstance(value, dict) or not {"customer_id", "amount", "status"} <= value.keys():
        return f"key {key!r} does not hold a hold"
    return None


_CHECKS: Final[dict[str, Callable[[bytes, Any], str | None]]] = {
    "budgets": _check_budget,
    "dead_letters": _check_dead_letter,
    "ledger": _check_seq,
    "outbox": _check_seq,
    "holds": _check_hold,
    "meta": _check_meta,
}


# -- the worker process -----------------------------------------------------------------------------------------------


class _WorkerDied(Exception):
    pass


def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


class _Worker:
    """This file run as a script in a child process: it opens the environment and answers read requests, one at a
    time, over its stdin and stdout (length-prefixed pickles; the child is this code, so they are trusted)."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self.restarts = -1
        self._start()

    def _start(self) -> None:
        self.restarts += 1
        # -P: the script's directory (the spendgate package) is not put first on sys.path. The worker's stderr (an
        # LMDB assertion when it read reused pages) is dropped: a death is expected and handled.
        self._process = subprocess.Popen(
            [sys.executable, "-P", __file__, "--worker", str(self._data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        reply = self._receive()  # the worker says whether it could open the environment
        if reply[0] != "ready":
            self.close()
            raise StoreReadError(str(reply[1]))

    def call(self, request: tuple[Any, ...]) -> tuple[int, int, list[tuple[bytes, bytes]], str | None]:
        if self._process is None or self._process.poll() is not None:
            self.close()
            self._start()
        assert self._process is not None and self._process.stdin is not None
        try:
            _send(self._process.stdin, request)
        except OSError:
            self.close()
            raise _WorkerDied from None
        reply = self._receive()
        if reply[0] == "fatal":
            raise StoreReadError(str(reply[1]))
        _, snapshot, last_txnid, pairs, problem = reply
        return snapshot, last_txnid, pairs, problem

    def _receive(self) -> Any:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        header = self._read_exactly(stdout, _LENGTH.size)
        return pickle.loads(self._read_exactly(stdout, _LENGTH.unpack(header)[0]))  # noqa: S301 - our own child

    def _read_exactly(self, stream: IO[bytes], size: int) -> bytes:
        chunks: list[bytes] = []
        fd = stream.fileno()
        while size > 0:
            ready, _, _ = select.select([fd], [], [], WORKER_REPLY_TIMEOUT_S)
            data = os.read(fd, min(size, 1 << 20)) if ready else b""
            if not data:  # died (EOF) or hung (timeout): kill it, the caller reads again
                self.close()
                raise _WorkerDied
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def _worker_main(data_dir: str) -> int:
    """Answer requests until stdin closes. Replies: ("ok", snapshot, last_txnid, [(key, value)], problem or None)."""
    import lmdb  # noqa: PLC0415

    out = sys.stdout.buffer
    source = sys.stdin.buffer
    try:
        # map_size=0 adopts the size recorded in the environment; create=False never makes a directory.
        env = lmdb.open(
            data_dir, readonly=True, lock=False, max_dbs=MAX_DBS, subdir=True, create=False, map_size=0, readahead=False
        )
    except lmdb.Error as error:
        _send(out, ("fatal", f"cannot open the LMDB environment in {data_dir} read-only: {error}"))
        return 1
    _send(out, ("ready",))
    dbs: dict[str, Any] = {}
    while True:
        header = source.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return 0
        request = pickle.loads(source.read(_LENGTH.unpack(header)[0]))  # noqa: S301 - from our parent
        op, name = request[0], request[1]
        db = dbs.get(name)
        if db is None:
            try:
                # Without txn=: a handle opened inside an explicit read-only transaction is not usable after it.
                db = dbs[name] = env.open_db(name.encode(), create=False)
            except lmdb.NotFoundError:
                _send(
                    out,
                    (
                        "fatal",
                        f"{data_dir} has no `{name}` database: not a spendgate data dir, or one from an older release",
                    ),
                )
                continue
            except lmdb.Error as error:  # the main database read from reused pages: report it unstable
                _send(out, ("ok", 0, 2, [], f"LMDB: {error}"))
                continue
        pairs: list[tuple[bytes, bytes]] = []
        problem: str | None = None
        with env.begin(db=db, buffers=False) as txn:
            snapshot = txn.id()
            try:
                if op == "scan":
                    after, limit = request[2], request[3]
                    cursor = txn.cursor(db=db)
                    more = cursor.first() if after is None else cursor.set_range(after)
                    if more and after is not None and cursor.key() == after:
                        more = cursor.next()
                    while more and len(pairs) < limit:
                        pairs.append((cursor.key(), cursor.value()))
                        more = cursor.next()
                elif op == "tail":
                    cursor = txn.cursor(db=db)
                    more = cursor.last()
                    while more and len(pairs) < request[2]:
                        pairs.append((cursor.key(), cursor.value()))
                        more = cursor.prev()
                    pairs.reverse()
                else:
                    for key in request[2]:
                        value = txn.get(key, db=db)
                        if value is not None:
                            pairs.append((key, value))
            except lmdb.Error as error:  # pages reused under us can look like anything: the parent judges
                problem = f"LMDB: {error}"
        _send(out, ("ok", snapshot, env.info()["last_txnid"], pairs, problem))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(_worker_main(sys.argv[2]))
