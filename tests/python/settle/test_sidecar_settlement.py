"""Settlement as operators meet it, through real sidecar processes and the `spendgate` command: on and off, the
status, the dead letters and their requeue, and `spendgate settle` on its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from spendgate.testing.fake_stripe import FakeStripe
from spendgate.v1 import spendgate_pb2 as pb
from tests.conftest import SidecarFactory

from ._load import call_until_ok, stubs
from ._sidecar import create_budgets, settlement_status, spent, wait_drained, wait_for_status
from ._support import no_stripe_env, sidecar_env, spendgate_cli

GOOD = {"acme": "cus_acme", "globex": "cus_globex"}


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(customers=GOOD.values(), same_host=True) as fake:
        yield fake


def commit_each(target: str, amounts: dict[str, list[int]]) -> None:
    channel, budget, _ = stubs(target)
    with channel:
        for customer, values in amounts.items():
            for amount in values:
                reply = call_until_ok(budget.Reserve, pb.ReserveRequest(customer_id=customer, amount=amount))
                assert reply.granted
                call_until_ok(budget.Commit, pb.CommitRequest(reservation_id=reply.reservation_id, amount=amount))


def test_without_a_key_the_sidecar_runs_says_settlement_is_off_and_usage_accumulates(
    sidecar_factory: SidecarFactory,
) -> None:
    sidecar = sidecar_factory("no-key", env=no_stripe_env())
    create_budgets(sidecar.target, GOOD)
    commit_each(sidecar.target, {"acme": [5, 6], "globex": [7]})
    status = settlement_status(sidecar.target)
    assert not status.enabled and status.outbox_depth == 3 and status.oldest_age_ms >= 0
    log = sidecar.log_tail()
    assert "settlement to Stripe is OFF: STRIPE_API_KEY is not set" in log and "accumulates in the outbox" in log
    shown = spendgate_cli("settle", "status", "--target", sidecar.target, env=no_stripe_env())
    assert shown.returncode == 0 and "NO (no STRIPE_API_KEY" in shown.stdout and "3 of 10000000" in shown.stdout


def test_a_restricted_key_settles_and_the_status_shows_it(sidecar_factory: SidecarFactory, fake: FakeStripe) -> None:
    sidecar = sidecar_factory("rk", env=sidecar_env(fake, api_key="rk_test_spendgate_meter_writer"))
    create_budgets(sidecar.target, GOOD)
    commit_each(sidecar.target, {"acme": [5, 6], "globex": [7]})
    status = wait_drained(sidecar.target)
    assert status.enabled and status.transport == "v1" and status.event_name == "spendgate_usage"
    assert status.delivered_entries == 3 and status.last_success_ms > 0 and status.last_error == ""
    assert fake.totals_by_customer() == {"cus_acme": 11, "cus_globex": 7}
    log = sidecar.log_tail()
    assert "a restricted test key (rk_test_...)" in log and "rk_test_spendgate_meter_writer" not in log
    shown = spendgate_cli("settle", "status", "--target", sidecar.target, env=no_stripe_env())
    assert shown.returncode == 0, shown.stderr
    assert "enabled" in shown.stdout and "yes" in shown.stdout and "3 entries since start" in shown.stdout


def test_a_bad_customer_goes_to_the_dead_letters_others_flow_and_a_requeue_after_the_fix_delivers_once(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = sidecar_factory("dead-letters", env=sidecar_env(fake))
    create_budgets(sidecar.target, GOOD | {"initech": "cus_initech"})  # Stripe does not know cus_initech yet
    commit_each(sidecar.target, {"acme": [5], "initech": [40, 2], "globex": [7]})
    wait_for_status(sidecar.target, lambda s: s.outbox_depth == 0 and s.dead_letters == 2, "dead letters")
    assert fake.totals_by_customer() == {"cus_acme": 5, "cus_globex": 7}  # the others were not held back

    env = no_stripe_env()
    listed = spendgate_cli("deadletter", "list", "--target", sidecar.target, env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("stripe_customer_id=cus_initech") == 2
    assert "reason: Stripe has no customer 'cus_initech'" in listed.stdout
    channel, _, admin = stubs(sidecar.target)
    with channel:
        letters = call_until_ok(admin.ListDeadLetters, pb.ListDeadLettersRequest()).dead_letters
    assert sorted(letter.amount for letter in letters) == [2, 40] and all(letter.reason for letter in letters)

    fake.add_customer("cus_initech")  # the fix
    requeued = spendgate_cli("deadletter", "requeue", str(letters[0].seq), "--target", sidecar.target, env=env)
    assert requeued.returncode == 0 and f"requeued seq {letters[0].seq}" in requeued.stdout
    requeued = spendgate_cli("deadletter", "requeue", "--all", "--target", sidecar.target, env=env)
    assert requeued.returncode == 0 and f"requeued seq {letters[1].seq}" in requeued.stdout
    wait_for_status(sidecar.target, lambda s: s.outbox_depth == 0 and s.dead_letters == 0, "the requeued letters")
    assert fake.totals_by_customer() == {"cus_acme": 5, "cus_globex": 7, "cus_initech": 42}
    assert spent(sidecar.target, ["initech"]) == {"initech": 42}
    missing = spendgate_cli("deadletter", "requeue", "999999", "--target", sidecar.target, env=env)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_spendgate_settle_drains_a_stopped_sidecars_outbox_and_refuses_a_running_ones_data_dir(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = sidecar_factory("standalone", env=no_stripe_env())  # runs without a key: usage accumulates
    create_budgets(sidecar.target, GOOD)
    commit_each(sidecar.target, {"acme": [1, 2, 3], "globex": [4]})
    settle_env = sidecar_env(fake, settle_transport="v2")
    data_dir = str(sidecar.data_dir)

    refused = spendgate_cli("settle", "--data-dir", data_dir, env=settle_env)
    assert refused.returncode == 1
    assert "is in use by another spendgate process" in refused.stderr and "settles by itself" in refused.stderr
    assert fake.events() == []

    assert sidecar.terminate() == 0
    drained = spendgate_cli("settle", "--data-dir", data_dir, env=settle_env)
    assert drained.returncode == 0, drained.stderr
    assert "settled 4 meter events (4 outbox entries)" in drained.stdout and "holds 0 entries" in drained.stdout
    assert fake.totals_by_customer() == {"cus_acme": 6, "cus_globex": 4}

    sidecar.start()
    assert settlement_status(sidecar.target).outbox_depth == 0


def test_a_key_that_cannot_work_stops_serve_with_a_clear_message(tmp_path: object, fake: FakeStripe) -> None:
    env = sidecar_env(fake, api_key="pk_test_publishable")
    result = spendgate_cli("serve", "--data-dir", f"{tmp_path}/data", "--listen", "127.0.0.1:0", env=env)
    assert result.returncode == 2
    assert "STRIPE_API_KEY: expected a secret key (sk_...) or a restricted key (rk_...)" in result.stderr
    assert "pk_test_publishable" not in result.stderr


def test_settle_settings_the_settler_cannot_use_stop_serve_naming_the_setting(tmp_path: object) -> None:
    result = spendgate_cli(
        "serve",
        "--data-dir",
        f"{tmp_path}/data",
        "--listen",
        "127.0.0.1:0",
        "--settle-batch-size",
        "101",
        env=no_stripe_env(),
    )
    assert result.returncode == 2 and "settle_batch_size: expected 1..=100" in result.stderr


def test_spendgate_settle_without_a_key_says_so(tmp_path: object) -> None:
    result = spendgate_cli("settle", "--data-dir", f"{tmp_path}/data", env=no_stripe_env())
    assert result.returncode == 2 and "STRIPE_API_KEY is not set" in result.stderr
