"""Data care through real sidecar processes and the `spendgate` command: backup under load, restore, inspect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import grpc
import pytest

import spendgate
from spendgate import _core
from spendgate.client import Client
from spendgate.store_reader import StoreReader
from spendgate.testing import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory

from .settle._load import CommitLoad

PACKAGE_ROOT = Path(spendgate.__file__).resolve().parents[1]
CUSTOMERS = [f"cus_{i}" for i in range(6)]
GUARD_S = 120.0  # a hang guard, not a timing assertion
# Commits the load must have acknowledged before the backup starts, and after it, so the copy is taken mid-stream.
COMMITS_BEFORE = 150
COMMITS_AFTER = 150


def spendgate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "spendgate", *args], env=env, capture_output=True, text=True, timeout=GUARD_S
    )


def wait_for_commits(load: CommitLoad, count: int) -> None:
    deadline = time.monotonic() + GUARD_S
    while load.commits < count:
        assert not load.errors, load.errors[:3]
        assert time.monotonic() < deadline, f"the load made {load.commits} of {count} commits"
        time.sleep(0.01)


def books(data_dir: Path) -> tuple[dict[str, dict[str, int]], set[str]]:
    """Per customer: held, the sum of its active holds, spent, the sum of its ledger entries; and every committed
    reservation id. Read with the engine closed."""
    with StoreReader(data_dir) as store:
        budgets = dict(store.budgets())
        holds = list(store.holds())
        ledger = list(store.ledger())
    sums: dict[str, dict[str, int]] = {c: defaultdict(int) for c in budgets}  # type: ignore[misc]
    for customer, record in budgets.items():
        sums[customer]["held"], sums[customer]["spent"] = record["held"], record["spent"]
    for _, hold in holds:
        if hold["status"] == "active":
            sums[hold["customer_id"]]["active_holds"] += hold["amount"]
    for entry in ledger:
        sums[entry["customer_id"]]["ledger"] += entry["amount"]
    return sums, {entry["reservation_id"] for entry in ledger}


def test_a_backup_taken_under_load_restores_to_consistent_books_with_every_commit_acknowledged_before_it(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    sidecar = sidecar_factory("live")
    with Client(sidecar.target) as client:
        for customer in CUSTOMERS:
            client.set_budget(customer, 10**9)
    load = CommitLoad(sidecar.target, CUSTOMERS, threads=6, pause_s=0).start()
    try:
        wait_for_commits(load, COMMITS_BEFORE)
        acknowledged_before = list(load.acked_reservations)  # copied before the backup is asked for
        backup = spendgate_cli("backup", str(tmp_path / "copy"), "--target", sidecar.target)
        wait_for_commits(load, len(acknowledged_before) + COMMITS_AFTER)  # the sidecar kept serving
    finally:
        load.stop()
    assert backup.returncode == 0, backup.stderr
    assert "backup written to" in backup.stdout

    restored = spendgate_cli("restore", str(tmp_path / "copy"), "--data-dir", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    assert f"{len(CUSTOMERS)} budgets" in restored.stdout and "books checked" in restored.stdout
    sums, committed = books(tmp_path / "restored")
    for customer, numbers in sums.items():
        assert numbers["held"] == numbers["active_holds"], (customer, dict(numbers))
        assert numbers["spent"] == numbers["ledger"], (customer, dict(numbers))
    assert set(acknowledged_before) <= committed
    assert len(committed) < load.commits  # the copy is of a moment mid-load, not of the end
    engine = _core.Engine(str(tmp_path / "restored"), durability="relaxed")
    try:
        engine.check_invariants()
        assert sum(engine.balance(c).spent for c in CUSTOMERS) == sum(n["ledger"] for n in sums.values())
    finally:
        engine.close()


def test_backup_needs_an_absolute_empty_destination_and_changes_nothing_otherwise(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused = spendgate_cli("backup", str(tmp_path / "full"), "--target", sidecar.target)
    assert refused.returncode == 1 and "is not empty; pass a new or empty directory" in refused.stderr
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    with grpc.insecure_channel(sidecar.target) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.AdminStub(channel).Backup(pb.BackupRequest(dest_dir="relative/dir"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an absolute path" in caught.value.details()


def test_restore_refuses_a_data_dir_a_running_sidecar_holds(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    source = sidecar_factory("source")
    assert spendgate_cli("backup", str(tmp_path / "copy"), "--target", source.target).returncode == 0
    running = sidecar_factory("running")
    refused = spendgate_cli("restore", str(tmp_path / "copy"), "--data-dir", str(running.data_dir), "--force")
    assert refused.returncode == 1 and "in use by a running spendgate process" in refused.stderr
    assert running.running and not list(tmp_path.glob(".running.restore-*"))


def test_restore_over_a_non_empty_data_dir_needs_force_and_then_moves_the_old_data_aside(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    source = sidecar_factory("source")
    with Client(source.target) as client:
        client.set_budget("cus_backed_up", 500)
    assert spendgate_cli("backup", str(tmp_path / "copy"), "--target", source.target).returncode == 0
    old = sidecar_factory("old")
    with Client(old.target) as client:
        client.set_budget("cus_old", 700)
    old.stop()

    refused = spendgate_cli("restore", str(tmp_path / "copy"), "--data-dir", str(old.data_dir))
    assert refused.returncode == 1 and "pass --force" in refused.stderr
    forced = spendgate_cli("restore", str(tmp_path / "copy"), "--data-dir", str(old.data_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    (aside,) = tmp_path.glob("old.before-restore-*")
    assert "the previous contents are in" in forced.stdout and str(aside) in forced.stdout
    old.start()  # the restored data dir serves the backup's budgets
    with Client(old.target) as client:
        assert client.balance("cus_backed_up").limit == 500
    with grpc.insecure_channel(old.target) as channel:
        listed = pb_grpc.AdminStub(channel).ListBudgets(pb.ListBudgetsRequest(), timeout=30).budgets
    assert [budget.customer_id for budget in listed] == ["cus_backed_up"]
    with StoreReader(aside) as store:  # the old data was kept, never deleted
        assert [customer for customer, _ in store.budgets()] == ["cus_old"]


def test_restore_refuses_what_is_not_a_good_backup_and_leaves_the_data_dir_alone(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    not_backup = spendgate_cli("restore", str(tmp_path / "empty"), "--data-dir", str(tmp_path / "data"))
    assert not_backup.returncode == 1 and "is not a spendgate backup (no data.mdb)" in not_backup.stderr
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "data.mdb").write_bytes(os.urandom(64 * 1024))
    corrupt = spendgate_cli("restore", str(tmp_path / "garbage"), "--data-dir", str(tmp_path / "data"))
    assert corrupt.returncode == 1 and "does not open as consistent books" in corrupt.stderr
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob(".data.restore-*"))


def test_inspect_reads_a_live_sidecars_data_dir_from_another_process_under_load(
    sidecar_factory: SidecarFactory,
) -> None:
    sidecar = sidecar_factory("inspected")
    with Client(sidecar.target) as client:
        for customer in CUSTOMERS:
            client.set_budget(customer, 10**9)
        open_hold = client.reserve("cus_0", 42, ttl_ms=600_000)
    load = CommitLoad(sidecar.target, CUSTOMERS, threads=4, pause_s=0).start()
    try:
        wait_for_commits(load, 50)
        readings = [
            spendgate_cli("inspect", "--data-dir", str(sidecar.data_dir), "--json", "--limit", "2048") for _ in range(3)
        ]
    finally:
        load.stop()
    for reading in readings:
        assert reading.returncode == 0, reading.stderr
        rows = [json.loads(line) for line in reading.stdout.splitlines()]
        sections = {row["section"] for row in rows}
        assert sections >= {"budgets", "holds", "ledger", "outbox"}
        assert {row["customer_id"] for row in rows if row["section"] == "budgets"} == set(CUSTOMERS)
        assert open_hold.reservation_id in {row["reservation_id"] for row in rows if row["section"] == "holds"}
    final = spendgate_cli("inspect", "ledger", "--data-dir", str(sidecar.data_dir), "--json", "--limit", "1")
    (last,) = [json.loads(line) for line in final.stdout.splitlines()]
    assert last["seq"] == load.commits  # the tail is the newest entry: seqs count the commits from 1
    assert sidecar.running


def test_inspect_prints_tables_and_says_what_is_wrong_with_a_bad_data_dir(sidecar: Sidecar, tmp_path: Path) -> None:
    with Client(sidecar.target) as client:
        client.set_budget("cus_table", 1_000)
    shown = spendgate_cli("inspect", "budgets", "deadletters", "--data-dir", str(sidecar.data_dir))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:3] == [
        "budgets:",
        "customer_id  stripe_customer_id  limit  spent  held  overdraft  frozen",
        "cus_table    cus_table           1000   0      0     0          False",
    ]
    assert "dead letters: none" in shown.stdout
    missing = spendgate_cli("inspect", "--data-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "is not a spendgate data dir (no data.mdb)" in missing.stderr
    bad_limit = spendgate_cli("inspect", "--limit", "0", "--data-dir", str(sidecar.data_dir))
    assert bad_limit.returncode == 2 and "--limit must be 1..2048" in bad_limit.stderr


def archived_books(archive_commits: int, data_dir: Path) -> list[str]:
    """`archive_commits` settled commits of a closed fixed period, moved to the ledger archive by the engine's own
    prune pass; returns their reservation ids. The engine is closed again before this returns."""
    engine = _core.Engine(str(data_dir), durability="relaxed", ledger_retention_days=0, prune_interval_ms=100)
    try:
        now_ms = time.time_ns() // 1_000_000
        period: _core.PeriodSpec = {"kind": "fixed", "anchor_ms": now_ms, "length_ms": 1_000}
        engine.wait_durable(engine.update_budget("cus_archived", limit=10**9, period=period).ticket)
        ids, ticket = [], 0
        for n in range(archive_commits):
            hold = engine.reserve("cus_archived", 1 + n % 3)
            ticket = engine.commit(hold.reservation_id, 1 + n % 3).ticket
            ids.append(hold.reservation_id)
        engine.wait_durable(ticket)  # the outbox lists durable entries only
        while batch := engine.outbox_pending(1_000):
            seqs = [entry["seq"] for entry in batch]
            engine.outbox_claim(seqs, f"test-{seqs[0]}")
            engine.wait_durable(engine.outbox_ack(seqs))
        deadline = time.monotonic() + GUARD_S
        while not list((data_dir / "archive").glob("ledger-*.jsonl.gz")):
            assert time.monotonic() < deadline, "nothing was archived"
            time.sleep(0.1)
        with StoreReader(data_dir) as store:
            while list(store.ledger()):
                assert time.monotonic() < deadline, "the archive pass did not take every entry"
                time.sleep(0.1)
    finally:
        engine.close()
        del engine
    return ids


def test_a_backup_carries_the_ledger_archive_a_restore_puts_it_back_and_inspect_reads_it(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    source = sidecar_factory("archived", start=False)
    source.data_dir.mkdir(parents=True)
    ids = archived_books(300, source.data_dir)
    source.start()
    assert spendgate_cli("backup", str(tmp_path / "copy"), "--target", source.target).returncode == 0
    assert list((tmp_path / "copy" / "archive").glob("ledger-*.jsonl.gz")), "the backup left the archive behind"
    source.stop()
    restored_dir = tmp_path / "restored-archive"
    done = spendgate_cli("restore", str(tmp_path / "copy"), "--data-dir", str(restored_dir))
    assert done.returncode == 0, done.stderr
    shown = spendgate_cli("inspect", "archive", "--data-dir", str(restored_dir), "--json", "--limit", "2048")
    assert shown.returncode == 0, shown.stderr
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert sorted(row["reservation_id"] for row in rows) == sorted(ids)
    assert sum(row["amount"] for row in rows) == sum(1 + n % 3 for n in range(300))
    restored = sidecar_factory("restored-archive")  # serves the restored data dir
    with Client(restored.target) as client:
        assert client.balance("cus_archived").limit == 10**9
