"""spendgate.store_reader: a data dir read from another process, read-only, including while its owner writes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

import spendgate
from spendgate import _core
from spendgate import store_reader as module
from spendgate.store_reader import StoreBusyError, StoreReader, StoreReadError, seq_key

PACKAGE_ROOT = Path(spendgate.__file__).resolve().parents[1]
GUARD_S = 120.0  # a guard against a hang, not a timing assertion
LONG_TTL_MS = 600_000


def commit(engine: _core.Engine, customer: str, amount: int) -> int:
    reserved = engine.reserve(customer, amount, "", LONG_TTL_MS)
    assert reserved.granted
    engine.wait_durable(engine.commit(reserved.reservation_id, amount).ticket)
    return amount


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir with two budgets, five commits, two settled, one dead-lettered; its engine closed."""
    path = tmp_path / "data"
    engine = _core.Engine(str(path), durability="relaxed")
    try:
        engine.wait_durable(engine.set_budget("acct-1", 1000, "cus_1").ticket)
        engine.wait_durable(engine.set_budget("acct-2", 1000, "cus_2").ticket)
        for customer, amount in (("acct-1", 10), ("acct-2", 20), ("acct-1", 30), ("acct-2", 40), ("acct-1", 50)):
            commit(engine, customer, amount)
        engine.wait_durable(engine.outbox_ack([1, 2]))
        engine.wait_durable(engine.outbox_dead_letter([3], "refused: a test"))
    finally:
        engine.close()
    return path


def test_it_reads_every_database_of_a_data_dir(data_dir: Path) -> None:
    with StoreReader(data_dir) as store:
        budgets = dict(store.budgets())
        ledger = list(store.ledger())
        outbox = list(store.outbox())
        letters = list(store.dead_letters())
        some = store.get_many("ledger", [seq_key(2), seq_key(5), seq_key(99)])
        after_three = [entry["seq"] for entry in store.ledger(after_seq=3)]
    assert sorted(budgets) == ["acct-1", "acct-2"] and budgets["acct-2"]["stripe_customer_id"] == "cus_2"
    assert [(e["seq"], e["customer_id"], e["amount"], "settled_ms" in e) for e in ledger] == [
        (1, "acct-1", 10, True), (2, "acct-2", 20, True), (3, "acct-1", 30, False), (4, "acct-2", 40, False),
        (5, "acct-1", 50, False),
    ]  # fmt: skip
    assert [e["seq"] for e in outbox] == [4, 5] and outbox[0]["identifier"].startswith("sg-rsv_")
    assert [(d["entry"]["seq"], d["reason"]) for d in letters] == [(3, "refused: a test")]
    assert sorted(some) == [seq_key(2), seq_key(5)] and some[seq_key(5)]["amount"] == 50
    assert after_three == [4, 5]


def test_small_chunks_read_the_same(data_dir: Path) -> None:
    with StoreReader(data_dir, chunk_entries=2) as store:
        assert [e["seq"] for e in store.ledger()] == [1, 2, 3, 4, 5]


def test_it_changes_nothing_in_the_data_dir(data_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    with StoreReader(data_dir) as store:
        assert len(list(store.ledger())) == 5
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before
    reopened = _core.Engine(str(data_dir), durability="relaxed")  # the owner still opens it
    try:
        assert reopened.balance("acct-1").spent == 90
    finally:
        reopened.close()


def test_a_missing_or_foreign_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreReadError, match="not a spendgate data dir"):
        StoreReader(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()
    foreign = tmp_path / "foreign"
    lmdb.open(str(foreign), max_dbs=2).close()
    with StoreReader(foreign) as store, pytest.raises(StoreReadError, match="has no `ledger` database"):
        list(store.ledger())


def test_a_damaged_entry_is_an_error_not_a_number(tmp_path: Path) -> None:
    path = tmp_path / "damaged"
    env = lmdb.open(str(path), max_dbs=4)
    ledger = env.open_db(b"ledger")
    with env.begin(write=True) as txn:
        txn.put(seq_key(1), b'{"seq": 1, "amount": 5}', db=ledger)
        txn.put(seq_key(2), b'{"seq": 7, "amount": 5}', db=ledger)  # a value under the wrong key
        txn.put(seq_key(3), b"not json", db=ledger)
    env.close()
    with StoreReader(path) as store, pytest.raises(StoreReadError, match="does not hold an entry with that seq"):
        list(store.ledger())


def test_a_worker_that_dies_is_replaced_and_its_chunk_read_again(data_dir: Path) -> None:
    with StoreReader(data_dir, chunk_entries=2) as store:
        entries = store.ledger()
        assert next(entries)["seq"] == 1
        process = store._worker._process  # noqa: SLF001 - the test plays an LMDB assertion killing the worker
        assert process is not None
        process.kill()
        process.wait()
        assert [e["seq"] for e in entries] == [2, 3, 4, 5]
        assert store.worker_restarts == 1


def test_a_writer_that_never_pauses_gives_up_with_a_clear_error(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(module, "MAX_ATTEMPTS", 3)
    monkeypatch.setattr(module, "RETRY_PAUSE_S", 0.0)
    with StoreReader(data_dir) as store:
        real_call = store._worker.call  # noqa: SLF001

        def busy(request: tuple[object, ...]) -> tuple[int, int, list[tuple[bytes, bytes]], str | None]:
            snapshot, _, pairs, problem = real_call(request)
            return snapshot, snapshot + 2, pairs, problem  # as if two transactions committed during every read

        monkeypatch.setattr(store._worker, "call", busy)  # noqa: SLF001
        with pytest.raises(StoreBusyError, match="committed too often"):
            list(store.ledger())
        assert store.retries == 3


WRITER = """
import sys
from spendgate import _core
engine = _core.Engine(sys.argv[1], durability="relaxed")
engine.wait_durable(engine.set_budget("acct", 10**15, "cus").ticket)
print("ready", flush=True)
for n in range(1, int(sys.argv[2]) + 1):
    r = engine.reserve("acct", 7, "", 600_000)
    c = engine.commit(r.reservation_id, 7)
    if n % 50 == 0:  # settle in batches: acknowledged entries rewrite ledger pages, freeing pages for reuse
        engine.wait_durable(c.ticket)
        engine.wait_durable(engine.outbox_ack([e["seq"] for e in engine.outbox_pending(50)]))
engine.close()
"""


@pytest.fixture
def busy_writer(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """Another process committing and settling as fast as it can (up to 200,000 commits)."""
    path = tmp_path / "busy"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    )
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "200000"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    try:
        yield path, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(GUARD_S)


def test_scans_while_another_process_writes_are_consistent(busy_writer: tuple[Path, subprocess.Popen[str]]) -> None:
    path, process = busy_writer
    seen = 0
    scans = 0
    while scans < 20 and process.poll() is None:
        with StoreReader(path, chunk_entries=512) as store:
            count = 0
            settled_prefix_ended = False
            for count, entry in enumerate(store.ledger(), start=1):
                assert entry["seq"] == count and entry["amount"] == 7 and entry["customer_id"] == "acct"
                settled_prefix_ended |= "settled_ms" not in entry
            outbox = [entry["seq"] for entry in store.outbox()]
            assert outbox == sorted(outbox)
        assert count >= seen  # the ledger only grows
        seen = count
        scans += 1
    assert scans > 0
