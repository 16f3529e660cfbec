"""`spendgate reconcile`: the ledger's committed units per Stripe customer and period, against Stripe's meter event
summaries.

    spendgate reconcile [--period 2026-11 | --start 2026-11-01 [--end 2026-11-15]] [--tolerance-percent 1]
                        [--customer cus_...]... [--fix --cancel IDENTIFIER... [--yes]]

What is compared. For each Stripe customer with ledger entries in the period (or named with --customer):
- ledger: every unit committed in the period (ledger entries with period.start <= ts_ms < period.end);
- settled: the part Stripe acknowledged (`settled_ms` set); pending: the rest, which is expected to be missing at
  Stripe. Of the pending units, "in flight" ones were sent at least once and may already be at Stripe (the settler
  acknowledges them when it resends), dead-lettered ones were refused;
- stripe: the meter's event summary for the customer and the same window (GET /v1/billing/meters/{id}/event_summaries).
Stripe is compared with `settled`: diff = stripe - settled, and a customer mismatches when |diff| exceeds
--tolerance-percent of settled, unless the excess is covered by in-flight units.

Two meters. Commits in plain units settle to the units meter (settle_event_name) and are compared in units. Commits
priced from tokens settle to the token meter (settle_token_event_name, Stripe's LLM token billing) as token counts,
one event per token type: they are left out of the units table (a note says how many) and compared in a second table,
in tokens: each customer's tokens of every model and type (reasoning counted as output, as sent) against the token
meter's summary for the customer, which sums them likewise. Which meter an entry went to follows today's settings
(the ledger does not record it): with settle_token_event_name empty, token commits count as units.

Reading the ledger never writes the data dir and works while the sidecar runs (spendgate.store_reader).

Exit codes: 0 every customer within tolerance; 3 a customer differs by more than it (or --fix left one over);
1 reconciliation could not run (no Stripe key, no meter, Stripe or the data dir unreadable); 2 bad usage.

Fixing. Under-counts are fixed by settlement, not here. An over-count of the units meter can be corrected with meter
event adjustments
(type cancel), which Stripe accepts only within 24 hours of receiving the event. Stripe offers no API that lists meter
events, so the identifiers to cancel come from the operator (--cancel, --cancel-file: from the Dashboard or the logs
of whatever else sent them); `--fix` shows the hours in which Stripe has more than the ledger, to help find them, and
refuses identifiers that are the ledger's own (cancelling those would under-count for good). Token events are not
cancelled here (`--fix` acts on the units meter only); a token OVER row says so.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO, TypeVar

from spendgate.store_reader import StoreReader, StoreReadError, seq_key

if TYPE_CHECKING:
    import stripe

    from spendgate.config import Settings

T = TypeVar("T")

EXIT_OK: Final[int] = 0
EXIT_ERROR: Final[int] = 1
EXIT_MISMATCH: Final[int] = 3
DEFAULT_TOLERANCE_PERCENT: Final[float] = 1.0
# Stripe's window for cancelling an event: "within 24 hours of Stripe receiving them".
CANCEL_WINDOW_H: Final[int] = 24
# Tries of one read-only Stripe call (429, 5xx, connection errors), with exponential backoff from RETRY_BASE_S.
MAX_TRIES: Final[int] = 5
RETRY_BASE_S: Final[float] = 0.5
REQUEST_TIMEOUT_S: Final[float] = 30.0
# Over-counted hours shown per customer by --fix.
MAX_HOURS_SHOWN: Final[int] = 12
# A ledger entry without "kind" is a commit (every entry written before grants existed); a grant says "grant".
LEDGER_KIND_COMMIT: Final[str] = "commit"
# A meter event identifier spendgate made: sg-<reservation id>, maybe with the settler's -requeue<n> or -agg... suffix.
_OWN_IDENTIFIER: Final = re.compile(r"^sg-(?P<reservation_id>rsv_[0-9A-Za-z]+)")

STATUS_OK: Final[str] = "ok"
STATUS_IN_FLIGHT: Final[str] = "in flight"
# Stripe has less than the ledger settled, but no less than what it acknowledged only recently: its summaries are
# "an eventually consistent view of the reported usage" (billing.meter_event_summary), so that part may not show yet.
STATUS_NOT_VISIBLE: Final[str] = "not visible yet"
STATUS_OVER: Final[str] = "OVER"
STATUS_UNDER: Final[str] = "UNDER"
STATUS_ERROR: Final[str] = "error"
MISMATCHES: Final[frozenset[str]] = frozenset({STATUS_OVER, STATUS_UNDER})


class ReconcileError(RuntimeError):
    """Reconciliation cannot run; the message says why and what to do."""


# -- the period -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Period:
    """[start_s, end_s) in Unix seconds, minute-aligned (Stripe's summaries need that). `end_s` is the asked end, or
    the next minute from now when that comes first."""

    start_s: int
    end_s: int
    asked_end_s: int

    @property
    def start_ms(self) -> int:
        return self.start_s * 1000

    @property
    def end_ms(self) -> int:
        return self.end_s * 1000

    def describe(self) -> str:
        text = f"{_iso(self.start_s)} .. {_iso(self.asked_end_s)}"
        if self.end_s < self.asked_end_s:
            text += f" (so far: up to {_iso(self.end_s)})"
        return text


def _iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%MZ")


def _parse_time(text: str, what: str) -> int:
    """An ISO date (midnight UTC) or date-time (UTC unless it says otherwise) as Unix seconds."""
    value = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            moment = datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an ISO date (2026-11-01) or date-time (2026-11-01T12:00Z)") from None
    seconds = moment.timestamp()
    if seconds % 60:
        raise ValueError(f"{what} {text!r} is not on a whole minute (Stripe's meter summaries need that)")
    return int(seconds)


def _month_start(year: int, month: int) -> int:
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp())


def parse_period(period: str | None, start: str | None, end: str | None, now_s: float) -> Period:
    """The period of the flags: --period YYYY-MM, or --start [--end] (ISO; end exclusive, default now), or the
    current calendar month in UTC. Raises ValueError saying what is wrong."""
    if period is not None and (start is not None or end is not None):
        raise ValueError("give --period, or --start and --end, not both")
    if end is not None and start is None:
        raise ValueError("--end needs --start")
    if period is not None:
        match = re.fullmatch(r"(\d{4})-(\d{2})", period.strip())
        if not match or not 1 <= int(match[2]) <= 12:
            raise ValueError(f"--period {period!r} is not a month such as 2026-11")
        year, month = int(match[1]), int(match[2])
        start_s = _month_start(year, month)
        end_s = _month_start(year + month // 12, month % 12 + 1)
    elif start is not None:
        start_s = _parse_time(start, "--start")
        end_s = _parse_time(end, "--end") if end is not None else _next_minute(now_s)
    else:
        today = datetime.fromtimestamp(now_s, UTC)
        start_s = _month_start(today.year, today.month)
        end_s = _month_start(today.year + today.month // 12, today.month % 12 + 1)
    effective_end = min(end_s, _next_minute(now_s))
    if start_s >= effective_end:
        raise ValueError(f"the period {_iso(start_s)} .. {_iso(end_s)} has not begun yet, or is empty")
    return Period(start_s, effective_end, end_s)


def _next_minute(now_s: float) -> int:
    return (int(now_s) // 60 + 1) * 60


# -- the ledger side --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Row:
    stripe_customer_id: str
    budgets: set[str] = dataclasses.field(default_factory=set)
    ledger: int = 0
    settled: int = 0
    pending: int = 0
    in_flight: int = 0
    dead: int = 0
    recent: int = 0  # settled, but acknowledged by Stripe so recently that its summaries may not show it yet
    stripe: int | float | None = None
    status: str = ""

    @property
    def diff(self) -> int | float:
        return (self.stripe or 0) - self.settled

    def percent(self) -> str:
        if self.stripe is None:
            return ""
        if self.diff == 0:
            return "0.00%"
        if self.settled == 0:
            return "n/a"
        return f"{self.diff / self.settled * 100:+.2f}%"


def ledger_tokens(entry: Mapping[str, Any]) -> int:
    """The tokens a ledger entry settles as on the token meter: every type's (its events add up to this); 0 for a
    commit in plain units or a cache hit."""
    usage = entry.get("usage")
    return sum(int(part["tokens"]) for part in usage["parts"]) if usage else 0


def units_of(token_meter_on: bool) -> Callable[[Mapping[str, Any]], int | None]:
    """The measure of the units meter: an entry's amount, or None for an entry that settles on the token meter."""
    return lambda entry: None if token_meter_on and ledger_tokens(entry) else int(entry["amount"])


# The default measure: the committed amount, no token meter.
_AMOUNT_UNITS: Final = units_of(False)


def tokens_of(entry: Mapping[str, Any]) -> int | None:
    """The measure of the token meter: an entry's tokens, or None for one that settles on the units meter."""
    return ledger_tokens(entry) or None


def is_commit(entry: Mapping[str, Any]) -> bool:
    """A committed usage, billed to Stripe; not a credit grant (kind "grant": never sent, never on a meter)."""
    kind: str = entry.get("kind", LEDGER_KIND_COMMIT)
    return kind == LEDGER_KIND_COMMIT


def ledger_rows(
    store: StoreReader,
    period: Period | None,
    customers: Iterable[str] = (),
    measure: Callable[[Mapping[str, Any]], int | None] = _AMOUNT_UNITS,
    *,
    windows: Mapping[str, Period] | None = None,
    recent_after_ms: int | None = None,
) -> dict[str, Row]:
    """Per Stripe customer: ledger, settled, pending (in flight, dead-lettered) amounts committed in the period, each
    entry counted as `measure` says (None: not on this meter; default: every entry's units).
    `customers`: only these Stripe customers (every one with entries when empty; each named one gets a row).
    `windows`: instead of one period for all, each of these Stripe customers (and only they) over its own period.
    `recent_after_ms`: settled entries Stripe acknowledged after it also count in `recent` (not visible yet)."""
    only = set(customers) | set(windows or ())
    rows: dict[str, Row] = {customer: Row(customer) for customer in only}
    pending: dict[int, tuple[Row, int]] = {}
    for entry in store.ledger():
        if not is_commit(entry):
            continue
        customer = entry["stripe_customer_id"]
        window = period if windows is None else windows.get(customer)
        if window is None or not window.start_ms <= entry["ts_ms"] < window.end_ms:
            continue
        amount = measure(entry)
        if (only and customer not in only) or amount is None:
            continue
        row = rows.get(customer)
        if row is None:
            row = rows[customer] = Row(customer)
        row.budgets.add(entry["customer_id"])
        row.ledger += amount
        if entry.get("settled_ms") is not None:
            row.settled += amount
            if recent_after_ms is not None and entry["settled_ms"] > recent_after_ms:
                row.recent += amount
        else:
            row.pending += amount
            pending[entry["seq"]] = (row, amount)
    if pending:
        keys = [seq_key(seq) for seq in pending]
        outbox = store.get_many("outbox", keys)
        letters = store.get_many("dead_letters", keys)
        for seq, (row, amount) in pending.items():
            key = seq_key(seq)
            waiting = outbox.get(key)
            if key in letters:
                row.dead += amount
            elif (
                waiting is None or waiting.get("sent_as") or waiting.get("attempts") or waiting.get("first_attempt_ms")
            ):
                # Sent at least once, or acknowledged between the two reads: it may be at Stripe already.
                row.in_flight += amount
    return rows


# -- the Stripe side --------------------------------------------------------------------------------------------------


def with_retries(call: Callable[[], T], what: str, *, sleep: Callable[[float], None] = time.sleep) -> T:
    """call(), retried on 429, 5xx and connection errors (read-only calls and cancels are safe to repeat)."""
    import stripe  # noqa: PLC0415

    delay = RETRY_BASE_S
    for attempt in range(1, MAX_TRIES + 1):
        try:
            return call()
        except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as error:
            status = getattr(error, "http_status", None)
            retryable = isinstance(error, (stripe.RateLimitError, stripe.APIConnectionError)) or (status or 500) >= 500
            if not retryable or attempt == MAX_TRIES:
                raise ReconcileError(f"Stripe: {what} failed: {error}") from None
            sleep(delay)
            delay *= 2
        except stripe.StripeError as error:
            raise ReconcileError(f"Stripe: {what} failed: {_stripe_message(error)}") from None
    raise AssertionError("unreachable")


def _stripe_message(error: Any) -> str:
    status = getattr(error, "http_status", None)
    text = getattr(error, "user_message", None) or str(error)
    hint = ""
    if status == 401:
        hint = " (check STRIPE_API_KEY)"
    elif status == 403:
        hint = " (a restricted key needs read access to Billing meters, and write access to cancel events)"
    return f"{text}{hint}"


def find_meter(client: stripe.StripeClient, event_name: str) -> Mapping[str, Any]:
    """The active meter for an event name (GET /v1/billing/meters)."""
    meters = with_retries(
        lambda: [
            m.to_dict() for m in client.v1.billing.meters.list({"status": "active", "limit": 100}).auto_paging_iter()
        ],
        "listing meters",
    )
    for meter in meters:
        if meter.get("event_name") == event_name:
            return meter
    raise ReconcileError(
        f"Stripe has no active meter for event name {event_name!r} (settle_event_name); "
        f"active meters: {', '.join(sorted(str(m.get('event_name')) for m in meters)) or 'none'}"
    )


def stripe_total(client: stripe.StripeClient, meter_id: str, customer: str, start_s: int, end_s: int) -> int | float:
    """The meter's aggregated value for one customer over [start_s, end_s)."""
    params: Any = {"customer": customer, "start_time": start_s, "end_time": end_s}
    summaries = with_retries(
        lambda: [
            s.to_dict() for s in client.v1.billing.meters.event_summaries.list(meter_id, params).auto_paging_iter()
        ],
        f"event summaries of {customer}",
    )
    return _number(sum(summary["aggregated_value"] for summary in summaries))


def stripe_hours(
    client: stripe.StripeClient, meter_id: str, customer: str, start_s: int, end_s: int
) -> dict[int, int | float]:
    """The meter's value per UTC hour (value_grouping_window=hour) over whole hours covering [start_s, end_s)."""
    first, last = start_s // 3600 * 3600, -(-end_s // 3600) * 3600
    params: Any = {
        "customer": customer,
        "start_time": first,
        "end_time": last,
        "value_grouping_window": "hour",
        "limit": 100,
    }
    summaries = with_retries(
        lambda: [
            s.to_dict() for s in client.v1.billing.meters.event_summaries.list(meter_id, params).auto_paging_iter()
        ],
        f"hourly event summaries of {customer}",
    )
    return {int(summary["start_time"]): _number(summary["aggregated_value"]) for summary in summaries}


def _number(value: Any) -> int | float:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # type: ignore[no-any-return]


# -- judging and showing ----------------------------------------------------------------------------------------------


def judge(row: Row, tolerance_percent: float, *, live: bool = False) -> str:
    """ok, in flight (the excess is covered by units sent but not yet acknowledged), not visible yet (the shortfall is
    covered by units Stripe acknowledged recently), OVER or UNDER.

    live: the ledger was read from a running sidecar before Stripe was asked, so every unit still waiting in its outbox
    (not dead-lettered) may have been sent and accepted in between; it covers an excess as in-flight units do."""
    allowed = row.settled * tolerance_percent / 100
    diff = row.diff
    if abs(diff) <= allowed:
        return STATUS_OK
    sendable = row.pending - row.dead if live else row.in_flight
    assert sendable >= row.in_flight, (row.pending, row.dead, row.in_flight)
    if 0 < diff <= sendable + allowed:
        return STATUS_IN_FLIGHT
    if -(row.recent + allowed) <= diff < 0:
        return STATUS_NOT_VISIBLE
    return STATUS_OVER if diff > 0 else STATUS_UNDER


COLUMNS: Final[tuple[str, ...]] = (
    "customer",
    "budget",
    "ledger",
    "settled",
    "pending",
    "stripe",
    "difference",
    "%",
    "status",
)


def format_table(rows: Sequence[Row]) -> str:
    """The rows and a total, ids left-aligned, numbers right-aligned."""
    total = Row(
        "TOTAL",
        ledger=sum(r.ledger for r in rows),
        settled=sum(r.settled for r in rows),
        pending=sum(r.pending for r in rows),
        stripe=_number(sum(r.stripe or 0 for r in rows)) if rows else 0,
    )
    cells = [_cells(row) for row in rows] + [_cells(total, status="")]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(COLUMNS)]

    def line(values: Sequence[str]) -> str:
        left = [f"{values[i]:<{widths[i]}}" for i in (0, 1)]
        right = [f"{values[i]:>{widths[i]}}" for i in range(2, len(COLUMNS) - 1)]
        return "  ".join([*left, *right, values[-1]]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(COLUMNS), rule, *(line(c) for c in cells[:-1]), rule, line(cells[-1])])


def _cells(row: Row, status: str | None = None) -> list[str]:
    budgets = sorted(row.budgets)
    budget = budgets[0] + (f" (+{len(budgets) - 1})" if len(budgets) > 1 else "") if budgets else ""
    stripe = "?" if row.stripe is None else str(row.stripe)
    difference = "" if row.stripe is None else f"{row.diff:+}" if row.diff else "0"
    return [
        row.stripe_customer_id,
        budget,
        str(row.ledger),
        str(row.settled),
        str(row.pending),
        stripe,
        difference,
        row.percent(),
        row.status if status is None else status,
    ]


def notes(rows: Sequence[Row], tolerance_percent: float, unit: str = "units") -> list[str]:
    out: list[str] = []
    pending, in_flight, dead = (sum(getattr(r, name) for r in rows) for name in ("pending", "in_flight", "dead"))
    if pending:
        out.append(
            f"pending: {pending} {unit} are committed but not yet acknowledged by Stripe, so Stripe is compared with "
            f"`settled`. Of them {in_flight} are in flight (sent, maybe already counted by Stripe) and {dead} are "
            "dead-lettered (refused by Stripe: see the settler's dead letters)."
        )
    if any(r.status == STATUS_UNDER for r in rows):
        out.append(
            f"UNDER: Stripe has fewer {unit} than the ledger settled. Reconcile does not fix under-counts; settlement "
            "does: look for meter error reports in the sidecar's log (events Stripe accepted, then refused) and for "
            "dead letters. Stripe also aggregates asynchronously: usage settled minutes ago may not show yet."
        )
    if any(r.status == STATUS_OVER for r in rows) and unit == "units":
        out.append(
            "OVER: Stripe has more units than the ledger settled. `spendgate reconcile --fix --cancel IDENTIFIER` "
            f"cancels meter events Stripe recorded that the ledger does not have (within {CANCEL_WINDOW_H} hours of "
            "Stripe receiving them); --fix alone shows the hours to look at."
        )
    elif any(r.status == STATUS_OVER for r in rows):
        out.append(
            f"OVER: Stripe has more {unit} than the ledger settled. --fix does not cancel token events: cancel the "
            "extra ones with a meter event adjustment on the token meter (Dashboard, or the API) within "
            f"{CANCEL_WINDOW_H} hours of Stripe receiving them."
        )
    if any(r.status == STATUS_IN_FLIGHT for r in rows):
        out.append(
            "in flight: Stripe has more than the ledger settled, but no more than what was sent and not yet "
            "acknowledged; the settler acknowledges it when it resends (Stripe drops the duplicate)."
        )
    out += dead_letter_verdicts(rows, unit)
    out.append(f"tolerance: {tolerance_percent:g}% of settled.")
    return out


def dead_letter_verdicts(rows: Sequence[Row], unit: str = "units") -> list[str]:
    """For each customer with dead letters and nothing in flight: whether Stripe's total shows them missing (requeue
    them with --confirmed-missing) or already there (a requeue under a fresh identifier would bill them twice)."""
    out = []
    for row in rows:
        if not row.dead or row.in_flight or row.stripe is None:
            continue
        if row.stripe == row.settled:
            out.append(
                f"dead letters of {row.stripe_customer_id}: Stripe has {row.stripe} {unit}, the settled usage "
                f"without the {row.dead} dead-lettered: they are missing at Stripe. Requeue them with "
                "`spendgate deadletter requeue SEQ --confirmed-missing`."
            )
        elif row.stripe == row.settled + row.dead:
            out.append(
                f"dead letters of {row.stripe_customer_id}: Stripe has {row.stripe} {unit}, the settled usage "
                f"plus the {row.dead} dead-lettered: Stripe has them already. Do not requeue them."
            )
        else:
            out.append(
                f"dead letters of {row.stripe_customer_id}: Stripe's {row.stripe} {unit} is neither the "
                f"settled {row.settled} nor that plus the {row.dead} dead-lettered: reconcile a shorter period "
                "(--start/--end) around the dead letters' times before requeueing."
            )
    return out


# -- the command ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    period: str | None = None
    start: str | None = None
    end: str | None = None
    tolerance_percent: float = DEFAULT_TOLERANCE_PERCENT
    customers: tuple[str, ...] = ()
    fix: bool = False
    cancel: tuple[str, ...] = ()
    yes: bool = False


def make_client(settings: Settings) -> stripe.StripeClient:
    if not settings.stripe_api_key:
        raise ReconcileError("no Stripe key: set STRIPE_API_KEY (a restricted rk_ key with Billing read access works)")
    from spendgate.settle.stripe_client import make_client as settler_client  # noqa: PLC0415

    return settler_client(settings.stripe_api_key, settings.stripe_api_base, timeout_s=REQUEST_TIMEOUT_S)


def run(
    settings: Settings,
    options: Options,
    *,
    client: stripe.StripeClient | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    ask: Callable[[str], str] = input,
    now_s: float | None = None,
) -> int:
    """The `spendgate reconcile` command; returns its exit code."""
    try:
        period = parse_period(options.period, options.start, options.end, time.time() if now_s is None else now_s)
        if options.tolerance_percent < 0:
            raise ValueError("--tolerance-percent must be >= 0")
    except ValueError as error:
        print(f"spendgate reconcile: {error}", file=err)
        return 2
    try:
        return _run(settings, options, period, client, out, ask)
    except (ReconcileError, StoreReadError, OSError) as error:
        print(f"spendgate reconcile: {error}", file=err)
        return EXIT_ERROR


def _run(
    settings: Settings,
    options: Options,
    period: Period,
    client: stripe.StripeClient | None,
    out: TextIO,
    ask: Callable[[str], str],
) -> int:
    client = client if client is not None else make_client(settings)
    meter = find_meter(client, settings.settle_event_name)
    meter_id = str(meter["id"])
    check_sum(meter)
    token_name = settings.settle_token_event_name
    with StoreReader(settings.data_dir) as store:
        rows = ledger_rows(store, period, options.customers, units_of(bool(token_name)))
        token_rows = ledger_rows(store, period, (), tokens_of) if token_name else {}
    if options.customers:
        token_rows = {c: row for c, row in token_rows.items() if c in options.customers}
    ordered = [rows[key] for key in sorted(rows)]
    errors = _compare(client, meter_id, ordered, period, options.tolerance_percent)
    print(
        f"spendgate reconcile: data dir {settings.data_dir}, meter {settings.settle_event_name} ({meter_id}), "
        f"period {period.describe()}",
        file=out,
    )
    if meter.get("event_time_window"):
        print(
            f"note: the meter keeps only the last event per {meter['event_time_window']} (event_time_window): "
            "its summaries are not sums of the events sent",
            file=out,
        )
    print(format_table(ordered), file=out)
    for note in notes(ordered, options.tolerance_percent):
        print(note, file=out)
    tokens_ordered = [token_rows[key] for key in sorted(token_rows)]
    if tokens_ordered:
        print(
            f"note: {sum(r.ledger for r in tokens_ordered)} tokens committed in the period settle to the token meter "
            f"{token_name} (settle_token_event_name), not in units: they are left out of the table above and "
            "compared below, in tokens",
            file=out,
        )
        errors += _reconcile_tokens(client, token_name, tokens_ordered, period, options, out)
    for message in errors:
        print(f"error: {message}", file=out)
    mismatched = [row for row in ordered + tokens_ordered if row.status in MISMATCHES]
    if options.fix and not errors:
        code = _fix(settings, options, period, client, meter_id, ordered, out, ask)
        return EXIT_MISMATCH if code == EXIT_OK and any(r.status in MISMATCHES for r in tokens_ordered) else code
    return EXIT_MISMATCH if mismatched else EXIT_ERROR if errors else EXIT_OK


def check_sum(meter: Mapping[str, Any]) -> None:
    aggregation = (meter.get("default_aggregation") or {}).get("formula")
    if aggregation != "sum":
        raise ReconcileError(
            f"meter {meter['id']} aggregates with {aggregation!r}; only a `sum` meter can be compared with the ledger"
        )


def _compare(
    client: stripe.StripeClient, meter_id: str, rows: Sequence[Row], period: Period, tolerance_percent: float
) -> list[str]:
    """Fill each row's Stripe total and status; the errors of customers Stripe could not report on."""
    errors: list[str] = []
    for row in rows:
        try:
            row.stripe = stripe_total(client, meter_id, row.stripe_customer_id, period.start_s, period.end_s)
        except ReconcileError as error:  # one customer Stripe does not know must not hide the others
            row.status = STATUS_ERROR
            errors.append(str(error))
            continue
        row.status = judge(row, tolerance_percent)
    return errors


def _reconcile_tokens(
    client: stripe.StripeClient, token_name: str, rows: Sequence[Row], period: Period, options: Options, out: TextIO
) -> list[str]:
    """The token meter's table; returns the errors (a missing token meter is one: those tokens are not compared)."""
    try:
        meter = find_meter(client, token_name)
        check_sum(meter)
    except ReconcileError as error:
        for row in rows:
            row.status = STATUS_ERROR
        return [f"{error}; the {sum(r.ledger for r in rows)} tokens of commits priced from tokens were not compared"]
    meter_id = str(meter["id"])
    errors = _compare(client, meter_id, rows, period, options.tolerance_percent)
    print(
        f"\ntoken meter {token_name} ({meter_id}), in tokens (every model and token type of a customer together):",
        file=out,
    )
    print(format_table(rows), file=out)
    for note in notes(rows, options.tolerance_percent, unit="tokens")[:-1]:  # the tolerance was said above
        print(note, file=out)
    return errors


def _fix(
    settings: Settings,
    options: Options,
    period: Period,
    client: stripe.StripeClient,
    meter_id: str,
    rows: list[Row],
    out: TextIO,
    ask: Callable[[str], str],
) -> int:
    over = [row for row in rows if row.status == STATUS_OVER]
    under = [row for row in rows if row.status == STATUS_UNDER]
    print("", file=out)
    if under:
        print(
            f"fix: {len(under)} customer(s) are UNDER: reconcile does not fix under-counts; settlement does "
            "(requeue dead letters once their cause is fixed).",
            file=out,
        )
    if not over:
        print("fix: no customer is over-counted: nothing to cancel.", file=out)
        return EXIT_MISMATCH if under else EXIT_OK
    with StoreReader(settings.data_dir) as store:
        ledger_hours, own = _ledger_hours_and_owners(
            store,
            period,
            {r.stripe_customer_id for r in over},
            options.cancel,
            units_of(bool(settings.settle_token_event_name)),
        )
    for row in over:
        hours = stripe_hours(client, meter_id, row.stripe_customer_id, period.start_s, period.end_s)
        extra = [(hour, value - ledger_hours.get((row.stripe_customer_id, hour), 0)) for hour, value in hours.items()]
        extra = sorted((item for item in extra if item[1] > 0), reverse=True)
        print(
            f"fix: {row.stripe_customer_id} is over by {row.diff} units; hours in which Stripe has more than the "
            "ledger settled (UTC):",
            file=out,
        )
        for hour, amount in extra[:MAX_HOURS_SHOWN]:
            print(f"  {_iso(hour)}  +{amount}", file=out)
        if len(extra) > MAX_HOURS_SHOWN:
            print(f"  ... and {len(extra) - MAX_HOURS_SHOWN} more hours", file=out)
    if not options.cancel:
        print(
            "fix: Stripe has no API that lists meter events, so reconcile cannot tell which events are extra. Find "
            "their identifiers (Dashboard > Billing > Meters > the meter's events, or the logs of whatever else "
            "sent them) and run again with --fix --cancel IDENTIFIER ... (or --cancel-file FILE).",
            file=out,
        )
        return EXIT_MISMATCH
    refused = {identifier: why for identifier, why in own.items() if why}
    for identifier, why in refused.items():
        print(f"fix: not cancelling {identifier}: {why}", file=out)
    targets = [identifier for identifier in dict.fromkeys(options.cancel) if identifier not in refused]
    if not targets:
        print("fix: nothing left to cancel.", file=out)
        return EXIT_MISMATCH
    print(
        f"fix: will cancel {len(targets)} meter event(s) of {settings.settle_event_name} at Stripe "
        f"({', '.join(targets)}). Stripe cancels only events it received in the last {CANCEL_WINDOW_H} hours and "
        "ignores the rest; a cancel cannot be undone.",
        file=out,
    )
    if not options.yes:
        try:
            answer = ask("Cancel them? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("fix: nothing cancelled.", file=out)
            return EXIT_MISMATCH
    for identifier in targets:
        params = {"event_name": settings.settle_event_name, "type": "cancel", "cancel": {"identifier": identifier}}
        with_retries(
            lambda params=params: client.v1.billing.meter_event_adjustments.create(params),  # type: ignore[misc]
            f"cancelling {identifier}",
        )
        print(f"fix: asked Stripe to cancel {identifier}", file=out)
    for row in over:
        row.stripe = stripe_total(client, meter_id, row.stripe_customer_id, period.start_s, period.end_s)
        row.status = judge(row, options.tolerance_percent)
    print("\nafter the cancels:", file=out)
    print(format_table(over), file=out)
    still = [row for row in rows if row.status in MISMATCHES]
    if any(row.status == STATUS_OVER for row in over):
        print(
            "still OVER: Stripe applies cancels asynchronously (run reconcile again in a few minutes), and ignores "
            f"events received more than {CANCEL_WINDOW_H} hours ago (those need a credit note instead).",
            file=out,
        )
    return EXIT_MISMATCH if still else EXIT_OK


def _ledger_hours_and_owners(
    store: StoreReader,
    period: Period,
    customers: set[str],
    identifiers: Sequence[str],
    measure: Callable[[Mapping[str, Any]], int | None],
) -> tuple[dict[tuple[str, int], int], dict[str, str]]:
    """Settled units of the units meter per (customer, hour) in the period, each entry counted as `measure` says (a
    commit settled on the token meter is not on this meter: counting its units here would hide an over-count in its
    hour), and for each identifier to cancel why the ledger owns it ("" when it does not)."""
    reservations = {m["reservation_id"]: i for i in identifiers if (m := _OWN_IDENTIFIER.match(i))}
    owners: dict[str, str] = {identifier: "" for identifier in identifiers}

    def own(identifier: str, why: str) -> None:
        owners[identifier] = f"{owners[identifier]}; {why}" if owners[identifier] else why

    hours: dict[tuple[str, int], int] = {}
    for entry in store.ledger():
        if not is_commit(entry):
            continue
        identifier = reservations.get(entry["reservation_id"])
        if identifier is not None:
            own(
                identifier,
                f"it is the ledger's own event for reservation {entry['reservation_id']} "
                f"({entry['amount']} units of {entry['customer_id']}), and cancelling it would remove real "
                "usage from the invoice",
            )
        amount = measure(entry)
        if (
            entry["stripe_customer_id"] in customers
            and entry.get("settled_ms") is not None
            and period.start_ms <= entry["ts_ms"] < period.end_ms
            and amount is not None
        ):
            key = (entry["stripe_customer_id"], entry["ts_ms"] // 3_600_000 * 3600)
            hours[key] = hours.get(key, 0) + amount
    wanted = set(identifiers)
    for entry in store.outbox():
        for identifier in {entry.get("identifier"), entry.get("sent_as")} & wanted:
            own(str(identifier), f"outbox entry {entry['seq']} waits to be settled under it")
    for letter in store.dead_letters():
        entry = letter["entry"]
        for identifier in {entry.get("identifier"), entry.get("sent_as")} & wanted:
            own(str(identifier), f"it belongs to dead letter {entry['seq']}")
    return hours, owners


def read_identifiers(paths: Iterable[str]) -> list[str]:
    """Identifiers from files, one a line; blank lines and # comments ignored."""
    found: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as file:
            for line in file:
                text = line.split("#", 1)[0].strip()
                if text:
                    found.append(text)
    return found
