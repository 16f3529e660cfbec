"""The alert webhook through real sidecar processes and a real HTTP receiver on a loopback port: signatures, retries
in order, a 400 skipped, the durable cursor across kill -9, a stuck receiver that never slows the RPCs, and the
settings it needs."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio
import pytest

from spendgate.alerts import SignatureVerificationError, verify_signature
from spendgate.server.app import Sidecar as AppSidecar
from spendgate.testing import SidecarError
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc
from tests.python.e2e._support import new_customer
from tests.python.server._alerting import (
    WEBHOOK_SECRET,
    Alerting,
    AlertReceiver,
    Received,
    alert_cursor_of,
    sidecar_env,
    wait_until,
)
from tests.python.server.test_app import create_budget, settings_for, with_sidecar
from tests.python.server.test_metrics import Samples, sample, scrape

if TYPE_CHECKING:
    from spendgate.testing import Sidecar
    from tests.conftest import SidecarFactory

# Retries fast, so that a test with failures stays short (the sender's behaviour does not depend on the numbers).
FAST_RETRIES = ("--alert-webhook-backoff-base-ms", "5", "--alert-webhook-backoff-max-ms", "50")


def webhook_sidecar(
    sidecar_factory: SidecarFactory, name: str, receiver: AlertReceiver, extra: Sequence[str] = ()
) -> Sidecar:
    return sidecar_factory(
        name,
        extra_args=["--alert-webhook-url", receiver.url, *FAST_RETRIES, *extra],
        env=sidecar_env(SPENDGATE_ALERT_WEBHOOK_SECRET=WEBHOOK_SECRET),
    )


def seqs(received: list[Received]) -> list[int]:
    return [r.seq for r in received]


def test_alerts_arrive_signed_in_order_and_verify_only_with_the_secret(sidecar_factory: SidecarFactory) -> None:
    with AlertReceiver() as receiver:
        sidecar = webhook_sidecar(sidecar_factory, "signed", receiver)
        customer = new_customer()
        with Alerting(sidecar.target) as conn:
            conn.set_budget(customer, 100)
            conn.limit_reached(customer)
            conn.toggle(customer, 2)
        got = receiver.wait_for_accepted(3)
    assert seqs(got) == [1, 2, 3]
    assert [r.alert["kind"] for r in got] == ["limit_reached", "frozen", "unfrozen"]
    for r in got:
        assert r.content_type == "application/json"
        verify_signature(r.body, r.signature, WEBHOOK_SECRET)
        with pytest.raises(SignatureVerificationError):
            verify_signature(r.body, r.signature, "not-the-secret-the-sidecar-signs-with")
        assert set(r.alert) == {"id", "seq", "kind", "customer_id", "ts_ms", "message", "values"}
        instance, seq = r.alert["id"].removeprefix("alert_").split("_")  # unique across sidecars and restores
        assert len(instance) == 16 and int(seq) == r.seq and r.alert["customer_id"] == customer
    assert got[0].alert["values"]["limit"] == 100


def test_a_failing_receiver_still_gets_every_alert_in_order(sidecar_factory: SidecarFactory) -> None:
    failures = 7  # more than one alert's worth of retries: 500s, a 429, then 503s
    calls = {"n": 0}

    def flaky(alert: dict[str, Any], attempt: int) -> int:
        calls["n"] += 1
        if calls["n"] <= failures:
            return 429 if calls["n"] == 3 else 500 if calls["n"] < 5 else 503
        return 200

    with AlertReceiver(flaky) as receiver:
        sidecar = webhook_sidecar(sidecar_factory, "flaky", receiver, ["--alert-webhook-max-attempts", "2"])
        customer = new_customer()
        with Alerting(sidecar.target) as conn:
            conn.set_budget(customer, 1_000)
            conn.toggle(customer, 6)
        accepted = receiver.wait_for_accepted(6)
        everything = receiver.received
    assert seqs(accepted) == [1, 2, 3, 4, 5, 6]
    # In order: an alert is retried until it is accepted before the next one goes.
    assert seqs(everything) == sorted(seqs(everything))
    assert len(everything) == 6 + failures
    assert "failed 2 times in a row" in sidecar.log_tail(200)


def test_a_400_skips_that_alert_and_delivery_goes_on(sidecar_factory: SidecarFactory) -> None:
    refused = new_customer("refused")

    def picky(alert: dict[str, Any], attempt: int) -> int:
        return 400 if alert["customer_id"] == refused else 200

    with AlertReceiver(picky) as receiver:
        sidecar = webhook_sidecar(sidecar_factory, "picky", receiver)
        fine = new_customer("fine")
        with Alerting(sidecar.target) as conn:
            conn.set_budget(fine, 1_000)
            conn.set_budget(refused, 1_000)
            conn.toggle(fine)
            conn.toggle(refused)
            conn.toggle(fine)
        receiver.wait_for_accepted(2)
        everything = receiver.received
    assert [(r.seq, r.status) for r in everything] == [(1, 200), (2, 400), (3, 200)]  # the 400 was not retried
    assert re.search(r"refused alert_[0-9a-f]{16}_2 ", sidecar.log_tail(200))


def test_the_cursor_moves_only_on_a_2xx_and_delivery_resumes_from_it_after_kill9(
    sidecar_factory: SidecarFactory,
) -> None:
    failing = threading.Event()
    failing.set()

    def down_for_the_fifth(alert: dict[str, Any], attempt: int) -> int:
        return 500 if alert["seq"] == 5 and failing.is_set() else 200

    with AlertReceiver(down_for_the_fifth) as receiver:
        sidecar = webhook_sidecar(sidecar_factory, "cursor", receiver)
        customer = new_customer()
        with Alerting(sidecar.target) as conn:
            conn.set_budget(customer, 1_000)
            conn.toggle(customer, 6)
            receiver.wait_for_received(lambda got: [r.seq for r in got].count(5) >= 2, "alert 5 tried twice")
            # The sender moved the cursor past alert 4 before it first sent alert 5. An acknowledged change made now
            # queues behind that move, so once it is acknowledged the cursor is durable at 4.
            conn.set_budget(customer, 2_000)
        sidecar.kill9()
        assert alert_cursor_of(sidecar.data_dir) == 4  # not past 5, which was never answered 2xx
        receiver.wait_idle()
        failing.clear()
        before = len(receiver.received)
        sidecar.restart()
        with Alerting(sidecar.target) as conn:
            conn.toggle(customer)
        receiver.wait_for_received(lambda got: 7 in [r.seq for r in got[before:]], "alert 7")
        after_restart = receiver.received[before:]
    assert seqs(after_restart) == [5, 6, 7]
    assert all(r.status == 200 for r in after_restart)
    assert seqs(receiver.accepted()) == [1, 2, 3, 4, 5, 6, 7]


def test_a_stuck_receiver_never_slows_the_rpcs(sidecar_factory: SidecarFactory) -> None:
    release = threading.Event()
    with AlertReceiver(hold=release) as receiver:
        sidecar = webhook_sidecar(sidecar_factory, "stuck", receiver, ["--alert-webhook-timeout-ms", "600000"])
        customer = new_customer()
        with Alerting(sidecar.target) as conn:
            conn.set_budget(customer, 1_000_000)
            conn.toggle(customer, 2)  # the sender is now waiting on the receiver, which does not answer
            wait_until(lambda: receiver.holding, bool, what="the receiver to hold the first alert")
            for _ in range(50):  # each call has the client's deadline: a blocked path would fail here
                conn.spend(customer, 10)
            assert conn.balance(customer).spent == 500
        release.set()
        assert seqs(receiver.wait_for_accepted(2)) == [1, 2]


def test_a_webhook_url_needs_a_secret(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory(
        "nosecret", start=False, extra_args=["--alert-webhook-url", "http://127.0.0.1:9/a"], env=sidecar_env()
    )
    with pytest.raises(SidecarError, match="exited with code 2") as failed:
        sidecar.start()
    assert "SPENDGATE_ALERT_WEBHOOK_SECRET" in str(failed.value)


def test_metrics_count_the_alerts_the_watchers_and_the_deliveries(tmp_path: Path) -> None:
    with AlertReceiver() as receiver:
        settings = settings_for(
            tmp_path, http_listen="127.0.0.1:0", alert_webhook_url=receiver.url, alert_webhook_secret=WEBHOOK_SECRET
        )

        async def body(sidecar: AppSidecar, channel: grpc.aio.Channel) -> Samples:
            await create_budget(channel, "cus_metrics", 100)
            watch = pb_grpc.BudgetStub(channel).WatchAlerts(pb.WatchAlertsRequest())
            await watch.initial_metadata()
            admin = pb_grpc.AdminStub(channel)
            await admin.FreezeBudget(pb.FreezeBudgetRequest(customer_id="cus_metrics", frozen=True))
            assert (await watch.read()).seq == 1
            while True:  # bounded by with_sidecar's hang guard
                samples = await scrape(sidecar)
                if sample(samples, "spendgate_alert_webhook_delivered_seq") == 1:
                    watch.cancel()
                    return samples
                await asyncio.sleep(0.05)

        samples = with_sidecar(settings, body)
    assert sample(samples, "spendgate_alerts_total", kind="frozen") == 1
    assert sample(samples, "spendgate_alert_watchers") == 1
    assert sample(samples, "spendgate_alert_webhook_requests_total", outcome="delivered") == 1
    assert sample(samples, "spendgate_alert_webhook_pending") == 0
