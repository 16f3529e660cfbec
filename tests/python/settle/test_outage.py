"""A 60-second Stripe outage loses nothing: commits keep being accepted, the outbox grows, and it drains after."""

from __future__ import annotations

import time

from spendgate.testing.fake_stripe import FakeStripe
from tests.conftest import SidecarFactory

from ._load import CommitLoad
from ._sidecar import create_budgets, settlement_status, spent, wait_drained, wait_for_status
from ._support import sidecar_env

CUSTOMERS = {"outage-a": "cus_outage_a", "outage-b": "cus_outage_b"}
OUTAGE_S = 60.0


def test_a_60_second_stripe_outage_loses_nothing(sidecar_factory: SidecarFactory) -> None:
    with FakeStripe(customers=CUSTOMERS.values(), same_host=True) as fake:
        sidecar = sidecar_factory("outage", env=sidecar_env(fake, settle_backoff_max_ms=2_000))
        create_budgets(sidecar.target, CUSTOMERS)
        load = CommitLoad(sidecar.target, list(CUSTOMERS), threads=2, pause_s=0.05, seed=60).start()
        wait_for_status(sidecar.target, lambda s: s.delivered_events > 0, "a first delivery")

        outage = fake.outage(OUTAGE_S, mode="refuse")  # nothing listens: connections are refused
        try:
            commits_before = load.commits
            failing = wait_for_status(
                sidecar.target,
                lambda s: s.failing_since_ms > 0 and s.outbox_depth > 20,
                "the outbox growing while Stripe is down",
                deadline_s=OUTAGE_S / 2,
            )
            assert failing.last_error and failing.enabled
            assert load.commits > commits_before  # commits keep being accepted
            deepest = wait_for_status(
                sidecar.target,
                lambda s: s.outbox_depth > failing.outbox_depth,
                "the outbox growing further",
                deadline_s=OUTAGE_S / 2,
            )
        finally:
            # The outage ends on its own timer; wait for it (bounded) rather than cutting it short.
            deadline = time.monotonic() + OUTAGE_S + 10
            while fake.faults()["outage"] is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            outage.end()
        load.stop()
        status = wait_drained(sidecar.target, deadline_s=60)
        assert status.dead_letters == 0 and status.failing_since_ms == 0
        books = spent(sidecar.target, CUSTOMERS)
        assert books == load.acked
        assert fake.totals_by_customer() == {CUSTOMERS[c]: units for c, units in books.items() if units}
        assert deepest.outbox_depth > 20 and settlement_status(sidecar.target).delivered_entries >= deepest.outbox_depth
        log = sidecar.log_tail(200)
        assert "settlement to Stripe is failing" in log and "settlement to Stripe recovered" in log
