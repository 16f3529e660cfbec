"""Fixtures for the binding benchmarks (pytest-benchmark). Run them with the bench (`python bench/run.py`), or alone:

    python -m pytest bench/python --benchmark-only

They are not under tests/: the test suite never times anything, and `python -m pytest` (testpaths = tests) never
collects these.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spendgate import _core

BUDGETS = 64


def customers(n: int = BUDGETS) -> list[str]:
    return [f"bench-{i:03d}" for i in range(n)]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[_core.Engine]:
    """A fresh engine (durability fsync, the default) with BUDGETS budgets of limit 2^53. The map and the write
    queue are large so that millions of queued ops never reach a limit; what each benchmark queued is made durable
    before it closes."""
    eng = _core.Engine(str(tmp_path / "data"), map_size_mb=32 * 1024, write_queue_capacity=1 << 26)
    ticket = 0
    for customer in customers():
        ticket = eng.set_budget(customer, _core.MAX_AMOUNT_UNITS).ticket
    eng.wait_durable(ticket)
    try:
        yield eng
    finally:
        eng.close()
