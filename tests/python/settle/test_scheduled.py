"""Reconciliation on a schedule, through a real sidecar process that settles to the fake Stripe (a real HTTP server)
and reconciles every 200 ms: Stripe's summaries lagging behind (visibility_delay_seconds) and usage still in the
outbox never raise an alert; a divergence injected into the fake's meter data does, once, with both figures, on
WatchAlerts, the metrics and the operator page. Plus the run's bounds (customers per run, calls per second)."""

from __future__ import annotations

import html
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spendgate import _core
from spendgate.client import Client
from spendgate.config import Settings
from spendgate.settle.scheduled import Pacer, ScheduledReconcile
from spendgate.testing import Sidecar
from spendgate.testing.fake_stripe import FakeStripe
from spendgate.v1 import spendgate_pb2 as pb
from tests.python.server._alerting import Watch

from ._sidecar import create_budgets, wait_drained
from ._support import sidecar_env

if TYPE_CHECKING:
    from tests.conftest import SidecarFactory

CUSTOMERS = {"acct-calm": "cus_sched_calm", "acct-drift": "cus_sched_drift"}
HOUR_S = 3_600
GUARD_S = 60.0  # a guard against a hang, not a timing assertion
INTERVAL_MS = 200


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    # Stripe shows an event in its summaries an hour after receiving it: until the test moves the fake's clock.
    with FakeStripe(same_host=True, customers=list(CUSTOMERS.values()), visibility_delay_seconds=HOUR_S) as running:
        yield running


def reconciling(sidecar_factory: SidecarFactory, fake: FakeStripe, data_dir_name: str, **settings: object) -> Sidecar:
    env = sidecar_env(fake, reconcile_interval_ms=INTERVAL_MS)
    env.update({f"SPENDGATE_{name.upper()}": str(value) for name, value in settings.items()})
    sidecar = sidecar_factory(data_dir_name, env=env, http=True)
    create_budgets(sidecar.target, CUSTOMERS)
    return sidecar


def spend(target: str, customer: str, amounts: list[int]) -> None:
    with Client(target) as client:
        for amount in amounts:
            with client.reserve(customer, amount) as hold:
                hold.commit(amount)


def customer_page(sidecar: Sidecar, customer: str) -> str:
    with urllib.request.urlopen(f"{sidecar.http_url}/customers/{customer}", timeout=30) as response:  # loopback
        return str(response.read().decode())


def reconciled(page: str) -> dict[str, str]:
    """The cards of the page's "Reconciled with Stripe" section, by label."""
    section = page.split("<h2>Reconciled with Stripe</h2>", 1)[1]
    cards = re.findall(r'<div class="label">([^<]+)</div><div class="value[^"]*">([^<]+)</div>', section)
    return {html.unescape(label): html.unescape(value) for label, value in cards}


def wait_for_page(sidecar: Sidecar, customer: str, want: dict[str, str]) -> dict[str, str]:
    """Poll the customer page until its reconciliation cards show `want` (a later run's result)."""
    deadline = time.monotonic() + GUARD_S
    while True:
        cards = reconciled(customer_page(sidecar, customer))
        if all(cards.get(label) == value for label, value in want.items()):
            return cards
        assert time.monotonic() < deadline, f"the page never showed {want}; last: {cards}\n{sidecar.log_tail()}"
        time.sleep(0.05)


def metrics(sidecar: Sidecar) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{sidecar.http_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def runs(sidecar: Sidecar) -> float:
    return metrics(sidecar).get(("spendgate_reconcile_runs_total", (("outcome", "ok"),)), 0.0)


def wait_runs(sidecar: Sidecar, n: int) -> None:
    """At least n more runs that ran to the end."""
    target = runs(sidecar) + n
    deadline = time.monotonic() + GUARD_S
    while runs(sidecar) < target:
        assert time.monotonic() < deadline, sidecar.log_tail()
        time.sleep(0.05)


def divergence_alerts(sidecar: Sidecar) -> list[pb.Alert]:
    """Every reconcile_divergence alert so far: read from the start up to a frozen alert raised now."""
    marker = f"marker-{uuid.uuid4().hex[:8]}"
    with Client(sidecar.target) as client:
        client.set_budget(marker, 1)
        client.freeze(marker, True)
    watch = Watch(sidecar.target, from_start=True)
    try:
        deadline = time.monotonic() + GUARD_S
        while not any(a.customer_id == marker for a in watch.alerts):
            assert watch.error is None and time.monotonic() < deadline, watch.error
            time.sleep(0.05)
        return [a for a in watch.alerts if a.kind == pb.ALERT_KIND_RECONCILE_DIVERGENCE]
    finally:
        watch.close()


def test_lagging_summaries_and_usage_in_the_outbox_never_raise_an_alert(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = reconciling(sidecar_factory, fake, "lag")
    spend(sidecar.target, "acct-calm", [100, 200, 300])
    wait_drained(sidecar.target)
    # Settled, but not in Stripe's summaries yet: a shortfall the visibility allowance covers.
    cards = wait_for_page(
        sidecar, "acct-calm", {"Verdict": "not visible yet", "Ledger, settled": "600", "Stripe's meter total": "0"}
    )
    assert cards["Reconciled"].endswith("s ago")
    fake.advance_time(HOUR_S)  # now Stripe shows them
    wait_for_page(sidecar, "acct-calm", {"Verdict": "ok", "Stripe's meter total": "600"})

    # Stripe refuses meter events for a while: new usage waits in the outbox (sent, in flight), never compared.
    fake.set_faults(rate_500=1.0, fault_paths=["/v1/billing/meter_events"])
    spend(sidecar.target, "acct-calm", [1_000, 2_000])
    wait_for_page(
        sidecar, "acct-calm", {"Verdict": "ok", "Pending (in flight)": "3,000 (3,000)", "Ledger, settled": "600"}
    )
    fake.set_faults(rate_500=0.0)
    wait_drained(sidecar.target)
    wait_for_page(sidecar, "acct-calm", {"Verdict": "not visible yet", "Ledger, settled": "3,600"})
    fake.advance_time(HOUR_S)
    wait_for_page(sidecar, "acct-calm", {"Verdict": "ok", "Stripe's meter total": "3,600"})

    assert divergence_alerts(sidecar) == []
    samples = metrics(sidecar)
    assert samples[("spendgate_reconcile_divergent_customers", ())] == 0
    assert samples[("spendgate_reconcile_last_success_timestamp_seconds", ())] > time.time() - GUARD_S
    assert "not visible at Stripe yet" in sidecar.log_tail(2_000)


def test_without_the_visibility_allowance_the_same_lag_is_a_divergence(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = reconciling(sidecar_factory, fake, "noallowance", reconcile_visibility_allowance_ms=0)
    spend(sidecar.target, "acct-calm", [600])
    wait_drained(sidecar.target)
    wait_for_page(sidecar, "acct-calm", {"Verdict": "UNDER", "Stripe's meter total": "0"})
    alerts = divergence_alerts(sidecar)
    assert [(a.customer_id, a.values["stripe"], a.values["settled"]) for a in alerts] == [("acct-calm", 0, 600)]


def test_an_injected_divergence_raises_one_alert_with_both_figures(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = reconciling(sidecar_factory, fake, "drift")
    spend(sidecar.target, "acct-drift", [400, 600])
    spend(sidecar.target, "acct-calm", [50])
    wait_drained(sidecar.target)
    fake.advance_time(HOUR_S)
    wait_for_page(sidecar, "acct-drift", {"Verdict": "ok", "Stripe's meter total": "1,000"})

    # Usage spendgate never sent (timestamped by the wall clock, which the sidecar reads: the fake's is an hour ahead).
    fake.inject_meter_event("spendgate_usage", "cus_sched_drift", 500, timestamp=int(time.time()))
    cards = wait_for_page(
        sidecar, "acct-drift", {"Verdict": "OVER", "Stripe's meter total": "1,500", "Ledger, settled": "1,000"}
    )
    assert cards["Reconciled"].endswith("s ago")
    wait_runs(sidecar, 3)  # the same divergence again: no second alert
    alerts = divergence_alerts(sidecar)
    assert len(alerts) == 1, alerts
    alert = alerts[0]
    assert alert.customer_id == "acct-drift"
    assert (alert.values["stripe"], alert.values["settled"], alert.values["difference"]) == (1_500, 1_000, 500)
    assert "shows 1500 units for cus_sched_drift" in alert.message and "the ledger settled 1000" in alert.message
    assert metrics(sidecar)[("spendgate_reconcile_divergent_customers", ())] == 1
    wait_for_page(sidecar, "acct-calm", {"Verdict": "ok"})

    # It grows: a new alert with the new figures.
    fake.inject_meter_event("spendgate_usage", "cus_sched_drift", 100, timestamp=int(time.time()))
    wait_for_page(sidecar, "acct-drift", {"Verdict": "OVER", "Stripe's meter total": "1,600"})
    assert [a.values["stripe"] for a in divergence_alerts(sidecar)] == [1_500, 1_600]


# -- the bounds (an in-process engine; no Stripe calls) ---------------------------------------------------------------


def test_each_run_takes_at_most_reconcile_max_customers_and_every_customer_gets_its_turn(tmp_path: Path) -> None:
    engine = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    try:
        for n in range(5):
            engine.wait_durable(engine.set_budget(f"acct-{n}", 1_000, f"cus_{n}").ticket)
            hold = engine.reserve(f"acct-{n}", 1, "", 60_000)
            engine.wait_durable(engine.commit(hold.reservation_id, 1).ticket)
        engine.wait_durable(engine.set_budget("idle", 1_000, "cus_idle").ticket)  # nothing spent: not active
        settings = Settings(data_dir=str(tmp_path / "data"), reconcile_max_customers=2, stripe_api_key="sk_test_x")

        async def never(ticket: int) -> None:
            raise AssertionError("no alert expected")

        scheduler = ScheduledReconcile(engine, settings, never)
        chosen = [sorted(scheduler._select(time.time())[0]) for _ in range(4)]
        assert chosen == [["cus_0", "cus_1"], ["cus_2", "cus_3"], ["cus_0", "cus_4"], ["cus_1", "cus_2"]]
    finally:
        engine.close()


def test_the_pacer_spaces_calls_to_the_rate() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = Pacer(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        pacer.wait()
    assert slept == [0.25, 0.25, 0.25, 0.25] and pacer.calls == 5


def test_token_commits_are_reconciled_in_tokens_on_the_token_meter(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = reconciling(sidecar_factory, fake, "tokens")
    with Client(sidecar.target) as client:
        reserved = client.reserve_raw(
            "acct-calm", estimate=pb.TokenEstimate(model="gpt-6-sol", input_tokens=1_000, max_output_tokens=200)
        )
        assert reserved.granted, reserved
        client.commit(
            reserved.reservation_id, usage=pb.TokenUsage(input_tokens=900, output_tokens=150, reasoning_tokens=50)
        )
    wait_drained(sidecar.target)
    fake.advance_time(HOUR_S)
    wait_runs(sidecar, 2)
    assert divergence_alerts(sidecar) == []

    fake.inject_meter_event(
        "token-billing-tokens",
        "cus_sched_calm",
        5_000,
        timestamp=int(time.time()),
        dimensions={"model": "gpt-6-sol", "token_type": "input"},
    )
    deadline = time.monotonic() + GUARD_S
    while not (alerts := divergence_alerts(sidecar)):
        assert time.monotonic() < deadline, sidecar.log_tail()
        time.sleep(0.1)
    assert len(alerts) == 1, alerts
    alert = alerts[0]
    assert (alert.values["stripe"], alert.values["settled"]) == (6_100, 1_100)
    assert "token-billing-tokens shows 6100 tokens for cus_sched_calm" in alert.message
