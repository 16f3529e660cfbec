"""Budget.WatchAlerts through real sidecar processes over real gRPC: every kind, replay and live in order, resume
across kill -9, filters, the slow-consumer and watcher bounds, shutdown, bad requests, tokens; and the kind table."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest

from spendgate import _core
from spendgate.alerts import KINDS, START_SEQ_METADATA_KEY
from spendgate.client import AsyncClient
from spendgate.server.alerts import ALERT_KIND_BY_NAME
from spendgate.server.app import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc
from tests.python.e2e._support import new_customer
from tests.python.server._alerting import (
    WATCH_DEADLINE_S,
    Alerting,
    Watch,
    kinds_of,
    offline_engine,
    sidecar_env,
    stream_error,
    wait_until,
)
from tests.python.server._certs import make_certs
from tests.python.server.test_app import settings_for
from tests.python.server.test_security import run

if TYPE_CHECKING:
    from tests.conftest import SidecarFactory

RESUME = re.compile(r"resume with after_seq=(\d+)")
# Keeps the flow-control window of a client that does not read small, so that the server's writes to it wait soon.
SLOW_CLIENT_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def seqs(alerts: list[pb.Alert]) -> list[int]:
    return [alert.seq for alert in alerts]


def assert_contiguous(alerts: list[pb.Alert], first: int) -> None:
    """Seqs first, first+1, ...: no gap, no duplicate, in order."""
    assert seqs(alerts) == list(range(first, first + len(alerts))), seqs(alerts)


def open_stream(conn: Alerting, request: pb.WatchAlertsRequest) -> grpc.Call:
    """A raw WatchAlerts call, once the server registered it (it sends its start seq first)."""
    call = conn.budget.WatchAlerts(request, timeout=WATCH_DEADLINE_S)
    metadata = dict(call.initial_metadata() or ())
    assert START_SEQ_METADATA_KEY in metadata, metadata
    return call


# -- the kinds --------------------------------------------------------------------------------------------------------


def test_the_kind_table_covers_every_engine_kind_and_every_enum_value(tmp_path: Path) -> None:
    assert list(_core.ALERT_KINDS) == list(KINDS) == list(ALERT_KIND_BY_NAME)
    assert set(ALERT_KIND_BY_NAME.values()) == set(pb.AlertKind.values()) - {0}
    engine = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    try:
        # Only the kinds decided outside the engine may be raised from outside; the refusal names them.
        for kind in ("no_such_kind", "limit_reached", "frozen"):
            with pytest.raises(_core.EngineError) as refused:
                engine.raise_alert(kind, "cus_kinds", "?")
            assert refused.value.kind == "invalid_argument" and "settlement_dead_letter" in refused.value.message
        engine.wait_durable(engine.raise_alert("settlement_dead_letter", "cus_kinds", "a dead letter", {"n": 1}))
        assert [a["kind"] for a in engine.alerts_after(0, 100)] == ["settlement_dead_letter"]
    finally:
        engine.close()


def test_watch_delivers_every_kind_live_then_replays_them_all_in_order(sidecar_factory: SidecarFactory) -> None:
    # The breaker trips on a budget without history above breaker_min_units.
    sidecar = sidecar_factory("kinds", extra_args=["--breaker-min-units", "1000"], env=sidecar_env())
    limited, soft, runaway = new_customer("limited"), new_customer("soft"), new_customer("runaway")
    with Alerting(sidecar.target) as conn:
        conn.set_budget(limited, 100)
        conn.admin.SetBudget(pb.SetBudgetRequest(customer_id=soft, limit=10_000, soft_limit=500), timeout=30)
        conn.set_budget(runaway, 10_000)
        live = Watch(sidecar.target, from_start=True)  # the first alert is seq 1
        try:
            conn.limit_reached(limited)
            conn.freeze(limited, True)
            conn.freeze(limited, False)
            conn.spend(soft, 600)
            conn.spend(runaway, 2_000)
            got = live.wait_for(5)
        finally:
            live.close()
    assert kinds_of(got) == [
        "ALERT_KIND_LIMIT_REACHED",
        "ALERT_KIND_FROZEN",
        "ALERT_KIND_UNFROZEN",
        "ALERT_KIND_SOFT_LIMIT_CROSSED",
        "ALERT_KIND_BREAKER_TRIPPED",
    ]
    assert [a.customer_id for a in got] == [limited, limited, limited, soft, runaway]
    assert_contiguous(got, 1)
    assert got[0].values["limit"] == 100 and got[0].message and got[0].ts_ms > 0
    assert got[3].values["soft_limit"] == 500 and got[3].values["spent"] == 600

    # A settlement dead letter (the settler's to raise), stored in the stopped sidecar's data dir by the engine.
    sidecar.terminate()

    # And the other kinds raised outside the engine (the invoice guard's, the scheduled reconcile's).
    def raised_outside(engine: _core.Engine) -> int:
        engine.raise_alert("settlement_dead_letter", soft, "Stripe refused a usage for good", {"seq": 7})
        engine.raise_alert("invoice_spike", soft, "draft invoice 80% above the previous one", {"percent": 80})
        return engine.raise_alert("reconcile_divergence", soft, "ledger 600, Stripe 500", {"ledger": 600})

    offline_engine(sidecar.data_dir, raised_outside)
    sidecar.restart()
    replay = Watch(sidecar.target, from_start=True)
    try:
        everything = replay.wait_for(8)
    finally:
        replay.close()
    assert_contiguous(everything, 1)
    assert everything[:5] == got
    assert kinds_of(everything[5:]) == [
        "ALERT_KIND_SETTLEMENT_DEAD_LETTER",
        "ALERT_KIND_INVOICE_SPIKE",
        "ALERT_KIND_RECONCILE_DIVERGENCE",
    ]
    assert everything[5].values["seq"] == 7 and everything[6].values["percent"] == 80
    # clock_step is the engine's own, raised on a stepped wall clock: tests/python/e2e/test_clock.py shows it.
    every_kind = set(pb.AlertKind.values()) - {pb.ALERT_KIND_UNSPECIFIED, pb.ALERT_KIND_CLOCK_STEP}
    assert {a.kind for a in everything} == every_kind


# -- resume ------------------------------------------------------------------------------------------------------------


def test_a_watch_resumes_across_kill9_without_a_gap_or_a_duplicate(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("resume", env=sidecar_env())
    customer = new_customer()
    with Alerting(sidecar.target) as conn:
        conn.set_budget(customer, 1_000)
        conn.toggle(customer, 2)  # before the watch: "from now" must not see these
    watch = Watch(sidecar.target)  # from now, reconnecting across the crash
    try:
        with Alerting(sidecar.target) as conn:
            first = watch.wait_registered(conn, customer)
            conn.toggle(customer, 5)
        before = watch.wait_for(6)
        sidecar.kill9()
        sidecar.restart()
        with Alerting(sidecar.target) as conn:
            conn.toggle(customer, 6)
        got = watch.wait_for(12)
    finally:
        watch.close()
    assert first.seq >= 3, "a watch from now replayed older alerts"
    assert got[:6] == before[:6]
    assert_contiguous(got, first.seq)
    assert len(got) == 12

    # An explicit resume after the 6th: exactly the rest, then a newer one, nothing repeated.
    resumed = Watch(sidecar.target, after_seq=got[5].seq)
    try:
        resumed.wait_for(6)
        with Alerting(sidecar.target) as conn:
            conn.freeze(customer, True)
        after = resumed.wait_for(7)
    finally:
        resumed.close()
    assert after[:6] == got[6:]
    assert_contiguous(after, got[6].seq)


def test_a_watch_filters_by_customer_live_and_in_the_replay(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("filter", env=sidecar_env())
    mine, other, third = new_customer("mine"), new_customer("other"), new_customer("third")
    with Alerting(sidecar.target) as conn:
        for customer in (mine, other, third):
            conn.set_budget(customer, 1_000)
        watch = Watch(sidecar.target, from_start=True, customer_ids=(mine, third))
        try:
            for _ in range(3):
                conn.toggle(other, 2)
                conn.toggle(mine, 2)
            conn.toggle(third, 1)
            live = watch.wait_for(7)
        finally:
            watch.close()
    assert [a.customer_id for a in live] == [mine] * 6 + [third]
    assert seqs(live) == sorted(seqs(live)) and len(set(seqs(live))) == 7

    replay = Watch(sidecar.target, from_start=True, customer_ids=(mine, third))
    try:
        assert replay.wait_for(7) == live
    finally:
        replay.close()


# -- bounds ------------------------------------------------------------------------------------------------------------


def test_a_slow_watcher_is_ended_resumably_while_another_keeps_up(sidecar_factory: SidecarFactory) -> None:
    capacity = 8
    sidecar = sidecar_factory(
        "slow", extra_args=["--alert-watch-queue-capacity", str(capacity), "--durability", "relaxed"], env=sidecar_env()
    )
    customer, burst = new_customer(), 400
    with Alerting(sidecar.target) as conn, grpc.insecure_channel(sidecar.target, SLOW_CLIENT_OPTIONS) as channel:
        conn.set_budget(customer, 1_000)
        slow = pb_grpc.BudgetStub(channel).WatchAlerts(pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S * 4)
        assert START_SEQ_METADATA_KEY in dict(slow.initial_metadata() or ())
        fast = Watch(sidecar.target, from_start=True)
        try:
            conn.toggle(customer, burst)  # the slow one reads nothing meanwhile
            everything = fast.wait_for(burst)
        finally:
            fast.close()
        assert_contiguous(everything, 1)
        got, error = stream_error(slow)  # only now does the slow one read
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "alert_watch_queue_capacity" in error.details()
    resume = RESUME.search(error.details())
    assert resume is not None, error.details()
    assert 0 < len(got) < burst  # it was cut off: its queue did not grow to hold the burst
    assert_contiguous(got, 1)
    assert int(resume.group(1)) == got[-1].seq  # the last alert the server wrote is the last the client got

    rest = Watch(sidecar.target, after_seq=got[-1].seq)
    try:
        assert rest.wait_for(burst - len(got)) == everything[len(got) :]
    finally:
        rest.close()


def test_watchers_past_the_bound_are_refused_until_one_leaves(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("bound", extra_args=["--alert-max-watchers", "2"], env=sidecar_env())
    with Alerting(sidecar.target) as conn:
        first = open_stream(conn, pb.WatchAlertsRequest())
        second = open_stream(conn, pb.WatchAlertsRequest())
        call = conn.budget.WatchAlerts(pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S)
        _, error = stream_error(call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "alert_max_watchers" in error.details()
        first.cancel()

        def try_again() -> grpc.StatusCode:
            attempt = conn.budget.WatchAlerts(pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S)
            if attempt.initial_metadata():
                attempt.cancel()
                return grpc.StatusCode.OK
            return stream_error(attempt)[1].code()

        wait_until(try_again, lambda code: code == grpc.StatusCode.OK, what="a watcher slot after one left")
        second.cancel()


def test_one_token_gets_at_most_its_share_of_the_watcher_slots(sidecar_factory: SidecarFactory) -> None:
    greedy, other = "app-token-for-the-watch-share-0001", "app-token-for-the-watch-share-0002"
    sidecar = sidecar_factory(
        "share",
        extra_args=["--alert-max-watchers", "3", "--alert-max-watchers-per-client", "2"],
        env=sidecar_env(SPENDGATE_APP_TOKENS=f"{greedy},{other}", SPENDGATE_ADMIN_TOKENS="admin-token-for-share-0003"),
    )
    with Alerting(sidecar.target) as conn:

        def watch(authorization: str) -> grpc.Call:
            return conn.budget.WatchAlerts(
                pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S, metadata=(("authorization", authorization),)
            )

        def opened(authorization: str) -> grpc.Call:
            call = watch(authorization)
            assert START_SEQ_METADATA_KEY in dict(call.initial_metadata() or ())
            return call

        first, second = opened(f"Bearer {greedy}"), opened(f"Bearer {greedy}")
        for spelling in (f"Bearer {greedy}", f"bearer   {greedy}  "):  # the same token, however it is written
            _, error = stream_error(watch(spelling))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "alert_max_watchers_per_client" in error.details() and "its token" in error.details()
        theirs = opened(f"Bearer {other}")  # another app still gets a slot
        _, error = stream_error(watch(f"Bearer {other}"))  # now the whole is full
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(alert_max_watchers)" in error.details()
        first.cancel()

        def try_again() -> grpc.StatusCode:
            attempt = watch(f"Bearer {other}")
            if attempt.initial_metadata():
                attempt.cancel()
                return grpc.StatusCode.OK
            return stream_error(attempt)[1].code()

        wait_until(try_again, lambda code: code == grpc.StatusCode.OK, what="a slot for the other app")
        second.cancel()
        theirs.cancel()


def test_without_tokens_the_share_is_per_client_address(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("peer-share", extra_args=["--alert-max-watchers-per-client", "1"], env=sidecar_env())
    with Alerting(sidecar.target) as conn, Alerting(sidecar.target) as another_connection:
        first = open_stream(conn, pb.WatchAlertsRequest())
        # A second connection from the same address is the same client: connections are cheap to open.
        _, error = stream_error(
            another_connection.budget.WatchAlerts(pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S)
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "alert_max_watchers_per_client" in error.details() and "address ipv4:127.0.0.1" in error.details()
        first.cancel()


def test_under_mtls_without_tokens_the_share_is_per_client_certificate(tmp_path: Path) -> None:
    # In process: the sidecar harness dials plaintext to see it serving.
    certs = make_certs(tmp_path / "certs")
    settings = settings_for(
        tmp_path,
        alert_max_watchers_per_client=1,
        tls_cert_file=str(certs.server_cert),
        tls_key_file=str(certs.server_key),
        tls_client_ca_file=str(certs.ca),
    )

    def channel(sidecar: Sidecar, name: str) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            certs.read("ca"), certs.read(f"{name}_key"), certs.read(f"{name}_cert")
        )
        return grpc.aio.secure_channel(sidecar.address, credentials)

    async def opened(stub: pb_grpc.BudgetStub) -> grpc.aio.UnaryStreamCall:
        call = stub.WatchAlerts(pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S)
        assert START_SEQ_METADATA_KEY in dict(await call.initial_metadata() or ())
        return call

    async def body(sidecar: Sidecar) -> grpc.aio.AioRpcError:
        async with (
            channel(sidecar, "client") as one,
            channel(sidecar, "client") as same,
            channel(sidecar, "second_client") as other,
        ):
            first = await opened(pb_grpc.BudgetStub(one))
            refused = pb_grpc.BudgetStub(same).WatchAlerts(pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in refused:
                    pass
            second = await opened(pb_grpc.BudgetStub(other))  # another certificate: its own share
            first.cancel()
            second.cancel()
            return caught.value

    error = run(settings, body)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "its client certificate" in error.details()


def test_shutdown_ends_open_streams_with_unavailable_and_does_not_hold_the_drain(
    sidecar_factory: SidecarFactory,
) -> None:
    # A grace far longer than the terminate() timeout: a stream that held the drain would fail this test.
    sidecar = sidecar_factory("drain", extra_args=["--shutdown-grace-ms", "120000"], env=sidecar_env())
    customer = new_customer()
    with Alerting(sidecar.target) as conn:
        conn.set_budget(customer, 1_000)
        call = open_stream(conn, pb.WatchAlertsRequest())
        conn.freeze(customer, True)
        first = next(call)
        assert sidecar.terminate(timeout_s=WATCH_DEADLINE_S) == 0
        rest, error = stream_error(call)
    assert rest == []
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in error.details() and f"resume with after_seq={first.seq}" in error.details()


def test_bad_watch_requests_say_what_is_wrong(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("bad", env=sidecar_env())
    customer = new_customer()
    with Alerting(sidecar.target) as conn:
        conn.set_budget(customer, 1_000)
        conn.freeze(customer, True)

        def first_error(**fields: object) -> grpc.RpcError:
            return stream_error(conn.budget.WatchAlerts(pb.WatchAlertsRequest(**fields), timeout=WATCH_DEADLINE_S))[1]

        both = first_error(after_seq=1, from_start=True)
        assert both.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in both.details()
        future = first_error(after_seq=99)
        assert future.code() == grpc.StatusCode.OUT_OF_RANGE and "newest alert (1)" in future.details()
        long_id = first_error(customer_ids=["x" * (_core.MAX_ID_BYTES + 1)])
        assert long_id.code() == grpc.StatusCode.INVALID_ARGUMENT and "customer_ids" in long_id.details()


def test_watch_needs_a_token_where_tokens_are_configured(sidecar_factory: SidecarFactory) -> None:
    token = "app-token-for-the-alert-tests-0001"
    sidecar = sidecar_factory(
        "tokens", env=sidecar_env(SPENDGATE_APP_TOKENS=token, SPENDGATE_ADMIN_TOKENS="admin-token-for-alert-tests-02")
    )
    with Alerting(sidecar.target) as conn:
        _, refused = stream_error(conn.budget.WatchAlerts(pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S))
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        call = conn.budget.WatchAlerts(
            pb.WatchAlertsRequest(), timeout=WATCH_DEADLINE_S, metadata=(("authorization", f"Bearer {token}"),)
        )
        assert dict(call.initial_metadata() or ())[START_SEQ_METADATA_KEY] == "0"
        call.cancel()


def test_the_async_client_watches_and_resumes_from_a_seq(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("async", env=sidecar_env())
    customer = new_customer()
    with Alerting(sidecar.target) as conn:
        conn.set_budget(customer, 1_000)
        conn.toggle(customer, 4)

    async def first(count: int, **kwargs: object) -> list[pb.Alert]:
        async with AsyncClient(sidecar.target) as client:
            got: list[pb.Alert] = []
            async for alert in client.watch_alerts(**kwargs):  # type: ignore[arg-type]
                got.append(alert)
                if len(got) == count:
                    return got
        raise AssertionError("the stream ended")

    everything = asyncio.run(asyncio.wait_for(first(4, from_start=True), WATCH_DEADLINE_S))
    assert_contiguous(everything, 1)
    assert asyncio.run(asyncio.wait_for(first(2, after_seq=2), WATCH_DEADLINE_S)) == everything[2:]
