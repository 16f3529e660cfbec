"""Exactly once on Stripe's books, through real sidecar processes killed with kill -9 under load, while the fake
Stripe fails requests (429, 500, fails after recording: a 500 or a dropped answer for an event it kept).

Afterwards, for every customer: the fake's total == the sidecar's `spent` (GetBalance after the final restart and
drain) == the units of the commits the load saw acknowledged (it retries an unanswered Commit until it is answered)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from spendgate.settle.aggregate import parse_aggregate_identifier
from spendgate.testing.fake_stripe import FakeStripe
from tests.conftest import SidecarFactory

from ._load import CommitLoad
from ._sidecar import create_budgets, spent, wait_drained
from ._support import meter_event_posts, sidecar_env

CUSTOMERS = {f"tenant-{i}": f"cus_tenant_{i}" for i in range(5)}
KILLS = 4


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(
        customers=CUSTOMERS.values(),
        same_host=True,
        seed=2024,
        rate_429=0.10,
        rate_500=0.05,
        fail_after_record_rate=0.05,
        latency_seconds=0.002,
    ) as fake:
        yield fake


def kill_under_load(
    sidecar_factory: SidecarFactory,
    fake: FakeStripe,
    name: str,
    seed: int,
    token_share: float = 0.0,
    **settings: object,
) -> CommitLoad:
    sidecar = sidecar_factory(name, env=sidecar_env(fake, **settings))
    create_budgets(sidecar.target, CUSTOMERS)
    load = CommitLoad(
        sidecar.target, list(CUSTOMERS), threads=4, pause_s=0.02, seed=seed, token_share=token_share
    ).start()
    rng = random.Random(seed)
    for kill in range(KILLS):
        time.sleep(rng.uniform(0.6, 1.4))  # commits going in, events going out, faults firing
        # Both kinds of "failed after recording": the answer is a 500, or the connection drops.
        fake.set_faults(fail_after_record_mode="drop" if kill % 2 else "500")
        sidecar.kill9()
        sidecar.start()
    time.sleep(0.5)
    load.stop()
    status = wait_drained(sidecar.target)
    stripe_totals = fake.totals_by_customer("spendgate_usage")
    books = spent(sidecar.target, CUSTOMERS)
    assert load.commits > 100, "the load should have committed something worth checking"
    assert books == load.acked  # the ledger: every acknowledged commit, nothing else
    # Nothing lost, nothing twice: plain units on the units meter, tokens on the token meter.
    assert {CUSTOMERS[c]: units for c, units in load.acked_plain.items() if units} == stripe_totals
    tokens = {
        (customer, token_type): value
        for (customer, _, token_type), value in fake.totals_by_dimensions("token-billing-tokens").items()
    }
    assert tokens == {(CUSTOMERS[c], t): n for (c, t), n in load.acked_tokens.items() if n}
    assert status.dead_letters == 0
    print(
        f"{load.commits} commits; {meter_event_posts(fake)} meter event requests; {status.delivered_events} events "
        "accepted since the last start"
    )
    assert sidecar.terminate() == 0  # SIGTERM with the settler running: a clean exit
    return load


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_kill_9_under_load_with_stripe_failing_settles_every_unit_exactly_once(
    sidecar_factory: SidecarFactory, fake: FakeStripe, transport: str
) -> None:
    # The random rates make every kind of failure likely; these make each one certain, however few requests go out.
    events_path = "/v1/billing/meter_events" if transport == "v1" else "/v2/billing/meter_event_stream"
    for kind in ("429", "500", "500_after_record", "drop_after_record"):
        fake.fail_next(kind, path=events_path)
    kill_under_load(
        sidecar_factory,
        fake,
        f"exactly-once-{transport}",
        seed=len(transport) + (transport == "v2"),
        settle_transport=transport,
        settle_batch_size=20,
    )
    faults = {r["fault"] for r in fake.request_log() if r["fault"]}
    assert {"429", "500", "500_after_record", "drop_after_record"} <= faults  # every kind of failure happened


def test_pre_aggregation_makes_fewer_calls_and_stays_exact_across_kill_9(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    load = kill_under_load(
        sidecar_factory,
        fake,
        "exactly-once-aggregated",
        seed=7,
        settle_aggregate_window_ms=250,
        settle_backoff_max_ms=200,
    )
    accepted = fake.events(status="accepted")
    assert any(parse_aggregate_identifier(ev["identifier"]) for ev in accepted)
    assert meter_event_posts(fake) < load.commits / 2  # including every retry and resend


def test_token_commits_reach_the_token_meter_exactly_once_across_kill_9(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    load = kill_under_load(
        sidecar_factory,
        fake,
        "exactly-once-tokens",
        seed=11,
        token_share=0.5,
        settle_transport="v2",
        settle_batch_size=20,
    )
    assert sum(load.acked_tokens.values()) > 0 and sum(load.acked_plain.values()) > 0
