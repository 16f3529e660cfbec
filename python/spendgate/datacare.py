"""Data care from the command line: restore a backup, and inspect a data dir (also while its sidecar runs).

    spendgate backup DEST [--target HOST:PORT]           Admin.Backup: the running sidecar copies its own environment
    spendgate restore SRC --data-dir DIR [--force]       offline: puts a backup in place of DIR
    spendgate inspect [--data-dir DIR] [budgets|holds|outbox|ledger|deadletters] [--limit N] [--json]

Restore refuses while a process holds DIR's lock (the engine's flock on `spendgate.lock`: the sidecar), refuses a
DIR that is not empty unless --force, and then moves the old data aside (`DIR.before-restore-<UTC time>`), never
deleting it. It marks DIR as being restored, copies the backup into a temporary directory next to DIR, gives the copy
a new instance id (so that no id issued before the restore is issued again, and reservation ids from before are
refused), opens it with the engine to check that the books are consistent, and only then swaps it into place in one
atomic exchange. `serve` refuses a marked DIR, and a missing DIR that a restore's traces say existed.

Inspect reads through spendgate.store_reader (the `lmdb` package, read-only, in a worker process), so it works against
a live sidecar's data dir from another process and never writes to it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from spendgate.ledger_archive import ARCHIVE_DIR, ARCHIVE_GLOB, archived_entries, committed_lengths
from spendgate.store_reader import StoreReader

LOCK_FILE: Final[str] = "spendgate.lock"  # the engine's (rust/src/engine.rs lock_data_dir)
DATA_FILE: Final[str] = "data.mdb"
MIB: Final[int] = 1024 * 1024
# The verification opens the copy with at least this much map room over its size (the engine's own floor is 1 MiB).
VERIFY_MAP_HEADROOM: Final[int] = 2
INSPECT_SECTIONS: Final[tuple[str, ...]] = ("budgets", "holds", "outbox", "ledger", "archive", "deadletters")


class DataCareError(RuntimeError):
    """What was wrong and how to fix it; nothing was changed."""


# -- restore -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restored:
    data_dir: Path
    moved_aside: Path | None
    budgets: int
    size_bytes: int


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock as the engine takes it (flock, exclusive, non-blocking) for the duration; raises
    DataCareError if a sidecar (or any spendgate process) holds it. A data dir without a lock file is not in use."""
    path = data_dir / LOCK_FILE
    if not path.exists():
        yield
        return
    with open(path, "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise DataCareError(
                f"{data_dir} is in use by a running spendgate process (it holds {path}): stop the "
                "sidecar first, then restore"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# The named steps of a restore, in order. A crash after any of them leaves the data dir either as it was or restored,
# and the marker makes `serve` refuse until a restore finishes (tests crash a restore after each step).
RESTORE_STEPS: Final[tuple[str, ...]] = (
    "marked",
    "copied",
    "renewed",
    "verified",
    "swapped",
    "moved_aside",
    "unmarked",
)


def _reached(step: str) -> None:
    """Called after each restore step; a test replaces it to crash the process there."""
    assert step in RESTORE_STEPS, step


def restore_marker(data_dir: Path) -> Path:
    """The file that says a restore of `data_dir` is under way; it lives next to the data dir, not in it."""
    return data_dir.with_name(f".{data_dir.name}.restore-in-progress")


def check_servable(data_dir: Path) -> None:
    """Refuse to serve a data dir that a restore left half done, or that is missing while traces say it existed
    (so that `serve` never silently starts empty books with ids from 1). Raises DataCareError."""
    data_dir = data_dir.resolve()
    marker = restore_marker(data_dir)
    if marker.exists():
        raise DataCareError(
            f"a restore of {data_dir} did not finish ({marker} is there): run the same `spendgate restore SRC "
            f"--data-dir {data_dir} --force` again to finish it; the data dir is either the old one or the restored "
            "one, and every earlier data dir is kept beside it"
        )
    if data_dir.exists():
        return
    patterns = (
        f"{data_dir.name}.before-restore-*",
        f"{data_dir.name}.interrupted-restore-*",
        f".{data_dir.name}.restore-*",
    )
    traces = sorted(str(path) for pattern in patterns for path in data_dir.parent.glob(pattern))
    if traces:
        raise DataCareError(
            f"{data_dir} is missing, but {traces[0]} says it existed: starting empty would lose every budget and "
            "reuse no ids safely. Restore a backup (`spendgate restore`), or move the data back; to start a new, "
            "empty data dir on purpose, create the directory first"
        )


def restore(source: Path, data_dir: Path, *, force: bool, map_size_mb: int) -> Restored:
    """Put the backup in `source` in place of `data_dir` (see the module doc). Raises DataCareError.

    Atomic: the verified copy (with a new instance id) and the data dir swap places in one renameat2(RENAME_EXCHANGE),
    so after a crash at any point the data dir is the old one or the restored one. A marker next to it, written first
    and removed last, makes `serve` refuse in between, and running the same restore again finishes the job."""
    source, data_dir = source.resolve(), data_dir.resolve()
    backup_file = source / DATA_FILE
    if not backup_file.is_file():
        raise DataCareError(
            f"{source} is not a spendgate backup (no {DATA_FILE}); pass the directory `spendgate backup` wrote"
        )
    with data_dir_lock(data_dir):
        interrupted = restore_marker(data_dir).exists()
        occupied = data_dir.exists() and any(data_dir.iterdir())
        if occupied and not force:
            raise DataCareError(
                f"{data_dir} is not empty: pass --force to move its contents aside (to "
                f"{data_dir.name}.before-restore-<time>, kept) and restore in their place"
            )
        _keep_leftovers(data_dir)  # an interrupted restore's staging may hold the old data: kept, never deleted
        _mark(data_dir, source)
        _reached("marked")
        staging = data_dir.parent / f".{data_dir.name}.restore-{os.getpid()}"
        staging.mkdir(parents=True, mode=0o700)
        try:
            _copy_durably(backup_file, staging / DATA_FILE)
            _copy_archive(source, staging)
            _reached("copied")
            _core_renew(staging, map_size_mb=max(map_size_mb, VERIFY_MAP_HEADROOM * _size_mb(backup_file)))
            _reached("renewed")
            budgets = verify(staging, map_size_mb=max(map_size_mb, VERIFY_MAP_HEADROOM * _size_mb(backup_file)))
            _reached("verified")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # holds only the copy: the data dir is untouched
            if not interrupted:
                _unmark(data_dir)
            raise
        moved_aside = _swap_in(staging, data_dir, occupied)
        _unmark(data_dir)
        _reached("unmarked")
    return Restored(data_dir, moved_aside, budgets, backup_file.stat().st_size)


def _core_renew(data_dir: Path, *, map_size_mb: int) -> None:
    from spendgate import _core  # noqa: PLC0415 - the native engine, only for restore

    try:
        _core.renew_identity(str(data_dir), map_size_mb=map_size_mb, now_ms=time.time_ns() // 1_000_000)
    except _core.EngineError as error:
        raise DataCareError(
            f"the backup does not open as consistent books ({error.kind}: {error.message}); it is not restored"
        ) from None
    gc.collect()


def _mark(data_dir: Path, source: Path) -> None:
    marker = restore_marker(data_dir)
    text = json.dumps(
        {"source": str(source), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )
    with open(marker, "w", encoding="utf-8") as file:
        file.write(text + "\n")
        file.flush()
        os.fsync(file.fileno())
    _fsync_dir(data_dir.parent)


def _unmark(data_dir: Path) -> None:
    restore_marker(data_dir).unlink(missing_ok=True)
    _fsync_dir(data_dir.parent)


def _keep_leftovers(data_dir: Path) -> None:
    """Move an interrupted restore's staging directories aside under a name that says what they are."""
    for leftover in sorted(data_dir.parent.glob(f".{data_dir.name}.restore-*")):
        if leftover == restore_marker(data_dir) or not leftover.is_dir():
            continue
        kept = _aside_name(data_dir, "interrupted-restore")
        leftover.rename(kept)
        print(f"an interrupted restore left {leftover}; kept as {kept}", file=sys.stderr)
    _fsync_dir(data_dir.parent)


def _aside_name(data_dir: Path, what: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = data_dir.with_name(f"{data_dir.name}.{what}-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = data_dir.with_name(f"{data_dir.name}.{what}-{stamp}-{n}")
    return candidate


def _size_mb(path: Path) -> int:
    return path.stat().st_size // MIB + 1


def _copy_durably(source: Path, dest: Path) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the books of every customer: owner only
    with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
        shutil.copyfileobj(src, dst, length=MIB)
        dst.flush()
        os.fsync(dst.fileno())


def _copy_archive(source: Path, staging: Path) -> None:
    """The backup's ledger archive (settled history moved out of LMDB) goes with its data.mdb: without it those
    entries would be gone from the restored books."""
    archived = sorted((source / ARCHIVE_DIR).glob(ARCHIVE_GLOB))
    if not archived:
        return
    (staging / ARCHIVE_DIR).mkdir(mode=0o700)
    for path in archived:
        _copy_durably(path, staging / ARCHIVE_DIR / path.name)
    _fsync_dir(staging / ARCHIVE_DIR)
    _fsync_dir(staging)


def verify(data_dir: Path, *, map_size_mb: int) -> int:
    """Open a copy with the engine and check its books (held equals the open holds, spent and held within the
    limits); returns its budget count. Raises DataCareError saying what is wrong."""
    from spendgate import _core  # noqa: PLC0415 - the native engine, only for restore

    engine = None
    try:
        engine = _core.Engine(str(data_dir), map_size_mb=map_size_mb, durability="relaxed")
        engine.check_invariants()
        budgets = engine.stats()["budgets"]
    except _core.EngineError as error:
        raise DataCareError(
            f"the backup does not open as consistent books ({error.kind}: {error.message}); it is not restored"
        ) from None
    finally:
        if engine is not None:
            engine.close()
        del engine
        gc.collect()  # the engine frees the directory's lock only when it is freed
    return budgets


_AT_FDCWD: Final[int] = -100
_RENAME_EXCHANGE: Final[int] = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the kernel or filesystem lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(error)}")


def _swap_in(staging: Path, data_dir: Path, occupied: bool) -> Path | None:
    """Put the verified copy in place; the old data dir, if it held anything, is kept beside it."""
    aside = _aside_name(data_dir, "before-restore") if occupied else None
    if data_dir.exists() and _exchange(staging, data_dir):
        _fsync_dir(data_dir.parent)
        _reached("swapped")
        if aside is not None:
            staging.rename(aside)  # staging now holds the old data dir
        else:
            shutil.rmtree(staging)  # the old data dir was empty
    else:  # no exchange here (or no data dir yet): two renames; the marker covers the moment between them
        if aside is not None:
            data_dir.rename(aside)
        elif data_dir.exists():
            data_dir.rmdir()  # empty
        _reached("swapped")
        staging.rename(data_dir)
    _fsync_dir(data_dir.parent)
    _reached("moved_aside")
    return aside


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- inspect -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Section:
    name: str  # as asked: budgets, holds, outbox, ledger, archive, deadletters
    title: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]


def inspect(data_dir: Path, sections: Sequence[str], *, limit: int, all_holds: bool = False) -> list[Section]:
    """What `spendgate inspect` prints: each asked section, at most `limit` rows (the ledger: its last `limit`)."""
    readers: dict[str, Callable[[StoreReader], Section]] = {
        "budgets": lambda store: Section(
            "budgets",
            "budgets",
            BUDGET_COLUMNS,
            _first(({"customer_id": cid, **record} for cid, record in store.budgets()), limit),
        ),
        "holds": lambda store: Section(
            "holds",
            "holds" if all_holds else "active holds",
            HOLD_COLUMNS,
            _first(
                (
                    {"reservation_id": rid, **record}
                    for rid, record in store.holds()
                    if all_holds or record["status"] == "active"
                ),
                limit,
            ),
        ),
        "outbox": lambda store: Section("outbox", "outbox", OUTBOX_COLUMNS, _first(store.outbox(), limit)),
        "ledger": lambda store: Section(
            "ledger",
            f"ledger (last {limit})",
            LEDGER_COLUMNS,
            [_with_kind(entry) for entry in store.tail("ledger", limit)],
        ),
        "archive": lambda store: Section(
            "archive",
            f"archived ledger (first {limit})",
            LEDGER_COLUMNS,
            [_with_kind(entry) for entry in _first(archived_entries(data_dir, committed_lengths(store.meta())), limit)],
        ),
        "deadletters": lambda store: Section(
            "deadletters",
            "dead letters",
            DEAD_LETTER_COLUMNS,
            _first(({**letter["entry"], "reason": letter["reason"]} for letter in store.dead_letters()), limit),
        ),
    }
    with StoreReader(data_dir) as store:
        return [readers[name](store) for name in sections]


BUDGET_COLUMNS: Final = ("customer_id", "stripe_customer_id", "limit", "spent", "held", "overdraft", "frozen")
HOLD_COLUMNS: Final = ("reservation_id", "customer_id", "amount", "status", "expires_ms", "committed_amount")
OUTBOX_COLUMNS: Final = ("seq", "customer_id", "stripe_customer_id", "amount", "ts_ms", "attempts", "sent_as")
# kind: "commit" (usage; stored without the field) or "grant" (credits, Admin.GrantCredits: no reservation id).
LEDGER_COLUMNS: Final = (
    "seq",
    "kind",
    "reservation_id",
    "customer_id",
    "amount",
    "reserved",
    "excess",
    "ts_ms",
    "settled_ms",
)
DEAD_LETTER_COLUMNS: Final = ("seq", "customer_id", "amount", "attempts", "reason")


def _with_kind(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "kind": entry.get("kind", "commit")}


def _first(rows: Iterator[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    taken: list[dict[str, Any]] = []
    for row in rows:
        if len(taken) == limit:
            break
        taken.append(row)
    return taken


def format_sections(sections: Sequence[Section], *, as_json: bool) -> str:
    """Text tables (a title line, a header, aligned columns), or one JSON object per row with its section."""
    if as_json:
        return "\n".join(json.dumps({"section": s.name, **row}, sort_keys=True) for s in sections for row in s.rows)
    return "\n\n".join(_table(section) for section in sections)


def _table(section: Section) -> str:
    if not section.rows:
        return f"{section.title}: none"
    cells = [[_cell(row.get(column)) for column in section.columns] for row in section.rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(section.columns)]
    lines = [f"{section.title}:", "  ".join(c.ljust(w) for c, w in zip(section.columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
