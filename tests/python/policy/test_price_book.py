"""The price book: whole-table swaps, a bad file keeps the old table, the watcher, and a real SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spendgate.policy.price_book import PriceBook
from spendgate.policy.prices import PriceTableError

WAIT_S = 30.0  # a deadline for things that should take milliseconds; never a timed assertion


def price_file(path: Path, markup_percent: int, *, valid: bool = True) -> Path:
    # Each write differs in size as well as content, so that the change shows whatever the clock's resolution.
    body = f"markup_percent = {markup_percent}\n" + "#" * markup_percent + "\n"
    path.write_text(body if valid else body + "[models.broken\n")
    return path


def test_the_book_loads_at_once_and_a_bad_file_fails_the_start(tmp_path: Path) -> None:
    assert PriceBook(price_file(tmp_path / "p.toml", 5)).table.markup_basis_points == 500
    with pytest.raises(PriceTableError, match="not valid TOML"):
        PriceBook(price_file(tmp_path / "bad.toml", 5, valid=False))


def test_reload_swaps_in_a_whole_new_table_only_when_the_file_changed(tmp_path: Path) -> None:
    path = price_file(tmp_path / "p.toml", 5)
    book = PriceBook(path)
    before = book.table
    assert book.reload() is False and book.table is before
    price_file(path, 7)
    assert book.reload() is True
    assert book.table.markup_basis_points == 700
    assert before.markup_basis_points == 500  # a reader holding the old table still has a whole, unchanged table
    assert book.reload(force=True) is True and book.table is not before


def test_a_bad_file_raises_and_the_old_table_stays(tmp_path: Path) -> None:
    path = price_file(tmp_path / "p.toml", 5)
    book = PriceBook(path)
    good = book.table
    price_file(path, 6, valid=False)
    with pytest.raises(PriceTableError, match=f"{path}: not valid TOML"):
        book.reload()
    assert book.table is good
    path.unlink()
    with pytest.raises(PriceTableError, match="cannot read the price file"):
        book.reload()
    assert book.table is good
    price_file(path, 8)
    assert book.reload() is True and book.table.markup_basis_points == 800


def test_the_bundled_default_alone_never_reloads() -> None:
    book = PriceBook(None)
    assert book.path is None and book.reload(force=True) is False
    asyncio.run(asyncio.wait_for(book.watch(interval_ms=10), WAIT_S))  # returns at once: nothing to watch


async def wait_for_markup(book: PriceBook, basis_points: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while book.table.markup_basis_points != basis_points:
        assert time.monotonic() < deadline, f"the watcher did not load markup {basis_points} in {WAIT_S} s"
        await asyncio.sleep(0.01)


def test_the_watcher_reloads_a_changed_file_and_survives_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = price_file(tmp_path / "p.toml", 5)
    book = PriceBook(path)

    async def scenario() -> None:
        watcher = asyncio.create_task(book.watch(interval_ms=10))
        price_file(path, 9)
        await wait_for_markup(book, 900)
        price_file(path, 11, valid=False)
        deadline = time.monotonic() + WAIT_S
        while "price table not reloaded" not in caplog.text:
            assert time.monotonic() < deadline and not watcher.done()
            await asyncio.sleep(0.01)
        assert book.table.markup_basis_points == 900 and not watcher.done()
        replacement = price_file(tmp_path / "new.toml", 12)
        os.replace(replacement, path)  # an editor that renames a new file over the old one
        await wait_for_markup(book, 1_200)
        watcher.cancel()

    with caplog.at_level(logging.INFO, logger="spendgate.policy"):
        asyncio.run(scenario())
    assert f"price table reloaded from {path}" in caplog.text
    assert caplog.text.count("price table not reloaded") == 1  # once per change, not once per poll


def test_the_watch_interval_is_checked(tmp_path: Path) -> None:
    book = PriceBook(price_file(tmp_path / "p.toml", 5))
    with pytest.raises(ValueError, match="interval_ms: expected at least 10"):
        asyncio.run(book.watch(interval_ms=0))


# The child installs the SIGHUP handler, says "ready", and prints the markup each time the table changes.
SIGHUP_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from spendgate.policy.price_book import PriceBook

    async def main() -> None:
        book = PriceBook(sys.argv[1])
        book.install_sighup(asyncio.get_running_loop())
        seen = book.table
        print("ready", seen.markup_basis_points, flush=True)
        while True:
            if book.table is not seen:
                seen = book.table
                print("reloaded", seen.markup_basis_points, flush=True)
            await asyncio.sleep(0.01)

    asyncio.run(main())
    """
)


class ChildOutput:
    """Lines from a child's stdout and stderr, read with a deadline (a hung child fails the test, never hangs it)."""

    def __init__(self, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None and child.stderr is not None
        self._fds = {child.stdout.fileno(): "stdout", child.stderr.fileno(): "stderr"}
        self._buffers = {"stdout": b"", "stderr": b""}

    def wait_for(self, stream: str, text: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while True:
            # Whole lines only: a chunk may end mid-line ("ready" before its " 500").
            for line in self._buffers[stream].decode(errors="replace").split("\n")[:-1]:
                if text in line:
                    self._buffers[stream] = b""
                    return line
            remaining_s = deadline - time.monotonic()
            assert remaining_s > 0, f"no {text!r} on the child's {stream} in {WAIT_S} s: {self._buffers}"
            readable, _, _ = select.select(list(self._fds), [], [], remaining_s)
            for fd in readable:
                chunk = os.read(fd, 65_536)
                assert chunk, f"the child closed its {self._fds[fd]}: {self._buffers}"
                self._buffers[self._fds[fd]] += chunk


def test_sighup_reloads_the_table_in_a_running_process(tmp_path: Path) -> None:
    path = price_file(tmp_path / "p.toml", 5)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = [sys.executable, "-c", SIGHUP_CHILD, str(path)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        output = ChildOutput(child)
        assert output.wait_for("stdout", "ready").split() == ["ready", "500"]
        price_file(path, 6, valid=False)
        child.send_signal(signal.SIGHUP)  # a bad file: logged, the old table stays, the process goes on
        assert "not valid TOML" in output.wait_for("stderr", "price table not reloaded")
        price_file(path, 7)
        child.send_signal(signal.SIGHUP)
        assert output.wait_for("stdout", "reloaded").split() == ["reloaded", "700"]
        assert child.poll() is None
    finally:
        child.kill()
        child.wait(timeout=WAIT_S)
