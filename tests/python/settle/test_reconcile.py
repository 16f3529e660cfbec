"""`spendgate reconcile`: the ledger against Stripe's meter event summaries, through the real CLI in a child process
(reading the data dir while its owner writes it), against the fake Stripe.

Usage reaches the fake here straight from the tests, with the stripe SDK and the identifiers and timestamps the
settler would use, so that these tests do not depend on the settler: an in-process engine plays the sidecar and its
settler (outbox_claim / outbox_ack), or a real sidecar runs without a Stripe key (everything stays pending).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import stripe

import spendgate
from spendgate import _core
from spendgate.client import Client
from spendgate.config import Settings
from spendgate.settle import reconcile
from spendgate.settle.reconcile import Options, Period, Row, judge, parse_period
from spendgate.store_reader import StoreReader
from spendgate.testing.fake_stripe import DEFAULT_API_KEY, FakeStripe

from ._support import commit_tokens, token_usage
from ._support import settle as settle_with_settler

if TYPE_CHECKING:
    from tests.conftest import SidecarFactory

PACKAGE_ROOT = Path(spendgate.__file__).resolve().parents[1]
EVENT_NAME = "spendgate_usage"
CUSTOMERS = ("cus_recon_a", "cus_recon_b", "cus_recon_c")
CLI_GUARD_S = 120.0  # a guard against a hang, not a timing assertion
LONG_TTL_MS = 600_000
WRITER_PAUSE_S = 0.001
MAX_WRITER_COMMITS = 20_000


# -- helpers ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(same_host=True, customers=[*CUSTOMERS, "cus_noise"]) as running:
        yield running


def stripe_env(fake: FakeStripe) -> dict[str, str]:
    """The environment of a child process: no SPENDGATE_* or STRIPE_* from outside; Stripe is the fake."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["STRIPE_API_KEY"] = DEFAULT_API_KEY
    env["STRIPE_API_BASE"] = fake.url
    return env


def run_reconcile(data_dir: Path, fake: FakeStripe, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate", "reconcile", "--data-dir", str(data_dir), *args],
        env=stripe_env(fake), capture_output=True, text=True, timeout=CLI_GUARD_S, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def table_row(output: str, customer: str) -> list[str]:
    """The cells of a customer's row in the printed table (split on runs of spaces)."""
    for line in output.splitlines():
        if line.startswith(customer + " "):
            return line.split()
    raise AssertionError(f"no row for {customer} in:\n{output}")


def send(fake: FakeStripe, identifier: str, customer: str, value: int, ts_ms: int | None = None) -> None:
    params: dict[str, Any] = {
        "event_name": EVENT_NAME,
        "identifier": identifier,
        "payload": {"stripe_customer_id": customer, "value": str(value)},
    }
    if ts_ms is not None:
        params["timestamp"] = ts_ms // 1000
    fake.client().v1.billing.meter_events.create(params)


def commit(engine: _core.Engine, customer: str, amount: int) -> str:
    reserved = engine.reserve(customer, amount, "", LONG_TTL_MS)
    assert reserved.granted
    engine.wait_durable(engine.commit(reserved.reservation_id, amount).ticket)
    return reserved.reservation_id


def settle(
    engine: _core.Engine,
    fake: FakeStripe,
    *,
    send_to_stripe: bool = True,
    ack: bool = True,
    value_delta: int = 0,
    customer: str | None = None,
) -> list[_core.OutboxEntry]:
    """What the settler does, by hand: claim each pending entry (of `customer`, or all), send it as one meter event
    (with its value off by value_delta when asked), acknowledge it."""
    entries = [e for e in engine.outbox_pending(1000) if customer is None or e["stripe_customer_id"] == customer]
    for entry in entries:
        engine.wait_durable(engine.outbox_claim([entry["seq"]], entry["identifier"]))
        if send_to_stripe:
            send(fake, entry["identifier"], entry["stripe_customer_id"], entry["amount"] + value_delta, entry["ts_ms"])
        if ack:
            engine.wait_durable(engine.outbox_ack([entry["seq"]]))
    return entries


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[_core.Engine]:
    """An engine in this process, playing the sidecar (reconcile reads its data dir from a child process)."""
    opened = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    for customer in (*CUSTOMERS, "cus_noise"):
        opened.wait_durable(opened.set_budget(customer, 10**12, customer).ticket)
    yield opened
    opened.close()


class Writer:
    """Commits for cus_noise in a thread until stopped: the data dir changes while reconcile reads it."""

    def __init__(self, engine: _core.Engine) -> None:
        self.engine = engine
        self.commits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Paced and bounded: the point is that commits land while reconcile reads, not to fill the map.
        while not self._stop.wait(WRITER_PAUSE_S) and self.commits < MAX_WRITER_COMMITS:
            commit(self.engine, "cus_noise", 3)
            self.commits += 1

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=CLI_GUARD_S)


# -- through the real sidecar -----------------------------------------------------------------------------------------


def test_a_divergence_injected_next_to_a_running_sidecar_is_caught_then_fixed_with_a_cancel(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    env = {k: v for k, v in stripe_env(fake).items() if k != "STRIPE_API_KEY"}  # no settler: all stays pending
    sidecar = sidecar_factory("sidecar", env=env)
    customer_a, customer_b = CUSTOMERS[0], CUSTOMERS[1]
    with Client(sidecar.target) as client:
        for customer in (customer_a, customer_b):
            client.set_budget(customer, 1_000_000)
        reservations = []
        for customer, amounts in ((customer_a, (100, 100, 100)), (customer_b, (500, 500))):
            for amount in amounts:
                with client.reserve(customer, amount) as hold:
                    hold.commit(amount)
                reservations.append(hold.reservation_id)

    # Nothing settled, nothing at Stripe: everything is pending, and that matches.
    clean = run_reconcile(sidecar.data_dir, fake)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert table_row(clean.stdout, customer_a)[2:7] == ["300", "0", "300", "0", "0"]  # ledger settled pending stripe
    assert table_row(clean.stdout, customer_b)[-1] == "ok"
    assert "pending: 1300 units" in clean.stdout

    # Something else reported 20 units for customer b: Stripe is over.
    send(fake, "not-spendgate-1", customer_b, 20)
    over = run_reconcile(sidecar.data_dir, fake)
    assert over.returncode == reconcile.EXIT_MISMATCH, over.stdout + over.stderr
    assert table_row(over.stdout, customer_b)[5:] == ["20", "+20", "n/a", "OVER"]
    assert table_row(over.stdout, customer_a)[-1] == "ok"

    # --fix cancels the stray event; it refuses the ledger's own identifier.
    own = f"sg-{reservations[0]}"
    fixed = run_reconcile(sidecar.data_dir, fake, "--fix", "--yes", "--cancel", "not-spendgate-1", "--cancel", own)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"not cancelling {own}: it is the ledger's own event" in fixed.stdout, fixed.stdout
    assert [(a["identifier"], a["outcome"]) for a in fake.adjustments()] == [("not-spendgate-1", "cancelled")]

    again = run_reconcile(sidecar.data_dir, fake)
    assert again.returncode == 0, again.stdout + again.stderr
    assert table_row(again.stdout, customer_b)[5:] == ["0", "0", "0.00%", "ok"]
    assert sidecar.running


# -- settled usage, tolerance, while the owner writes -----------------------------------------------------------------


def test_settled_totals_within_the_tolerance_pass_and_beyond_it_fail(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path
) -> None:
    a, b = CUSTOMERS[0], CUSTOMERS[1]
    for _ in range(4):
        commit(engine, a, 250)
        commit(engine, b, 250)
    settle(engine, fake, customer=a)
    # Customer b's events each carry 1 unit more than the ledger: 4 units over on 1000, 0.4 %.
    settle(engine, fake, customer=b, value_delta=1)

    with Writer(engine) as writer:
        within = run_reconcile(tmp_path / "data", fake)
        assert within.returncode == 0, within.stdout + within.stderr
        assert table_row(within.stdout, a)[2:] == ["1000", "1000", "0", "1000", "0", "0.00%", "ok"]
        assert table_row(within.stdout, b)[5:] == ["1004", "+4", "+0.40%", "ok"]

        send(fake, "someone-else-1", b, 11)  # now 15 over: 1.5 %
        beyond = run_reconcile(tmp_path / "data", fake)
        assert beyond.returncode == reconcile.EXIT_MISMATCH, beyond.stdout + beyond.stderr
        assert table_row(beyond.stdout, b)[5:] == ["1015", "+15", "+1.50%", "OVER"]

        lenient = run_reconcile(tmp_path / "data", fake, "--tolerance-percent", "2")
        assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert writer.commits > 0  # the data dir really changed while it was read


def test_an_under_count_is_reported_and_left_to_settlement(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path
) -> None:
    c = CUSTOMERS[2]
    commit(engine, c, 400)
    commit(engine, c, 600)
    entries = settle(engine, fake, customer=c, send_to_stripe=False)  # acknowledged, but Stripe has nothing
    send(fake, entries[0]["identifier"], c, 400, entries[0]["ts_ms"])

    result = run_reconcile(tmp_path / "data", fake, "--fix", "--yes")
    assert result.returncode == reconcile.EXIT_MISMATCH
    assert table_row(result.stdout, c)[5:] == ["400", "-600", "-60.00%", "UNDER"]
    assert "reconcile does not fix under-counts; settlement does" in result.stdout
    assert fake.adjustments() == []


def test_pending_usage_is_split_into_in_flight_and_dead_lettered(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path
) -> None:
    a = CUSTOMERS[0]
    for amount in (100, 200, 300, 400):
        commit(engine, a, amount)
    first, second, third, _fourth = engine.outbox_pending(10)
    settle_one(engine, fake, first, ack=True)  # settled: 100
    settle_one(engine, fake, second, ack=False)  # sent, Stripe has it, not yet acknowledged: in flight
    engine.wait_durable(engine.outbox_dead_letter([third["seq"]], "refused: test"))  # dead-lettered: 300

    with StoreReader(tmp_path / "data") as store:
        rows = reconcile.ledger_rows(store, parse_period(None, None, None, time.time()))
    row = rows[a]
    assert (row.ledger, row.settled, row.pending, row.in_flight, row.dead) == (1000, 100, 900, 200, 300)

    result = run_reconcile(tmp_path / "data", fake)
    assert result.returncode == 0, result.stdout + result.stderr
    assert table_row(result.stdout, a)[2:] == ["1000", "100", "900", "300", "+200", "+200.00%", "in", "flight"]
    assert "200 are in flight" in result.stdout and "300 are dead-lettered" in result.stdout


def test_a_credit_grant_is_in_the_ledger_but_never_counted_as_usage(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path
) -> None:
    a = CUSTOMERS[0]
    commit(engine, a, 100)
    engine.wait_durable(engine.grant_credits(a, 5_000, "grant-reconcile", "prepaid").ticket)
    settle(engine, fake, customer=a)

    with StoreReader(tmp_path / "data") as store:
        assert [e.get("kind") for e in store.ledger() if e["customer_id"] == a] == [None, "grant"]
        rows = reconcile.ledger_rows(store, parse_period(None, None, None, time.time()))
    assert (rows[a].ledger, rows[a].settled, rows[a].pending) == (100, 100, 0)
    result = run_reconcile(tmp_path / "data", fake)
    assert result.returncode == 0, result.stdout + result.stderr
    assert table_row(result.stdout, a)[2:] == ["100", "100", "0", "100", "0", "0.00%", "ok"]


def settle_one(engine: _core.Engine, fake: FakeStripe, entry: _core.OutboxEntry, *, ack: bool) -> None:
    engine.wait_durable(engine.outbox_claim([entry["seq"]], entry["identifier"]))
    send(fake, entry["identifier"], entry["stripe_customer_id"], entry["amount"], entry["ts_ms"])
    if ack:
        engine.wait_durable(engine.outbox_ack([entry["seq"]]))


def test_only_the_period_counts(engine: _core.Engine, fake: FakeStripe, tmp_path: Path) -> None:
    a = CUSTOMERS[0]
    commit(engine, a, 70)
    settle(engine, fake)
    now = time.gmtime()
    this_month = f"{now.tm_year:04d}-{now.tm_mon:02d}"
    month_start_s = parse_period(this_month, None, None, time.time()).start_s
    send(fake, "last-month-1", a, 5, ts_ms=(month_start_s - 3600) * 1000)  # the last hour of last month
    result = run_reconcile(tmp_path / "data", fake, "--period", this_month)
    assert result.returncode == 0, result.stdout + result.stderr
    assert table_row(result.stdout, a)[2:6] == ["70", "70", "0", "70"]

    earlier = run_reconcile(tmp_path / "data", fake, "--start", "2000-01-01", "--end", "2000-02-01")
    assert earlier.returncode == 0
    assert a not in earlier.stdout  # no ledger entries then, so no row


# -- --fix ------------------------------------------------------------------------------------------------------------


def settings_for(tmp_path: Path) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), stripe_api_key=DEFAULT_API_KEY)


def test_fix_without_identifiers_shows_the_hours_and_cancels_nothing(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path
) -> None:
    a = CUSTOMERS[0]
    commit(engine, a, 1000)
    settle(engine, fake)
    send(fake, "stray-1", a, 50)
    out = io.StringIO()
    code = reconcile.run(settings_for(tmp_path), Options(fix=True), client=fake.client(), out=out)
    assert code == reconcile.EXIT_MISMATCH
    text = out.getvalue()
    assert f"fix: {a} is over by 50 units" in text
    assert "+50" in text.split("hours in which Stripe has more", 1)[1]
    assert "Stripe has no API that lists meter events" in text
    assert fake.adjustments() == []


def test_fix_hours_leave_out_token_commits_so_they_do_not_hide_an_over_count(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path
) -> None:
    """A token commit settles on the token meter: its units must not count against the units meter's hours (a
    300-unit token commit once hid a +100 over-count in its hour)."""
    a = CUSTOMERS[0]
    commit(engine, a, 1000)
    commit_tokens(engine, a, token_usage("gpt-6-sol", input=3000))  # 300 units, settled as 3000 input tokens
    token_ts_ms = max(e["ts_ms"] for e in engine.outbox_pending(10))
    settle_with_settler(engine, fake)
    send(fake, "stray-units-1", a, 100, token_ts_ms)  # in the token commit's hour
    out = io.StringIO()
    code = reconcile.run(settings_for(tmp_path), Options(fix=True), client=fake.client(), out=out)
    assert code == reconcile.EXIT_MISMATCH
    text = out.getvalue()
    assert f"fix: {a} is over by 100 units" in text, text
    hours = text.split("hours in which Stripe has more than the ledger settled (UTC):\n", 1)[1].splitlines()
    hour = time.strftime("%Y-%m-%dT%H:00Z", time.gmtime(token_ts_ms // 1000))
    assert hours[0].split() == [hour, "+100"], text


def test_fix_asks_first_and_a_no_cancels_nothing(engine: _core.Engine, fake: FakeStripe, tmp_path: Path) -> None:
    a = CUSTOMERS[0]
    commit(engine, a, 1000)
    settle(engine, fake)
    send(fake, "stray-2", a, 50)
    asked: list[str] = []

    def no(prompt: str) -> str:
        asked.append(prompt)
        return "n"

    out = io.StringIO()
    code = reconcile.run(
        settings_for(tmp_path), Options(fix=True, cancel=("stray-2",)), client=fake.client(), out=out, ask=no
    )
    assert code == reconcile.EXIT_MISMATCH
    assert asked and "nothing cancelled" in out.getvalue()
    assert fake.adjustments() == []

    yes = reconcile.run(
        settings_for(tmp_path),
        Options(fix=True, cancel=("stray-2",)),
        client=fake.client(),
        out=io.StringIO(),
        ask=lambda prompt: "y",
    )
    assert yes == reconcile.EXIT_OK
    assert fake.totals_by_customer(EVENT_NAME) == {a: 1000}


def test_fix_refuses_identifiers_of_the_outbox(engine: _core.Engine, fake: FakeStripe, tmp_path: Path) -> None:
    a = CUSTOMERS[0]
    commit(engine, a, 10)
    settle(engine, fake)
    send(fake, "stray-3", a, 5)
    commit(engine, a, 20)
    (waiting,) = engine.outbox_pending(10)
    out = io.StringIO()
    reconcile.run(
        settings_for(tmp_path),
        Options(fix=True, yes=True, cancel=(waiting["identifier"], "stray-3")),
        client=fake.client(),
        out=out,
    )
    refusal = next(line for line in out.getvalue().splitlines() if line.startswith("fix: not cancelling"))
    assert refusal.startswith(f"fix: not cancelling {waiting['identifier']}: it is the ledger's own event")
    assert f"outbox entry {waiting['seq']} waits to be settled under it" in refusal
    assert [a["identifier"] for a in fake.adjustments()] == ["stray-3"]


# -- errors -----------------------------------------------------------------------------------------------------------


def test_without_a_stripe_key_it_says_so_and_exits_1(engine: _core.Engine, tmp_path: Path) -> None:
    err = io.StringIO()
    code = reconcile.run(Settings(data_dir=str(tmp_path / "data")), Options(), err=err)
    assert code == reconcile.EXIT_ERROR
    assert "set STRIPE_API_KEY" in err.getvalue()


def test_an_unknown_meter_or_data_dir_exits_1(engine: _core.Engine, fake: FakeStripe, tmp_path: Path) -> None:
    err = io.StringIO()
    settings = Settings(data_dir=str(tmp_path / "data"), stripe_api_key=DEFAULT_API_KEY, settle_event_name="nope")
    assert reconcile.run(settings, Options(), client=fake.client(), err=err) == reconcile.EXIT_ERROR
    assert "no active meter for event name 'nope'" in err.getvalue()

    err = io.StringIO()
    missing = Settings(data_dir=str(tmp_path / "absent"), stripe_api_key=DEFAULT_API_KEY)
    assert reconcile.run(missing, Options(), client=fake.client(), err=err) == reconcile.EXIT_ERROR
    assert "not a spendgate data dir" in err.getvalue()
    assert not (tmp_path / "absent").exists()  # reading never creates anything


def test_stripe_errors_are_retried_then_reported(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit(engine, CUSTOMERS[0], 10)
    settle(engine, fake)
    monkeypatch.setattr(reconcile, "RETRY_BASE_S", 0.0)
    fake.fail_next("429", times=2)  # retried
    assert reconcile.run(settings_for(tmp_path), Options(), client=fake.client(), out=io.StringIO()) == 0
    fake.set_faults(rate_500=1.0)
    err = io.StringIO()
    assert reconcile.run(settings_for(tmp_path), Options(), client=fake.client(), err=err) == reconcile.EXIT_ERROR
    assert "Stripe: listing meters failed" in err.getvalue()


def test_bad_period_flags_exit_2() -> None:
    for options in (
        Options(period="2026-13"),
        Options(period="2026-11", start="2026-11-01"),
        Options(end="2026-11-02"),
        Options(start="2026-11-01T00:00:30Z"),
        Options(tolerance_percent=-1),
    ):
        err = io.StringIO()
        assert reconcile.run(Settings(), options, err=err) == 2, options
        assert err.getvalue().startswith("spendgate reconcile: ")


# -- pure parts -------------------------------------------------------------------------------------------------------


NOW = 1_795_000_000.0  # 2026-11-18T...Z


def test_the_default_period_is_the_current_utc_month_up_to_now() -> None:
    period = parse_period(None, None, None, NOW)
    assert time.strftime("%Y-%m-%dT%H:%M", time.gmtime(period.start_s)) == "2026-11-01T00:00"
    assert time.strftime("%Y-%m-%d", time.gmtime(period.asked_end_s)) == "2026-12-01"
    assert period.end_s == (int(NOW) // 60 + 1) * 60  # not past now (rounded up to a whole minute)


def test_periods_from_flags() -> None:
    december = parse_period("2025-12", None, None, NOW)
    assert (december.start_s, december.end_s) == (1_764_547_200, 1_767_225_600)  # 2025-12-01 .. 2026-01-01
    window = parse_period(None, "2026-11-02", "2026-11-03T06:30Z", NOW)
    assert (window.start_s, window.end_s) == (1_793_577_600, 1_793_687_400)
    assert parse_period(None, "2026-11-02T00:00+01:00", None, NOW).start_s == 1_793_577_600 - 3600
    assert parse_period(None, "2026-11-02", None, NOW).end_s == (int(NOW) // 60 + 1) * 60
    with pytest.raises(ValueError, match="whole minute"):
        parse_period(None, "2026-11-02T00:00:01", None, NOW)
    with pytest.raises(ValueError, match="has not begun"):
        parse_period("2027-01", None, None, NOW)
    assert isinstance(december, Period)


@pytest.mark.parametrize(
    ("settled", "in_flight", "stripe", "status"),
    [
        (1000, 0, 1000, "ok"),
        (1000, 0, 1010, "ok"),        # exactly 1 %
        (1000, 0, 1011, "OVER"),
        (1000, 0, 989, "UNDER"),
        (1000, 50, 1050, "in flight"),
        (1000, 50, 1061, "OVER"),
        (0, 0, 0, "ok"),
        (0, 0, 1, "OVER"),
        (0, 5, 5, "in flight"),
    ],
)  # fmt: skip
def test_judge(settled: int, in_flight: int, stripe: int, status: str) -> None:
    assert judge(Row("cus", settled=settled, in_flight=in_flight, stripe=stripe), 1.0) == status


def test_the_table_has_a_total_and_aligned_columns() -> None:
    rows = [
        Row("cus_1", {"acct-1"}, 10, 10, 0, stripe=10, status="ok"),
        Row("cus_22", {"acct-2", "acct-3"}, 2000, 1500, 500, stripe=1600, status="OVER"),
    ]
    lines = reconcile.format_table(rows).splitlines()
    assert lines[0].split() == [
        "customer",
        "budget",
        "ledger",
        "settled",
        "pending",
        "stripe",
        "difference",
        "%",
        "status",
    ]
    assert lines[3].split() == ["cus_22", "acct-2", "(+1)", "2000", "1500", "500", "1600", "+100", "+6.67%", "OVER"]
    assert lines[-1].split() == ["TOTAL", "2010", "1510", "500", "1610", "+100", "+6.62%"]
    assert len({len(line) for line in lines[:2]}) == 1


def test_stripe_fault_helper_maps_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fail() -> None:
        calls.append(1)
        raise stripe.AuthenticationError("Invalid API Key provided", http_status=401)

    with pytest.raises(reconcile.ReconcileError, match="check STRIPE_API_KEY"):
        reconcile.with_retries(fail, "listing meters", sleep=lambda s: None)
    assert len(calls) == 1  # never retried


def test_identifiers_come_from_flags_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "cancel.txt"
    listing.write_text("# from the Dashboard\nevt-1\n\n  evt-2  # the second\n")
    assert reconcile.read_identifiers([str(listing)]) == ["evt-1", "evt-2"]
    from spendgate import cli

    assert cli.main(["reconcile", "--data-dir", str(tmp_path), "--cancel", "evt-1"]) == 2
    assert "--cancel and --cancel-file go with --fix" in capsys.readouterr().err
    assert cli.main(["reconcile", "--data-dir", str(tmp_path), "--fix", "--cancel-file", str(tmp_path / "no")]) == 2


# -- token usage: the token meter, in tokens --------------------------------------------------------------------------


def test_token_commits_are_compared_in_tokens_on_the_token_meter_and_left_out_of_the_units(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path
) -> None:
    a, b = CUSTOMERS[0], CUSTOMERS[1]
    commit(engine, a, 40)  # plain units
    commit_tokens(engine, a, token_usage("gpt-6-sol", input=1000, output=200, reasoning=50))
    commit_tokens(engine, b, token_usage("claude-sonnet-5", input=300, cached_input=100))
    settle_with_settler(engine, fake)  # the real settler: units on one meter, token events on the other
    commit_tokens(engine, b, token_usage("claude-sonnet-5", input=7))  # not yet settled: pending

    clean = run_reconcile(tmp_path / "data", fake)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    units, tokens = clean.stdout.split("\ntoken meter token-billing-tokens (")
    assert table_row(units, a)[2:] == ["40", "40", "0", "40", "0", "0.00%", "ok"]  # the token commit is not here
    assert b not in units.split("note: ")[0]
    assert "1657 tokens committed in the period settle to the token meter token-billing-tokens" in clean.stdout
    assert table_row(tokens, a)[2:] == ["1250", "1250", "0", "1250", "0", "0.00%", "ok"]
    assert table_row(tokens, b)[2:] == ["407", "400", "7", "400", "0", "0.00%", "ok"]
    assert "pending: 7 tokens are committed but not yet acknowledged" in tokens

    # Something else sent tokens for customer a: the token meter is over, the units meter is not.
    fake.client().v1.billing.meter_events.create(
        {
            "event_name": "token-billing-tokens",
            "identifier": "not-spendgate-tokens",
            "payload": {"stripe_customer_id": a, "value": "500", "model": "gpt-6-sol", "token_type": "input"},
        }
    )
    over = run_reconcile(tmp_path / "data", fake)
    assert over.returncode == reconcile.EXIT_MISMATCH, over.stdout + over.stderr
    units, tokens = over.stdout.split("\ntoken meter token-billing-tokens (")
    assert table_row(units, a)[-1] == "ok" and table_row(tokens, a)[5:] == ["1750", "+500", "+40.00%", "OVER"]
    assert "--fix does not cancel token events" in tokens


def test_token_commits_without_a_token_meter_are_reported_not_silently_dropped(
    engine: _core.Engine, tmp_path: Path
) -> None:
    commit_tokens(engine, CUSTOMERS[0], token_usage("gpt-6-sol", input=90))
    with FakeStripe(same_host=True, customers=CUSTOMERS, meters=[EVENT_NAME]) as fake:
        result = run_reconcile(tmp_path / "data", fake)
    assert result.returncode == reconcile.EXIT_ERROR, result.stdout + result.stderr
    assert "no active meter for event name 'token-billing-tokens'" in result.stdout
    assert "the 90 tokens of commits priced from tokens were not compared" in result.stdout


def test_with_the_token_meter_off_token_commits_count_as_units(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path
) -> None:
    a = CUSTOMERS[0]
    commit_tokens(engine, a, token_usage("gpt-6-sol", input=1000))  # 100 units
    settle_with_settler(engine, fake, token_event_name="")
    settings = Settings(data_dir=str(tmp_path / "data"), stripe_api_key=DEFAULT_API_KEY, settle_token_event_name="")
    out = io.StringIO()
    assert reconcile.run(settings, Options(), client=fake.client(), out=out) == 0, out.getvalue()
    assert table_row(out.getvalue(), a)[2:4] == ["100", "100"] and "token meter" not in out.getvalue()


@pytest.mark.parametrize("at_stripe", [False, True])
def test_reconcile_says_whether_dead_letters_are_missing_at_stripe_or_there_already(
    engine: _core.Engine, fake: FakeStripe, tmp_path: Path, at_stripe: bool
) -> None:
    """What an operator reads before `deadletter requeue --confirmed-missing` (a letter whose fate was unknown)."""
    a = CUSTOMERS[0]
    for amount in (100, 300):
        commit(engine, a, amount)
    first, second = engine.outbox_pending(10)
    settle_one(engine, fake, first, ack=True)
    if at_stripe:  # sent, recorded, and the answer was lost: then dead-lettered as fate unknown
        send(fake, second["identifier"], second["stripe_customer_id"], second["amount"], second["ts_ms"])
    engine.wait_durable(engine.outbox_dead_letter([second["seq"]], "unanswered, then refused", fate_unknown=True))
    result = run_reconcile(tmp_path / "data", fake)
    if at_stripe:
        assert "Stripe has them already. Do not requeue them." in result.stdout, result.stdout
    else:
        assert "they are missing at Stripe" in result.stdout and "--confirmed-missing" in result.stdout, result.stdout


def test_a_live_judgement_lets_what_waits_in_the_outbox_cover_an_excess() -> None:
    """The scheduled reconcile reads the ledger before Stripe: an entry that went out in between shows at Stripe while
    the ledger still has it pending (a false divergence before). Dead letters never cover an excess."""
    row = Row("cus", settled=0, pending=1100, in_flight=0, stripe=1100)
    assert judge(row, 1.0) == "OVER"
    assert judge(row, 1.0, live=True) == "in flight"
    dead = Row("cus", settled=0, pending=1100, in_flight=0, dead=1100, stripe=1100)
    assert judge(dead, 1.0, live=True) == "OVER"
