"""Reading the ledger archive: settled entries of closed periods that the engine moved out of LMDB after
`ledger_retention_days` (rust/src/archive.rs writes it).

    lengths = committed_lengths(store.meta())          # from the same data dir's LMDB meta
    for entry in archived_entries(data_dir, lengths):  # LedgerEntry dicts, file by file (month by month)
        ...

One file per month of the entries' period start, `archive/ledger-YYYY-MM.jsonl.gz`: gzip members of JSON lines in the
ledger's own format. Only the first `archive_len:<file>` bytes (LMDB meta) are committed; a tail past them belongs to a
transaction that did not commit (its entries are still in LMDB), so a reader stops there. Read LMDB's ledger first and
the meta after it: then an entry the writer archives meanwhile is in the archive's committed part, and seq dedupes.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

ARCHIVE_DIR: Final[str] = "archive"
ARCHIVE_GLOB: Final[str] = "ledger-*.jsonl.gz"
META_LEN_PREFIX: Final[str] = "archive_len:"
_READ_CHUNK_BYTES: Final[int] = 1 << 20


class ArchiveError(Exception):
    """The archive is missing or damaged where LMDB says it has committed entries."""


def committed_lengths(meta: Mapping[str, Any]) -> dict[str, int]:
    """file name -> committed bytes, from LMDB's meta database."""
    return {key[len(META_LEN_PREFIX) :]: int(value) for key, value in meta.items() if key.startswith(META_LEN_PREFIX)}


def archived_entries(data_dir: Path, lengths: Mapping[str, int]) -> Iterator[dict[str, Any]]:
    """Every committed archived entry, oldest month first (seq order within a file)."""
    for name in sorted(lengths):
        yield from _read(data_dir / ARCHIVE_DIR / name, lengths[name])


def _read(path: Path, committed_bytes: int) -> Iterator[dict[str, Any]]:
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise ArchiveError(
            f"{path} is missing but LMDB counts {committed_bytes} archived bytes in it: restore the "
            "data dir's archive/ from its backup"
        ) from None
    with raw, gzip.GzipFile(fileobj=io.BufferedReader(_Prefix(raw, committed_bytes), _READ_CHUNK_BYTES)) as lines:
        try:
            for line in lines:
                yield json.loads(line)
        except (OSError, EOFError, ValueError) as error:
            raise ArchiveError(f"{path} is damaged within its committed {committed_bytes} bytes: {error}") from None


class _Prefix(io.RawIOBase):
    """The first `size` bytes of a file: the committed part of an archive file."""

    def __init__(self, file: io.BufferedReader, size: int) -> None:
        self._file, self._left = file, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: self._left]
        read = self._file.readinto(view)
        self._left -= read
        return read
