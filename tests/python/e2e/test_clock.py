"""A stepping wall clock, for a real sidecar process alone (README "Time and clock steps").

The sidecar runs under libfaketime (Debian's libfaketime, installed by bench/setup.sh): its CLOCK_REALTIME is shifted by
the offset in a file that it re-reads on every call (FAKETIME_TIMESTAMP_FILE with FAKETIME_NO_CACHE), while its
monotonic clocks are left alone (FAKETIME_DONT_FAKE_MONOTONIC), as with a real NTP step or a VM resumed with a stale
clock. This test process keeps the true time: holds are measured against its own monotonic clock.

What must hold: no HARD budget passes its limit, no hold ends early or late, no period rolls on a step that is undone,
a step that persists is followed once it has held for clock_step_confirm_ms, the clock_step alert reaches WatchAlerts,
and spendgate_clock_steps_total counts the steps. A hold also ends at its original deadline across a restart.

Timing: the sidecar sweeps every REAP_INTERVAL_MS. "Not early" is exact: a reply that shows a hold ended (or a period
rolled) must come after the earliest moment it may. "Not late" allows the sweep interval plus SCHEDULING_SLACK_S for the
reaper thread to be scheduled on a loaded machine; the bugs this guards against are off by the size of a step (hours).
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest

from spendgate.testing import Sidecar
from spendgate.v1 import spendgate_pb2 as pb
from tests.python.server._alerting import Watch, sidecar_env

from ._support import (
    INSUFFICIENT,
    LONG_TTL_MS,
    Conn,
    assert_balance_consistent,
    new_customer,
    wait_until,
)

if TYPE_CHECKING:
    from tests.conftest import SidecarFactory

# Where Debian's libfaketime package puts the library (bench/setup.sh installs it).
LIBFAKETIME_PATHS = (
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/local/lib/faketime/libfaketime.so.1"),
)
REAP_INTERVAL_MS = 20
# The reaper thread's wake-up on a busy 2-core machine; far below any step these tests make (seconds to days).
SCHEDULING_SLACK_S = 1.0
LATE_S = REAP_INTERVAL_MS / 1000 + SCHEDULING_SLACK_S
POLL_S = 0.01
HOUR_S = 3600
DAY_S = 86_400
MAX_CLOCK_STEP_MS = 1_000  # the default
# expires_at_ms and alert timestamps are wall-clock times from another process: rounding and a slow reply.
CLOCK_SLOP_MS = 1_000


def libfaketime() -> Path:
    for path in LIBFAKETIME_PATHS:
        if path.exists():
            return path
    pytest.fail("libfaketime is not installed: run `bash bench/setup.sh` as root (it apt-get installs libfaketime)")


@dataclass
class WallClock:
    """The sidecar's wall-clock offset, in seconds, in the file libfaketime reads on every clock call."""

    path: Path
    offset_s: int = 0
    stepped_at: list[float] = field(default_factory=list)  # this process's monotonic time of each step

    def __post_init__(self) -> None:
        self._write()

    def step(self, seconds: int) -> float:
        """Step the sidecar's wall clock by `seconds`; returns this process's monotonic time just before the step."""
        before = time.monotonic()
        self.offset_s += seconds
        self._write()
        self.stepped_at.append(before)
        return before

    def _write(self) -> None:
        # Replaced whole, so that the sidecar never reads a half-written offset.
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(f"{self.offset_s:+d}\n")
        os.replace(scratch, self.path)

    def env(self) -> dict[str, str]:
        return sidecar_env(
            LD_PRELOAD=str(libfaketime()),
            FAKETIME_TIMESTAMP_FILE=str(self.path),
            FAKETIME_NO_CACHE="1",
            FAKETIME_DONT_FAKE_MONOTONIC="1",
            NO_FAKE_STAT="1",  # file times stay real: LMDB and Python's bytecode cache compare them
        )


@dataclass
class Stepped:
    sidecar: Sidecar
    clock: WallClock
    pids: list[int] = field(default_factory=list)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.sidecar.http_url}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        values = [line.split()[-1] for line in body.splitlines() if line.split(" ")[0] == name]
        assert len(values) == 1, f"{name} in /metrics: {values}"
        return float(values[0])

    def wait_steps(self, count: int) -> None:
        wait_until(
            lambda: self.metric("spendgate_clock_steps_total"),
            lambda n: n >= count,
            what=f"the sidecar to see step {count}",
        )
        assert self.metric("spendgate_clock_steps_total") == count

    def wait_agreed(self) -> None:
        wait_until(
            lambda: self.metric("spendgate_clock_step_pending_seconds"),
            lambda s: s == 0,
            what="the sidecar to see its clocks agree again",
        )

    def restart(self, *, kill: bool) -> None:
        if kill:
            self.sidecar.kill9()
        else:
            self.sidecar.terminate()
        self.sidecar.start()
        self.pids.append(self.sidecar.pid)


class StepFactory(Protocol):
    def __call__(self, *extra_args: str) -> Stepped: ...


@pytest.fixture
def stepped(sidecar_factory: SidecarFactory, tmp_path: Path) -> Iterator[StepFactory]:
    made: list[Stepped] = []

    def make(*extra_args: str) -> Stepped:
        clock = WallClock(tmp_path / f"faketime-{len(made)}.rc")
        args = ("--reap-interval-ms", str(REAP_INTERVAL_MS), *extra_args)
        sidecar = sidecar_factory(f"stepped-{len(made)}", extra_args=args, env=clock.env(), http=True)
        made.append(Stepped(sidecar, clock, [sidecar.pid]))
        return made[-1]

    yield make
    for one in made:
        one.sidecar.stop()
        for pid in one.pids:  # libfaketime's per-process shared memory, left behind by a kill -9
            for name in (f"faketime_shm_{pid}", f"sem.faketime_sem_{pid}"):
                Path("/dev/shm", name).unlink(missing_ok=True)


def reserve_timed(conn: Conn, customer: str, amount: int, ttl_ms: int) -> tuple[pb.ReserveResponse, float, float]:
    before = time.monotonic()
    hold = conn.reserve(customer, amount, ttl_ms=ttl_ms)
    after = time.monotonic()
    assert hold.granted, hold
    return hold, before, after


def watch_hold_end(conn: Conn, customer: str, reserved: int, ttl_ms: int, sent: float, answered: float) -> float:
    """Poll until the customer's reserved units drop below `reserved` (the hold reserved at [sent, answered] ended).
    It must not before its TTL has passed since `sent` (exactly), and must by its TTL after `answered` plus LATE_S.
    Returns this process's monotonic time of the first reply that showed it ended."""
    ttl_s = ttl_ms / 1000
    while True:
        before = time.monotonic()
        balance = conn.balance(customer)
        after = time.monotonic()
        if balance.reserved < reserved:
            assert after >= sent + ttl_s, f"the hold ended early: {after - sent:.3f} s after its Reserve, ttl {ttl_s} s"
            return after
        assert before <= answered + ttl_s + LATE_S, (
            f"the hold was still open {before - answered:.3f} s after its Reserve, ttl {ttl_s} s: it ended late"
        )
        time.sleep(POLL_S)


def clock_alerts(target: str, count: int) -> list[pb.Alert]:
    watch = Watch(target, from_start=True)
    try:
        got = watch.wait_for(count, "clock_step alerts")
    finally:
        watch.close()
    alerts = [a for a in got if a.kind == pb.ALERT_KIND_CLOCK_STEP]
    for alert in alerts:
        assert alert.customer_id == "" and "clock_step_confirm_ms" in alert.message, alert
    return alerts


def test_a_forward_step_of_two_hours_expires_no_hold_and_the_hard_limit_holds(stepped: StepFactory) -> None:
    one = stepped()
    with Conn(one.sidecar.target) as conn:
        customer = new_customer("step-fwd")
        conn.set_budget(customer, 1_000)
        long_hold, _, _ = reserve_timed(conn, customer, 600, LONG_TTL_MS)
        short_hold, sent, answered = reserve_timed(conn, customer, 400, 3_000)
        one.clock.step(2 * HOUR_S)
        one.wait_steps(1)
        assert one.metric("spendgate_clock_step_pending_seconds") == pytest.approx(2 * HOUR_S, abs=1)
        denied = conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS)
        assert not denied.granted and denied.reason == INSUFFICIENT, "the step freed nothing"

        watch_hold_end(conn, customer, 1_000, 3_000, sent, answered)
        assert conn.balance(customer).reserved == 600, "the long hold is still open"
        t0_wall_ms = time.time_ns() // 1_000_000
        refill, _, _ = reserve_timed(conn, customer, 400, LONG_TTL_MS)
        # The caller is shown the trusted time, not the stepped one.
        assert abs(refill.expires_at_ms - (t0_wall_ms + LONG_TTL_MS)) <= CLOCK_SLOP_MS, refill
        assert not conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted
        for hold, amount in ((long_hold, 600), (refill, 400)):
            committed = conn.commit(hold.reservation_id, amount)
            assert not committed.hold_expired and committed.excess == 0, committed
        assert conn.commit(short_hold.reservation_id, 0).hold_expired
        balance = conn.balance(customer)
        assert_balance_consistent(balance)
        assert (balance.spent, balance.overdraft, balance.reserved) == (1_000, 0, 0), balance
        assert one.metric("spendgate_expired_holds_total") == 1

    (alert,) = clock_alerts(one.sidecar.target, 1)
    assert abs(alert.values["step_ms"] - 2 * HOUR_S * 1000) <= MAX_CLOCK_STEP_MS, alert
    assert alert.values["accepted"] == 0 and alert.values["max_clock_step_ms"] == MAX_CLOCK_STEP_MS
    assert abs(alert.ts_ms - time.time_ns() // 1_000_000) <= 60_000, "stamped with the trusted time, not +2 h"
    assert one.metric('spendgate_alerts_total{kind="clock_step"}') == 1


def test_a_backward_step_keeps_no_hold_alive_past_its_ttl(stepped: StepFactory) -> None:
    one = stepped()
    with Conn(one.sidecar.target) as conn:
        customer = new_customer("step-back")
        conn.set_budget(customer, 100)
        _, sent, answered = reserve_timed(conn, customer, 100, 2_000)
        one.clock.step(-2 * HOUR_S)
        one.wait_steps(1)
        assert not conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted
        watch_hold_end(conn, customer, 100, 2_000, sent, answered)
        assert conn.reserve(customer, 100, ttl_ms=LONG_TTL_MS).granted, "its units are free again, on time"
    assert clock_alerts(one.sidecar.target, 1)[0].values["step_ms"] < -2 * HOUR_S * 1000 + MAX_CLOCK_STEP_MS


def test_a_step_past_the_month_end_undone_a_second_later_resets_no_month(stepped: StepFactory) -> None:
    one = stepped()
    with Conn(one.sidecar.target) as conn:
        customer = new_customer("step-month")
        conn.set_budget(customer, 1_000)
        hold = conn.reserve(customer, 1_000, ttl_ms=LONG_TTL_MS)
        conn.commit(hold.reservation_id, 1_000)
        month = conn.balance(customer)
        assert month.period.kind == pb.PERIOD_KIND_MONTHLY and month.period_end_ms > 0, month

        one.clock.step(32 * DAY_S)  # past the month's end, whatever today is
        one.wait_steps(1)
        time.sleep(1.0)
        stepped_month = conn.balance(customer)
        one.clock.step(-32 * DAY_S)
        one.wait_agreed()

        for balance in (stepped_month, conn.balance(customer)):
            assert (balance.spent, balance.period_start_ms) == (1_000, month.period_start_ms), balance
        assert not conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted, "the month's limit still holds"
        assert one.metric("spendgate_periods_rolled_total") == 0
        assert one.metric("spendgate_clock_steps_total") == 1, "the step back undid the step: it is not another"
    (alert,) = clock_alerts(one.sidecar.target, 1)
    assert abs(alert.values["step_ms"] - 32 * DAY_S * 1000) <= MAX_CLOCK_STEP_MS, alert


def test_a_step_that_holds_for_the_confirm_window_is_followed(stepped: StepFactory) -> None:
    confirm_ms = 2_000
    one = stepped("--clock-step-confirm-ms", str(confirm_ms))
    with Conn(one.sidecar.target) as conn:
        customer = new_customer("step-held")
        conn.set_budget(customer, 1_000)
        hold = conn.reserve(customer, 1_000, ttl_ms=LONG_TTL_MS)
        conn.commit(hold.reservation_id, 1_000)
        month = conn.balance(customer)

        stepped_at = one.clock.step(32 * DAY_S)  # a wrong clock corrected by NTP: it stays
        while True:
            before = time.monotonic()
            balance = conn.balance(customer)
            after = time.monotonic()
            if balance.period_start_ms != month.period_start_ms:
                assert after >= stepped_at + confirm_ms / 1000, (
                    f"the month rolled {after - stepped_at:.3f} s after the step, before it had held {confirm_ms} ms"
                )
                break
            assert balance.spent == 1_000, balance
            assert before <= stepped_at + confirm_ms / 1000 + LATE_S, "the held step was not followed in time"
            time.sleep(POLL_S)
        assert balance.period_start_ms >= month.period_end_ms and balance.spent == 0, balance
        assert conn.reserve(customer, 1_000, ttl_ms=LONG_TTL_MS).granted, "the new month's budget"
        assert one.metric("spendgate_periods_rolled_total") == 1
        assert one.metric("spendgate_clock_step_pending_seconds") == 0

    seen, accepted = clock_alerts(one.sidecar.target, 2)
    assert (seen.values["accepted"], accepted.values["accepted"]) == (0, 1), (seen, accepted)
    assert abs(accepted.values["step_ms"] - 32 * DAY_S * 1000) <= MAX_CLOCK_STEP_MS, accepted
    assert accepted.ts_ms - time.time_ns() // 1_000_000 > 31 * DAY_S * 1000, "the accepted time stamps it"


@pytest.mark.parametrize("kill", [True, False], ids=["kill9", "sigterm"])
def test_a_hold_ends_at_its_original_deadline_across_a_restart(stepped: StepFactory, kill: bool) -> None:
    ttl_ms = 12_000  # longer than a restart on a loaded machine, so that the hold is seen open after it
    one = stepped()
    with Conn(one.sidecar.target) as conn:
        customer = new_customer("step-restart")
        conn.set_budget(customer, 500)
        _, sent, answered = reserve_timed(conn, customer, 500, ttl_ms)
    one.restart(kill=kill)
    one.clock.step(-HOUR_S)  # and the wall clock steps back while it starts: no matter
    with Conn(one.sidecar.target) as conn:
        assert time.monotonic() < sent + ttl_ms / 1000, "the restart took longer than the TTL: the test proves nothing"
        assert conn.balance(customer).reserved == 500, "the hold survived the restart"
        assert not conn.reserve(customer, 1, ttl_ms=LONG_TTL_MS).granted
        watch_hold_end(conn, customer, 500, ttl_ms, sent, answered)
        assert conn.reserve(customer, 500, ttl_ms=LONG_TTL_MS).granted
