"""With the defaults, a backlog in the outbox goes out as one event per Stripe customer (and model) per second
(settle_auto_aggregate), through real sidecar processes killed with kill -9 while the fake Stripe fails requests:
exactly once, plain units and tokens, and one event per commit again once the backlog is gone."""

from __future__ import annotations

import collections
import random
import re
import time
from collections.abc import Iterator

import pytest

from spendgate.settle.aggregate import parse_aggregate_identifier
from spendgate.settle.settler import AUTO_AGGREGATE_ON_ROUNDS, AUTO_AGGREGATE_WINDOW_MS
from spendgate.testing.fake_stripe import FakeStripe
from spendgate.v1 import spendgate_pb2 as pb
from tests.conftest import SidecarFactory

from ._load import CommitLoad, call_until_ok, stubs
from ._sidecar import create_budgets, spent, wait_for_status
from ._support import sidecar_env
from .test_exactly_once import CUSTOMERS

# Small rounds, so that a backlog worth aggregating builds in seconds: a round reads batch x concurrency entries.
BATCH, CONCURRENCY = 10, 2
ROUND = BATCH * CONCURRENCY
KILLS = 3
# A token aggregate's events: <first member's identifier>-tagg<count>-<token type> (aggregate.py).
TOKEN_AGGREGATE = re.compile(r"^(?P<base>.+-tagg(?P<count>\d+))-[a-z_]+$")


def count_of(identifier: str) -> int:
    """Commits an aggregate event covers (units: -agg<count>x...; tokens: -tagg<count>-<type>)."""
    units = parse_aggregate_identifier(identifier)
    if units is not None:
        return units.count
    tokens = TOKEN_AGGREGATE.match(identifier)
    assert tokens is not None, identifier
    return int(tokens["count"])


def commit_one(target: str, customer: str) -> str:
    channel, budget, _ = stubs(target)
    with channel:
        held = call_until_ok(budget.Reserve, pb.ReserveRequest(customer_id=customer, amount=3))
        assert held.granted, held
        call_until_ok(budget.Commit, pb.CommitRequest(reservation_id=held.reservation_id, amount=3))
        return held.reservation_id


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    """Stripe failing requests, as in test_exactly_once: 429s, 500s, and failures after recording."""
    with FakeStripe(
        customers=CUSTOMERS.values(),
        same_host=True,
        seed=2024,
        rate_429=0.10,
        rate_500=0.05,
        fail_after_record_rate=0.05,
        latency_seconds=0.002,
    ) as running:
        yield running


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_a_backlog_goes_out_per_customer_per_second_exactly_once_across_kill_9(
    sidecar_factory: SidecarFactory, fake: FakeStripe, transport: str
) -> None:
    sidecar = sidecar_factory(
        f"keeping-up-{transport}",
        env=sidecar_env(fake, settle_transport=transport, settle_batch_size=BATCH, settle_concurrency=CONCURRENCY),
    )
    create_budgets(sidecar.target, CUSTOMERS)
    fake.start_outage("503")  # the backlog builds while Stripe is down
    # Two busy customers: many commits per customer and second, as a sidecar near its top rate has.
    busy = list(CUSTOMERS)[:2]
    load = CommitLoad(sidecar.target, busy, threads=4, pause_s=0.0, seed=31, token_share=0.3).start()
    try:
        backlog = round(8 * AUTO_AGGREGATE_ON_ROUNDS * ROUND)
        wait_for_status(sidecar.target, lambda s: s.outbox_depth >= backlog, f"a backlog of {backlog} entries")
        shown = wait_for_status(sidecar.target, lambda s: s.auto_aggregating, "the status showing the aggregation")
        assert shown.auto_aggregate
    finally:
        load.stop()
        fake.end_outage()
    rng = random.Random(31)
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.05, 0.4))  # aggregates claimed, sent, answered or failing, acknowledged
        sidecar.kill9()
        sidecar.start()
    status = wait_for_status(
        sidecar.target,
        lambda s: s.outbox_depth == 0 and not s.auto_aggregating,
        "the backlog drained and one event per commit again",
    )
    assert status.auto_aggregate

    books = spent(sidecar.target, busy)
    assert books == load.acked
    assert {CUSTOMERS[c]: u for c, u in load.acked_plain.items() if u} == fake.totals_by_customer("spendgate_usage")
    tokens = {
        (customer, token_type): value
        for (customer, _, token_type), value in fake.totals_by_dimensions("token-billing-tokens").items()
    }
    assert tokens == {(CUSTOMERS[c], t): n for (c, t), n in load.acked_tokens.items() if n}
    assert status.dead_letters == 0

    accepted = fake.events(status="accepted")
    aggregates = [
        ev for ev in accepted if parse_aggregate_identifier(ev["identifier"]) or TOKEN_AGGREGATE.match(ev["identifier"])
    ]
    assert aggregates, "the backlog went out in aggregates"
    covered = sum(count_of(ev["identifier"]) for ev in aggregates)
    assert covered >= load.commits / 2, (covered, load.commits)  # most commits went out in aggregates
    # One event per Stripe customer (and model, and token type) per window, whatever the kills and faults did: a
    # resent aggregate keeps its identifier, so Stripe counted it once.
    windows = collections.Counter(
        (ev["event_name"], ev["customer"], tuple(sorted(ev["dimensions"].items())), ev["timestamp"])
        for ev in aggregates
    )
    assert max(windows.values()) == 1, [key for key, n in windows.items() if n > 1][:3]
    log = sidecar.log_tail(2000)
    assert f"sending one event per Stripe customer (and model) per {AUTO_AGGREGATE_WINDOW_MS} ms" in log
    # The backlog is gone: a commit goes out as its own event again (status says so too, above). The log line that
    # says so may belong to a process a kill ended before it logged.
    lone = commit_one(sidecar.target, busy[0])
    wait_for_status(sidecar.target, lambda s: s.outbox_depth == 0, "the new commit settled")
    assert f"sg-{lone}" in {ev["identifier"] for ev in fake.events(status="accepted")}
