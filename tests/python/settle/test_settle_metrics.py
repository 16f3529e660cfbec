"""Settlement in the metrics of a real sidecar process: Stripe errors by code, and the lag of delivered usage."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from spendgate.testing.fake_stripe import FakeStripe
from tests.conftest import SidecarFactory

from ..server.test_metrics import parse, sample
from ._sidecar import create_budgets, wait_drained
from ._support import sidecar_env
from .test_sidecar_settlement import GOOD, commit_each


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(customers=GOOD.values(), same_host=True) as fake:
        yield fake


def test_stripe_errors_are_counted_by_code_and_delivered_usage_by_its_lag(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    fake.fail_next("503", 2)  # two answers 503, then Stripe takes it: the settler retries within the round
    sidecar = sidecar_factory("metrics", env=sidecar_env(fake, settle_max_attempts=5), http=True)
    create_budgets(sidecar.target, GOOD)
    commit_each(sidecar.target, {"acme": [5], "globex": [7]})
    wait_drained(sidecar.target)
    with urllib.request.urlopen(f"{sidecar.http_url}/metrics", timeout=10) as response:
        samples = parse(response.read().decode())
    assert sample(samples, "spendgate_stripe_errors_total", code="http_503") == 2
    assert sample(samples, "spendgate_settlement_lag_seconds_count") == 2
    assert sample(samples, "spendgate_settlement_enabled") == 1
    assert sample(samples, "spendgate_settlement_last_success_timestamp_seconds") > 0
    assert sample(samples, "spendgate_outbox_depth") == 0
    assert fake.totals_by_customer() == {"cus_acme": 5, "cus_globex": 7}
