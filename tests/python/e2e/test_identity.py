"""Identity: no id that leaves a sidecar is ever issued twice, across data dirs, restores and requeues, so Stripe never
drops one sidecar's usage as another's duplicate and no reservation id lands on someone else's hold.

Every test runs real `spendgate serve` processes against the fake Stripe, and `spendgate restore` as a separate process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from spendgate import datacare
from spendgate.client import Client, HoldEnded
from spendgate.testing.fake_stripe import FakeStripe
from spendgate.v1 import spendgate_pb2 as pb
from tests.conftest import SidecarFactory
from tests.python.settle._load import call_until_ok, stubs
from tests.python.settle._sidecar import create_budgets, spent, wait_drained, wait_for_status
from tests.python.settle._support import no_stripe_env, sidecar_env, spendgate_cli

COMMITS_PER_SIDECAR = 40


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(customers=["cus_a", "cus_b", "cus_dr"], same_host=True) as running:
        yield running


def commit(target: str, customer: str, amount: int) -> str:
    channel, budget, _ = stubs(target)
    with channel:
        reply = call_until_ok(budget.Reserve, pb.ReserveRequest(customer_id=customer, amount=amount))
        assert reply.granted, reply
        call_until_ok(budget.Commit, pb.CommitRequest(reservation_id=reply.reservation_id, amount=amount))
        return reply.reservation_id


def test_two_sidecars_on_one_stripe_account_both_reach_stripe_in_full(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    a = sidecar_factory("a", env=sidecar_env(fake))
    b = sidecar_factory("b", env=sidecar_env(fake))
    create_budgets(a.target, {"tenant-a": "cus_a"})
    create_budgets(b.target, {"tenant-b": "cus_b"})
    ids = {"a": set(), "b": set()}
    for n in range(COMMITS_PER_SIDECAR):  # the same hold counters on both sides: 1, 2, 3 ...
        ids["a"].add(commit(a.target, "tenant-a", 1 + n % 3))
        ids["b"].add(commit(b.target, "tenant-b", 1 + n % 3))
    assert not ids["a"] & ids["b"], "two data dirs issued the same reservation id"
    wait_drained(a.target)
    wait_drained(b.target)
    acknowledged = sum(1 + n % 3 for n in range(COMMITS_PER_SIDECAR))
    assert fake.totals_by_customer() == {"cus_a": acknowledged, "cus_b": acknowledged}
    assert fake.duplicates_rejected == 0
    # A reservation id of one sidecar is never a hold of the other.
    channel, budget, _ = stubs(b.target)
    with channel, pytest.raises(grpc.RpcError) as refused:
        budget.Commit(pb.CommitRequest(reservation_id=sorted(ids["a"])[0], amount=1), timeout=15)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "issued by spendgate instance" in (refused.value.details() or "")


def test_backup_commits_restore_commits_stripe_holds_every_acknowledged_unit_once(
    sidecar_factory: SidecarFactory, fake: FakeStripe, tmp_path: Path
) -> None:
    # Settlement off first, so that the backup holds an outbox entry the old data dir settles after the backup.
    sidecar = sidecar_factory("dr", env=no_stripe_env())
    create_budgets(sidecar.target, {"dr": "cus_dr"})
    commit(sidecar.target, "dr", 100)
    backup = tmp_path / "backup"
    backed_up = spendgate_cli("backup", str(backup), "--target", sidecar.target, env=no_stripe_env())
    assert backed_up.returncode == 0, backed_up.stderr
    assert (backup / "data.mdb").stat().st_mode & 0o777 == 0o600

    sidecar.stop()
    sidecar._env = sidecar_env(fake)  # the same data dir, now settling
    sidecar.start()
    commit(sidecar.target, "dr", 200)
    with Client(sidecar.target) as client:
        in_flight = client.reserve("dr", 450)  # an app's call in flight when the disk dies
    wait_drained(sidecar.target)
    assert fake.totals_by_customer() == {"cus_dr": 300}

    sidecar.stop()
    restored = spendgate_cli(
        "restore", str(backup), "--data-dir", str(sidecar.data_dir), "--force", env=no_stripe_env()
    )
    assert restored.returncode == 0, restored.stderr
    sidecar.start()
    new_id = commit(sidecar.target, "dr", 300)
    assert new_id != in_flight.reservation_id
    channel, budget, _ = stubs(sidecar.target)
    with channel, pytest.raises(grpc.RpcError) as refused:
        budget.Commit(pb.CommitRequest(reservation_id=in_flight.reservation_id, amount=450), timeout=15)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, "a pre-restore id never lands on another hold"
    wait_drained(sidecar.target)
    # 100 (resent from the backup, deduplicated by Stripe), 200 (committed after the backup), 300 (after the restore).
    assert fake.totals_by_customer() == {"cus_dr": 600}
    assert fake.duplicates_rejected == 1
    assert spent(sidecar.target, ["dr"]) == {"dr": 400}, "the books are the backup's, plus what came after"


def _restore_crashing_at(step: str, source: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`restore` in a child process that dies (exit 137, as kill -9 would leave it) right after `step`."""
    program = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from spendgate import datacare\n"
        f"def crash(name):\n    if name == {step!r}: os._exit(137)\n"
        "datacare._reached = crash\n"
        f"datacare.restore(Path({str(source)!r}), Path({str(data_dir)!r}), force=True, map_size_mb=64)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(datacare.__file__).parents[1]), env.get("PYTHONPATH")) if p
    )
    return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)


def _limit_of(data_dir: Path) -> int:
    from spendgate import _core

    engine = _core.Engine(str(data_dir), durability="relaxed", map_size_mb=64)
    try:
        return engine.balance("dr").limit
    finally:
        engine.close()


@pytest.mark.parametrize("step", datacare.RESTORE_STEPS[:-1])
def test_a_restore_killed_after_any_step_leaves_old_or_restored_data_and_serve_refuses_until_it_is_finished(
    sidecar_factory: SidecarFactory, tmp_path: Path, step: str
) -> None:
    sidecar = sidecar_factory("crash", env=no_stripe_env())
    create_budgets(sidecar.target, {"dr": "cus_dr"}, limit=100)
    backup = tmp_path / "backup"
    assert spendgate_cli("backup", str(backup), "--target", sidecar.target, env=no_stripe_env()).returncode == 0
    create_budgets(sidecar.target, {"dr": "cus_dr"}, limit=111)  # the live data differs from the backup
    sidecar.stop()

    crashed = _restore_crashing_at(step, backup, sidecar.data_dir)
    assert crashed.returncode == 137, crashed.stderr
    assert _limit_of(sidecar.data_dir) in (100, 111), "the data dir is the old one or the restored one"
    refused = spendgate_cli(
        "serve", "--data-dir", str(sidecar.data_dir), "--listen", "127.0.0.1:0", env=no_stripe_env(), timeout_s=60
    )
    assert refused.returncode != 0 and "did not finish" in refused.stderr, refused.stderr

    finished = spendgate_cli(
        "restore", str(backup), "--data-dir", str(sidecar.data_dir), "--force", env=no_stripe_env()
    )
    assert finished.returncode == 0, finished.stderr
    sidecar.start()
    channel, budget, _ = stubs(sidecar.target)
    with channel:
        assert call_until_ok(budget.GetBalance, pb.GetBalanceRequest(customer_id="dr")).limit == 100
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("crash."))
    assert any(".before-restore-" in name or ".interrupted-restore-" in name for name in kept), kept


def test_serve_does_not_recreate_a_data_dir_that_a_restore_says_existed(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    sidecar = sidecar_factory("gone", env=no_stripe_env())
    create_budgets(sidecar.target, {"dr": "cus_dr"})
    sidecar.stop()
    sidecar.data_dir.rename(sidecar.data_dir.with_name("gone.before-restore-20261202T000000Z"))
    refused = spendgate_cli(
        "serve", "--data-dir", str(sidecar.data_dir), "--listen", "127.0.0.1:0", env=no_stripe_env(), timeout_s=60
    )
    assert refused.returncode != 0 and "says it existed" in refused.stderr, refused.stderr
    assert not sidecar.data_dir.exists()


def test_every_requeue_of_a_dead_letter_goes_out_under_a_fresh_identifier(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = sidecar_factory("requeues", env=sidecar_env(fake))
    create_budgets(sidecar.target, {"initech": "cus_initech"})  # Stripe does not know cus_initech yet
    commit(sidecar.target, "initech", 42)
    identifiers = []
    for round_ in range(3):
        status = wait_for_status(sidecar.target, lambda s: s.dead_letters == 1, f"dead letter, round {round_}")
        assert status.outbox_depth == 0
        channel, _, admin = stubs(sidecar.target)
        with channel:
            (letter,) = call_until_ok(admin.ListDeadLetters, pb.ListDeadLettersRequest()).dead_letters
        assert letter.requeues == round_ and not letter.fate_unknown, letter
        identifiers.append(letter.identifier)
        if round_ == 2:
            fake.add_customer("cus_initech")  # the fix, before the last requeue
        requeued = spendgate_cli(
            "deadletter", "requeue", str(letter.seq), "--target", sidecar.target, env=no_stripe_env()
        )
        assert requeued.returncode == 0, requeued.stderr
    wait_for_status(sidecar.target, lambda s: s.outbox_depth == 0 and s.dead_letters == 0, "delivery")
    assert len(set(identifiers)) == 3 and identifiers[1].endswith("-requeue1") and identifiers[2].endswith("-requeue2")
    assert [e["identifier"] for e in fake.events()] == [identifiers[0].split("-requeue")[0] + "-requeue3"]
    assert fake.totals_by_customer() == {"cus_initech": 42}


def test_a_replay_of_a_released_or_expired_hold_is_denied_and_the_client_raises(
    sidecar_factory: SidecarFactory,
) -> None:
    sidecar = sidecar_factory("replays", env=no_stripe_env())
    with Client(sidecar.target) as client:
        client.set_budget("cus_r", 1_000)
        hold = client.reserve("cus_r", 250, idempotency_key="job-1")
        hold.release()
        with pytest.raises(HoldEnded) as ended:
            client.reserve("cus_r", 250, idempotency_key="job-1")
        assert ended.value.state == pb.HOLD_STATE_RELEASED and ended.value.reason == pb.DENY_REASON_HOLD_ENDED
        assert "new idempotency_key" in str(ended.value)

        short = client.reserve_raw("cus_r", 400, idempotency_key="job-2", ttl_ms=1_000)
        assert short.granted
        full = None
        deadline = time.monotonic() + 30  # the hold expires after 1 s; a hang guard, not a timing assertion
        while time.monotonic() < deadline:
            full = client.reserve_raw("cus_r", 1_000)
            if full.granted:
                break
            time.sleep(0.05)
        assert full is not None and full.granted, "the expired hold's units came back"
        replay = client.reserve_raw("cus_r", 400, idempotency_key="job-2", ttl_ms=1_000)
        assert (replay.granted, replay.reason, replay.state) == (
            False,
            pb.DENY_REASON_HOLD_ENDED,
            pb.HOLD_STATE_EXPIRED,
        )
        balance = client.balance("cus_r")
        assert (balance.spent, balance.reserved) == (0, 1_000), "the full hard budget was not overspent"
