"""The price table in force, reloaded while serving: on SIGHUP, and when the file changes.

The table lives behind one attribute. A reload builds a whole new PriceTable first and then swaps the attribute, so a
request reads either the old table or the new one, never a mix, and no request waits or is dropped. A file that fails
to load raises PriceTableError (from `reload`) or is logged (by the watcher and the SIGHUP handler), and the old table
stays in force.

    book = PriceBook("prices.toml")                 # loads at once; a bad file fails the start
    book.install_sighup(asyncio.get_running_loop()) # `kill -HUP` reloads (even an unchanged file)
    watcher = asyncio.create_task(book.watch(interval_ms=1_000))
    ...
    book.table.estimate(model, input_tokens, max_output_tokens)   # read the attribute once per request

The watcher polls the file's (mtime_ns, size, inode): an editor that writes in place changes the first two, one that
renames a new file over the old changes the inode. It never stops on a failure: a bad file is logged once per change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Final

from spendgate.policy.prices import PriceTable, PriceTableError, load_price_table

log = logging.getLogger("spendgate.policy")

DEFAULT_WATCH_INTERVAL_MS: Final[int] = 1_000
MIN_WATCH_INTERVAL_MS: Final[int] = 10
# (st_mtime_ns, st_size, st_ino); None when the file is missing or unreadable.
FileSignature = tuple[int, int, int] | None


def file_signature(path: Path) -> FileSignature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PriceBook:
    """The current PriceTable of the bundled default plus the file at `path` (None: the bundled default alone,
    which never changes while running)."""

    def __init__(self, path: str | Path | None) -> None:
        self._path = None if path is None else Path(path)
        # Serializes reloads (the SIGHUP handler and the watcher may overlap); readers never take it.
        self._reload_lock = threading.Lock()
        self._signature = self._current_signature()
        self._table = load_price_table(self._path)

    @property
    def table(self) -> PriceTable:
        """The table in force: one attribute read, always a whole table."""
        return self._table

    @property
    def path(self) -> Path | None:
        return self._path

    def reload(self, *, force: bool = False) -> bool:
        """Load the file again if it changed since the last attempt (or always, with force). True when a new table
        is now in force; False when nothing changed. A bad file raises PriceTableError and the old table stays."""
        if self._path is None:
            return False
        with self._reload_lock:
            signature = self._current_signature()
            if not force and signature == self._signature:
                return False
            # Remember the attempt even if it fails, so that the watcher reports a bad file once, not every poll.
            self._signature = signature
            table = load_price_table(self._path)
            self._table = table  # the swap: one attribute assignment
        log.info(
            "price table reloaded from %s: %d models, %d aliases, as of %s",
            self._path, len(table.models), len(table.aliases), table.as_of,
        )  # fmt: skip
        return True

    def reload_logged(self, *, force: bool = False) -> bool:
        """reload, logging a failure instead of raising it (for the watcher and signal handlers)."""
        try:
            return self.reload(force=force)
        except PriceTableError as error:
            log.error("price table not reloaded, the previous table stays in force: %s", error)
        except Exception:  # a bug must not stop the watcher or escape into the event loop
            log.exception("price table reload failed, the previous table stays in force")
        return False

    async def watch(self, interval_ms: int = DEFAULT_WATCH_INTERVAL_MS) -> None:
        """Poll the file every interval_ms and reload it when it changes, until cancelled. Parsing runs in a worker
        thread, so a large file never stalls the event loop."""
        if interval_ms < MIN_WATCH_INTERVAL_MS:
            raise ValueError(f"interval_ms: expected at least {MIN_WATCH_INTERVAL_MS}, got {interval_ms}")
        if self._path is None:
            return
        while True:
            await asyncio.sleep(interval_ms / 1000)
            if self._current_signature() != self._signature:
                await asyncio.to_thread(self.reload_logged)

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload (forced) on SIGHUP, from `loop`'s thread. Unix only."""
        loop.add_signal_handler(signal.SIGHUP, self.on_sighup)

    def on_sighup(self) -> None:
        """What SIGHUP does to the price table (the server calls it from its own SIGHUP handler)."""
        log.info("SIGHUP: reloading the price table from %s", self._path or "the bundled default")
        self.reload_logged(force=True)

    def _current_signature(self) -> FileSignature:
        return None if self._path is None else file_signature(self._path)
