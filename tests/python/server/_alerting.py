"""Helpers for the alert tests: raising alerts through a real sidecar, watching them from a thread, a real HTTP
receiver for the alert webhook, and changes made to a stopped sidecar's data dir with the engine itself."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from spendgate import _core
from spendgate.alerts import SIGNATURE_HEADER
from spendgate.client import Client, RetryPolicy, SpendgateError
from spendgate.v1 import spendgate_pb2 as pb
from tests.python.e2e._support import RPC_TIMEOUT_S, Conn, wait_until

__all__ = ["AlertReceiver", "Alerting", "Received", "Watch", "kinds_of", "offline_engine", "sidecar_env", "wait_until"]

WEBHOOK_SECRET = "alert-webhook-secret-for-tests-0123456789"
# Long enough for a sidecar restart: a watch reconnects across it without giving up.
PATIENT_RETRY = RetryPolicy(max_attempts=200, initial_backoff_s=0.05, max_backoff_s=0.2)
WATCH_DEADLINE_S = 30.0  # a guard against a hang, not a timing assertion


def sidecar_env(**extra: str) -> dict[str, str]:
    """The test's environment without any SPENDGATE_* or STRIPE_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}
    env.update(extra)
    return env


def kinds_of(alerts: list[pb.Alert]) -> list[str]:
    return [pb.AlertKind.Name(alert.kind) for alert in alerts]


class Alerting(Conn):
    """A raw-stub connection with the calls that raise alerts."""

    def freeze(self, customer_id: str, frozen: bool) -> pb.SetBudgetResponse:
        return self.admin.FreezeBudget(
            pb.FreezeBudgetRequest(customer_id=customer_id, frozen=frozen), timeout=RPC_TIMEOUT_S
        )

    def toggle(self, customer_id: str, times: int = 1) -> None:
        """Freeze the budget if it is not frozen, else unfreeze it: one alert each time."""
        for _ in range(times):
            self.freeze(customer_id, not self.balance(customer_id).frozen)

    def limit_reached(self, customer_id: str) -> None:
        """A Reserve larger than the whole limit: denied, and the limit alert is raised (once per period)."""
        balance = self.balance(customer_id)
        reply = self.reserve(customer_id, balance.limit + 1)
        assert not reply.granted and reply.reason == pb.DENY_REASON_INSUFFICIENT_BUDGET, reply

    def spend(self, customer_id: str, amount: int) -> None:
        hold = self.reserve(customer_id, amount)
        assert hold.granted, hold
        self.commit(hold.reservation_id, amount)


class Watch:
    """Client.watch_alerts in a thread, collecting every alert; close() ends it."""

    def __init__(
        self,
        target: str,
        after_seq: int = 0,
        *,
        from_start: bool = False,
        customer_ids: tuple[str, ...] = (),
        retry: RetryPolicy = PATIENT_RETRY,
        token: str | None = None,
    ) -> None:
        self._client = Client(target, retry=retry, token=token)
        self._lock = threading.Lock()
        self._alerts: list[pb.Alert] = []
        self.error: SpendgateError | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, args=(after_seq, from_start, customer_ids), daemon=True)
        self._thread.start()

    def _run(self, after_seq: int, from_start: bool, customer_ids: tuple[str, ...]) -> None:
        try:
            for alert in self._client.watch_alerts(after_seq, from_start=from_start, customer_ids=customer_ids):
                with self._lock:
                    self._alerts.append(alert)
        except SpendgateError as error:
            if not self._closing:
                self.error = error

    @property
    def alerts(self) -> list[pb.Alert]:
        with self._lock:
            return list(self._alerts)

    def wait_registered(self, conn: Alerting, customer_id: str) -> pb.Alert:
        """For a watch "from now": raise alerts (toggling the customer) until it gets one, so that it is surely on;
        returns the first it got."""

        def probe() -> list[pb.Alert]:
            assert self.error is None, f"the watch ended: {self.error}"
            got = self.alerts
            if not got:
                conn.toggle(customer_id)
            return got

        return wait_until(probe, bool, what="the watch's first alert", deadline_s=WATCH_DEADLINE_S)[0]

    def wait_for(self, count: int, what: str = "alerts") -> list[pb.Alert]:
        """At least `count` alerts (a bounded wait); fails at once if the watch ended with an error."""

        def probe() -> list[pb.Alert]:
            assert self.error is None, f"the watch ended: {self.error}"
            return self.alerts

        return wait_until(probe, lambda got: len(got) >= count, what=f"{count} {what}", deadline_s=WATCH_DEADLINE_S)

    def close(self) -> None:
        self._closing = True
        self._client.close()  # the stream ends with CANCELLED in the thread
        self._thread.join(WATCH_DEADLINE_S)
        assert not self._thread.is_alive(), "the watch thread did not end"


def offline_engine(data_dir: Path, change: Callable[[_core.Engine], int]) -> None:
    """Apply `change` (returning a ticket) to a stopped sidecar's data dir with the engine, durably, and let go of it
    (the data dir's lock goes with the engine object)."""
    engine = _core.Engine(str(data_dir))
    try:
        engine.wait_durable(change(engine))
    finally:
        engine.close()
    del engine
    gc.collect()


def alert_cursor_of(data_dir: Path) -> int:
    """The alert webhook's durable cursor in a stopped sidecar's data dir."""
    holder: list[int] = []

    def read(engine: _core.Engine) -> int:
        holder.append(engine.alert_cursor())
        return 0

    offline_engine(data_dir, read)
    return holder[0]


# -- the alert webhook's receiver --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One POST the receiver got, and the status it answered."""

    body: bytes
    signature: str | None
    content_type: str
    status: int

    @property
    def alert(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document

    @property
    def seq(self) -> int:
        return int(self.alert["seq"])


# answer(alert, attempt) -> HTTP status; attempt counts this alert id's requests, from 1.
Answer = Callable[[dict[str, Any], int], int]


@dataclass
class AlertReceiver:
    """A real aiohttp server on a loopback port, in its own thread, recording every POST to /alerts."""

    answer: Answer = lambda alert, attempt: 200
    hold: threading.Event | None = None  # when given, every request waits for it to be set before answering
    _received: list[Received] = field(default_factory=list)
    _attempts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _holding: int = 0
    _in_flight: int = 0
    url: str = ""

    def __enter__(self) -> AlertReceiver:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(WATCH_DEADLINE_S), "the receiver did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.hold is not None:
            self.hold.set()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WATCH_DEADLINE_S)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main(started))
        self._loop.close()

    async def _main(self, started: threading.Event) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/alerts", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/alerts"
        started.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        with self._lock:
            self._in_flight += 1
        try:
            return await self._answer(request)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.hold is not None:
            with self._lock:
                self._holding += 1
            await asyncio.get_running_loop().run_in_executor(None, self.hold.wait)
            with self._lock:
                self._holding -= 1
        alert = json.loads(body)
        with self._lock:
            attempt = self._attempts[alert["id"]] = self._attempts.get(alert["id"], 0) + 1
        status = self.answer(alert, attempt)
        with self._lock:
            self._received.append(
                Received(body, request.headers.get(SIGNATURE_HEADER), request.headers.get("Content-Type", ""), status)
            )
        return web.Response(status=status, text="ok" if status < 300 else "not now")

    @property
    def holding(self) -> int:
        """Requests waiting for `hold` to be set."""
        with self._lock:
            return self._holding

    def wait_idle(self) -> None:
        """Until no request is being answered (after the sender was killed: a request it sent may still finish)."""
        wait_until(
            lambda: self._in_flight, lambda n: n == 0, what="the receiver to be idle", deadline_s=WATCH_DEADLINE_S
        )

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def accepted(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        return [r for r in self.received if 200 <= r.status < 300]

    def wait_for_accepted(self, count: int) -> list[Received]:
        return wait_until(
            self.accepted, lambda got: len(got) >= count, what=f"{count} alerts accepted", deadline_s=WATCH_DEADLINE_S
        )

    def wait_for_received(self, accept: Callable[[list[Received]], bool], what: str) -> list[Received]:
        return wait_until(lambda: self.received, accept, what=what, deadline_s=WATCH_DEADLINE_S)


def stream_error(call: Iterator[pb.Alert]) -> tuple[list[pb.Alert], grpc.RpcError]:
    """Read a raw stream to its end; the alerts read and the error it ended with."""
    got: list[pb.Alert] = []
    try:
        for alert in call:
            got.append(alert)
    except grpc.RpcError as error:
        return got, error
    raise AssertionError(f"the stream ended without an error after {len(got)} alerts")
