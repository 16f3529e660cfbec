"""Settlement says when it fails and resumes as soon as Stripe answers, through real sidecar processes and the fake
Stripe: a hanging Stripe shows at the first request's timeout (status, log, metrics), and after an outage settlement
resumes within a probe interval, whatever the backoff has grown to. Exactly once throughout."""

from __future__ import annotations

import time
import urllib.request

from spendgate.settle.settler import PROBE_INTERVAL_MS, PROBE_TIMEOUT_MS
from spendgate.testing.fake_stripe import FakeStripe
from tests.conftest import SidecarFactory

from ..server.test_metrics import Samples, parse, sample
from ._load import CommitLoad
from ._sidecar import create_budgets, spent, wait_drained, wait_for_status
from ._support import sidecar_env
from .test_sidecar_settlement import GOOD, commit_each

REQUEST_TIMEOUT_MS = 1_000
# Every request hangs this long, past the request timeout (and the probe's), as in the 40 s hang against a 30 s one.
HANG_S = 3 * REQUEST_TIMEOUT_MS / 1000
METER_EVENTS = "/v1/billing/meter_events"
OUTAGE_S = 12.0  # long enough for the backoff between rounds to grow far past the probe interval
BACKOFF_BASE_MS = 50
BACKOFF_MAX_MS = 30_000  # the default: without probes, resuming could wait up to this long
MAX_ATTEMPTS = 5


def metrics_of(http_url: str) -> Samples:
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def test_a_hanging_stripe_is_a_failure_as_soon_as_a_request_times_out(sidecar_factory: SidecarFactory) -> None:
    assert HANG_S * 1000 > max(REQUEST_TIMEOUT_MS, PROBE_TIMEOUT_MS)
    with FakeStripe(customers=GOOD.values(), same_host=True) as fake:
        env = sidecar_env(fake, settle_request_timeout_ms=REQUEST_TIMEOUT_MS)
        sidecar = sidecar_factory("hang", env=env, http=True)
        create_budgets(sidecar.target, GOOD)
        commit_each(sidecar.target, {"acme": [5], "globex": [7]})
        wait_drained(sidecar.target)  # the customers are checked and cached: the next round only sends

        hang_started = fake.now()
        fake.set_faults(latency_seconds=HANG_S)
        commit_each(sidecar.target, {"acme": [11]})
        failing = wait_for_status(sidecar.target, lambda s: s.failing_since_ms > 0, "the hang showing as a failure")
        assert "did not answer within the request timeout (settle_request_timeout_ms)" in failing.last_error
        assert failing.last_error_ms >= failing.failing_since_ms > hang_started * 1000
        sends = [r["time"] for r in fake.request_log() if r["path"] == METER_EVENTS and r["time"] >= hang_started]
        # Declared at the first request's timeout, not when a round of retries ends: before any second send.
        assert sends and (len(sends) == 1 or failing.failing_since_ms / 1000 < sends[1]), (failing, sends)
        log = sidecar.log_tail(200)
        assert "settlement to Stripe is failing (a request to Stripe timed out)" in log, log
        assert sample(metrics_of(sidecar.http_url), "spendgate_settlement_failing") == 1
        assert sample(metrics_of(sidecar.http_url), "spendgate_stripe_errors_total", code="timeout") >= 1

        fake.set_faults(latency_seconds=0.0)
        status = wait_drained(sidecar.target)
        status = wait_for_status(sidecar.target, lambda s: s.failing_since_ms == 0, "the recovery")
        assert status.dead_letters == 0
        # Exactly once: the timed-out sends were recorded by the fake after the client gave up; their resends are
        # duplicates (same identifier), counted once.
        books = spent(sidecar.target, GOOD)
        assert books == {"acme": 16, "globex": 7}
        assert fake.totals_by_customer() == {GOOD[c]: units for c, units in books.items()}
        assert "settlement to Stripe recovered" in sidecar.log_tail(200)
        samples = metrics_of(sidecar.http_url)
        probes = [sample(samples, "spendgate_settle_probes_total", outcome=o) for o in ("answered", "failed")]
        assert sum(probes) >= 1, probes  # the pause after the failed round probed


def test_after_an_outage_v2_settlement_resumes_within_a_probe_interval_not_a_backoff(
    sidecar_factory: SidecarFactory,
) -> None:
    """The bound: while settlement fails the settler waits on Stripe in two ways only. Between rounds it sleeps, and
    probes at most every PROBE_INTERVAL_MS (a failed probe against a 503 answers at once); within a round a call
    sleeps at most min(max, base * 2^(attempts-2)) before its last attempt. So the first request Stripe answers after
    the outage ends comes within the larger of the two, plus nothing else that waits: a round's own work (engine
    reads, the claim, the send) happens after that answer and is measured separately."""
    in_call_s = min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (MAX_ATTEMPTS - 2)) / 1000
    bound_s = max(PROBE_INTERVAL_MS / 1000, in_call_s)
    with FakeStripe(customers=GOOD.values(), same_host=True) as fake:
        env = sidecar_env(
            fake,
            settle_transport="v2",
            settle_backoff_base_ms=BACKOFF_BASE_MS,
            settle_backoff_max_ms=BACKOFF_MAX_MS,
            settle_max_attempts=MAX_ATTEMPTS,
        )
        sidecar = sidecar_factory("recover-v2", env=env, http=True)
        create_budgets(sidecar.target, GOOD)
        load = CommitLoad(sidecar.target, list(GOOD), threads=2, pause_s=0.05, seed=15).start()
        try:
            wait_for_status(sidecar.target, lambda s: s.delivered_events > 0, "a first delivery")
            fake.start_outage("503")
            try:
                wait_for_status(sidecar.target, lambda s: s.failing_since_ms > 0, "the outage showing as a failure")
                time.sleep(OUTAGE_S)
            finally:
                back = fake.now()
                fake.end_outage()
            wait_for_status(sidecar.target, lambda s: s.failing_since_ms == 0, "the recovery")
        finally:
            load.stop()
        answered = [r["time"] for r in fake.request_log() if r["time"] >= back and r["status"] == 200]
        resumed = min(ev["received_at"] for ev in fake.events() if ev["received_at"] >= back)
        assert answered and min(answered) - back <= bound_s, (min(answered) - back, bound_s)
        assert resumed >= min(answered)

        status = wait_drained(sidecar.target)
        assert status.dead_letters == 0
        books = spent(sidecar.target, GOOD)
        assert books == load.acked
        assert fake.totals_by_customer() == {GOOD[c]: units for c, units in books.items() if units}
        probes = sample(metrics_of(sidecar.http_url), "spendgate_settle_probes_total", outcome="failed")
        assert probes >= 1 and probes <= OUTAGE_S / (PROBE_INTERVAL_MS / 1000) + 2  # the probes' rate is bounded
