"""Type stubs for the native engine, `spendgate._core` (Rust, built by maturin from rust/src/python.rs).

The engine holds the budgets in lock-free counters and persists every change to LMDB through one group-commit writer
thread. A call that changes state returns at once with a durability `ticket`; the change is acknowledged to a client
only once `durable_ticket() >= ticket`. Wait with `wait_durable` (blocking, releases the GIL) or, from asyncio, watch
`notify_fd()` (see spendgate.server.durability).
"""

from typing import Final, TypedDict, final

from typing_extensions import disjoint_base

# Limits, in the units their names end with. Crossing one gives EngineError("invalid_argument" or
# "resource_exhausted"), never a crash or a wrong number.
MAX_ID_BYTES: Final[int]
"""Longest customer_id, stripe_customer_id or idempotency_key, in UTF-8 bytes."""
MAX_AMOUNT_UNITS: Final[int]
"""Largest amount or limit (2**53)."""
MAX_TTL_MS_CEILING: Final[int]
"""The largest max_ttl_ms an Engine accepts."""
MAX_LEDGER_PAGE: Final[int]
"""Most ledger entries one list_ledger page returns (1_000)."""
DEFAULT_LEDGER_PAGE: Final[int]
"""list_ledger's page size when none is given (100)."""
MAX_LEDGER_SCAN_PER_PAGE: Final[int]
"""LMDB ledger entries one list_ledger page looks at before it ends early with a cursor (20_000)."""
MAX_ARCHIVE_SCAN_PER_PAGE: Final[int]
"""Archived entries one list_ledger page decodes, in whole gzip members past it (20_000)."""
OTHER_VALUE: Final[str]
"""What a usage record sums labels past its tracking bounds under (as a value, or as a key)."""

# DenyReason numbers, the same as spendgate.v1.DenyReason.
DENY_NONE: Final[int]
DENY_INSUFFICIENT_BUDGET: Final[int]
DENY_TOO_MANY_HOLDS: Final[int]
DENY_FROZEN: Final[int]
ALERT_KINDS: Final[list[str]]
"""Every alert kind the engine stores, in spendgate.v1.AlertKind order."""
DENY_OVERAGE_BLOCKED: Final[int]
DENY_UNKNOWN_MODEL: Final[int]
DENY_HOLD_ENDED: Final[int]

# HoldState numbers, the same as spendgate.v1.HoldState.
HOLD_ACTIVE: Final[int]
HOLD_COMMITTED: Final[int]
HOLD_RELEASED: Final[int]
HOLD_EXPIRED: Final[int]

def renew_identity(data_dir: str, *, map_size_mb: int, now_ms: int) -> str:
    """Give a data dir no process serves (a restore's verified copy) a new instance id, returned as 16 hex digits:
    reservation ids from before are refused from then on, and its outbox entries are marked restored."""

@disjoint_base
class EngineError(Exception):
    """Every engine failure. `kind` picks the gRPC status; `message` says what was wrong and how to fix it.

    kind is one of: "invalid_argument", "not_found", "already_exists", "failed_precondition", "resource_exhausted",
    "unavailable", "internal". args == (kind, message).
    """

    kind: str
    message: str
    def __init__(self, kind: str, message: str) -> None: ...

@final
class ReserveOutcome:
    granted: bool
    reservation_id: str
    remaining: int
    reason: int
    expires_at_ms: int
    replayed: bool
    amount: int
    state: int
    """HoldState number: ACTIVE for a new hold; for a replay, what became of the hold since; 0 when denied."""
    over_limit: bool
    """Granted past the limit (soft mode)."""
    decided_by: str
    """The budget (the customer's, or its org's) whose limit or freeze decided a denial or was passed by a grant."""
    ticket: int
    """Durability ticket; 0 when nothing needs waiting for (a denial)."""

@final
class CommitOutcome:
    charged: int
    remaining: int
    over_reserved: bool
    excess: int
    replayed: bool
    hold_expired: bool
    over_limit: bool
    breaker_tripped: bool
    ticket: int

@final
class ReleaseOutcome:
    released: bool
    remaining: int
    state: int
    replayed: bool
    ticket: int

@final
class BalanceView:
    customer_id: str
    limit: int
    spent: int
    reserved: int
    remaining: int
    active_holds: int
    stripe_customer_id: str
    overdraft: int
    frozen: bool
    frozen_reason: str
    included: int
    soft_limit: int
    mode: str
    """"hard" or "soft"."""
    block_overage: bool
    parent_id: str
    members: int
    period: PeriodSpec
    period_start_ms: int
    period_end_ms: int
    """2**63 - 1 for a lifetime period."""
    breaker_multiplier: int | None
    """None: the server's breaker_multiplier."""
    credits: int
    """Granted credits in `limit` this period (granted or carried in); min(credits, max(0, limit - spent)) are
    unused."""
    stop_at: int
    """The customer's own stop-at (0: none): Reserve admits at most up to it, in either mode; it never raises
    enforcement past `limit`."""

class PeriodSpec(TypedDict, total=False):
    """{"kind": "monthly", "anchor_ms": ...}, {"kind": "fixed", "anchor_ms": ..., "length_ms": ...} or
    {"kind": "lifetime"}."""

    kind: str
    anchor_ms: int
    length_ms: int

@final
class SetBudgetOutcome:
    balance: BalanceView
    created: bool
    rolled: bool
    """The call closed the current period and started a new one."""
    ticket: int

@final
class GrantOutcome:
    customer_id: str
    amount: int
    reason: str
    """The reason the grant was made with (a replay's is the first call's)."""
    granted_ms: int
    limit_after: int
    """The limit (with credits) right after the grant."""
    credits_after: int
    replayed: bool
    """This call repeated an earlier grant under the same key: nothing was added."""
    balance: BalanceView
    ticket: int

class UsageDetail(TypedDict):
    """The token usage behind a committed amount: parts are (token_type, tokens, units) and sum to the amount."""

    model: str
    parts: list[tuple[str, int, int]]
    cache_hit: bool
    fallback: bool

class UsageRecord(TypedDict):
    customer_id: str
    period_start_ms: int
    period_end_ms: int
    current: bool
    limit: int
    """With the unused credits (of the period's close, for a closed period)."""
    included: int
    credits: int
    granted: int
    """Credits granted in the period (not usage: not in `units`)."""
    grants: int
    units: int
    commits: int
    days: list[tuple[int, int]]
    """(days since 1970-01-01 UTC, units), days with usage only."""
    models: list[tuple[str, str, int, int]]
    """(model, token_type, tokens, units)."""
    dimensions: list[tuple[str, str, int]]
    """(key, value, units)."""

class ClosedPeriod(TypedDict):
    customer_id: str
    start_ms: int
    end_ms: int
    closed_ms: int
    limit: int
    included: int
    spent: int
    overdraft: int
    credits: int
    """The unused credits when it closed: its limit was limit + credits."""

class AlertEntry(TypedDict):
    seq: int
    kind: str
    """soft_limit_crossed, limit_reached, breaker_tripped, frozen, unfrozen or settlement_dead_letter."""
    customer_id: str
    ts_ms: int
    message: str
    values: dict[str, int]
    instance_id: str
    """The instance id (16 hex digits) of the data dir that raised it; all zeros before instance ids."""

class OutboxEntry(TypedDict):
    seq: int
    identifier: str
    customer_id: str
    stripe_customer_id: str
    amount: int
    ts_ms: int
    sent_as: str | None
    first_attempt_ms: int | None
    attempts: int
    requeues: int
    restored_ms: int | None
    """Set when the entry came back with a restored backup: it may be at Stripe already."""
    usage: UsageDetail | None
    """Token usage: settled as Stripe LLM token-billing events instead of one units event."""

class DeadLetterEntry(OutboxEntry):
    reason: str
    dead_ms: int
    requeues: int
    fate_unknown: bool
    """The event may be at Stripe already: a requeue needs confirmed_missing."""

class LedgerRow(TypedDict):
    """One ledger entry with its settlement state (list_ledger)."""

    seq: int
    reservation_id: str
    customer_id: str
    stripe_customer_id: str
    parent: str
    """The org the entry's budget is a member of ("" for none)."""
    amount: int
    reserved: int
    excess: int
    ts_ms: int
    settled_ms: int | None
    period_start_ms: int
    usage: UsageDetail | None
    dimensions: dict[str, str]
    state: str
    """"pending" (in the outbox), "sent" (accepted by Stripe), "dead_letter", or "credit" (a grant: never billed)."""
    kind: str
    """"commit" (usage) or "grant" (credits added by Admin.GrantCredits: not usage)."""
    reason: str
    """A grant's reason ("" for a commit)."""
    identifier: str
    """The entry's own meter event identifier (sg-<reservation id>, -requeue<n> once requeued)."""
    claim: str | None
    """The claim its meter event(s) went out under (spendgate.settle.aggregate.event_identifiers); None until it is
    first sent, or for an entry settled before claims were kept."""
    dead_letter_reason: str
    archived: bool
    """Read from the ledger archive (settled, closed period past ledger_retention_days)."""

class LedgerPage(TypedDict):
    entries: list[LedgerRow]
    next_after: int
    """The cursor for the next page (when more is false: the last seq looked at)."""
    more: bool
    period_start_ms: int
    period_end_ms: int
    scanned: int
    """Entries looked at (LMDB's and the archive's)."""

class OutboxStats(TypedDict):
    depth: int
    oldest_ts_ms: int | None
    dead_letters: int
    max_entries: int

@final
class Engine:
    """One LMDB environment under `data_dir`, opened by one Engine per process.

    durability: "fsync" (default; survives power loss) or "relaxed" (no fsync; survives kill -9, not power loss).
    """

    def __new__(
        cls,
        data_dir: str,
        *,
        map_size_mb: int = 1024,
        map_max_mb: int = 0,
        disk_reserve_mb: int = 256,
        ledger_retention_days: int = 180,
        durability: str = "fsync",
        default_ttl_ms: int = 60_000,
        max_ttl_ms: int = 3_600_000,
        max_holds_per_budget: int = 10_000,
        max_active_holds: int = 1_000_000,
        max_budgets: int = 1_000_000,
        write_queue_capacity: int = 65_536,
        reap_interval_ms: int = 100,
        resolved_retention_ms: int = 7 * 86_400_000,
        prune_interval_ms: int = 60_000,
        max_outbox_entries: int = 10_000_000,
        default_period: str = "month",
        breaker_multiplier: int = 10,
        breaker_recent_ms: int = 3_600_000,
        breaker_window_ms: int = 86_400_000,
        breaker_min_units: int = 0,
        max_clock_step_ms: int = 1_000,
        clock_step_confirm_ms: int = 900_000,
    ) -> Engine: ...
    def reserve(
        self,
        customer_id: str,
        amount: int,
        idempotency_key: str = "",
        ttl_ms: int = 0,
        *,
        model: str = "",
        dimensions: dict[str, str] | None = None,
        fingerprint: str = "",
    ) -> ReserveOutcome:
        """Hold `amount` for the customer (and its org). `model` is remembered for the Commit; `fingerprint` replaces
        the amount in the idempotency check (a priced estimate: model and token counts)."""
    def quote(self, customer_id: str, amount: int) -> ReserveOutcome:
        """What reserve(customer_id, amount) would answer now, holding nothing: reservation_id "", ticket 0."""
    def commit(
        self,
        reservation_id: str,
        amount: int,
        *,
        usage: UsageDetail | None = None,
        dimensions: dict[str, str] | None = None,
    ) -> CommitOutcome:
        """Post the actual amount; `usage` (its parts sum to amount) and `dimensions` go to the ledger and the usage
        views."""
    def hold_model(self, reservation_id: str) -> str:
        """The model the Reserve priced ("" for a plain amount). NOT_FOUND for an unknown reservation."""
    def release(self, reservation_id: str) -> ReleaseOutcome: ...
    def balance(self, customer_id: str) -> BalanceView: ...
    def list_budgets(self, prefix: str = "", limit: int = 100) -> list[BalanceView]:
        """Budgets whose customer_id starts with prefix, in customer_id order; at most `limit` (<= 10_000)."""
    def set_budget(self, customer_id: str, limit: int, stripe_customer_id: str = "") -> SetBudgetOutcome: ...
    def set_frozen(self, customer_id: str, frozen: bool) -> SetBudgetOutcome:
        """Freeze (every Reserve denied with DENY_FROZEN) or unfreeze. Existing holds still commit."""
    def update_budget(
        self,
        customer_id: str,
        *,
        limit: int | None = None,
        stripe_customer_id: str | None = None,
        included: int | None = None,
        soft_limit: int | None = None,
        mode: str | None = None,
        block_overage: bool | None = None,
        parent_id: str | None = None,
        period: PeriodSpec | None = None,
        breaker_multiplier: int | None = None,
        stop_at: int | None = None,
    ) -> SetBudgetOutcome:
        """Create a budget (limit required) or change what is given; None leaves a setting unchanged. mode: "hard" or
        "soft"; breaker_multiplier: -1 the server's, 0 off, 2..=1000; stop_at: the customer's own stop-at, 0 removes it
        (it caps what Reserve admits, in either mode, and never raises it past limit). A period starting later than the
        current one starts now (the old one is closed and kept)."""
    def grant_credits(self, customer_id: str, amount: int, idempotency_key: str, reason: str = "") -> GrantOutcome:
        """Add `amount` credits to the budget's limit, once per idempotency key (keys are global); ALREADY_EXISTS for
        a key used with another customer or amount."""
    def freeze(self, customer_id: str, frozen: bool, reason: str) -> SetBudgetOutcome:
        """Freeze or unfreeze, saying why (kept with the budget and put in the alert)."""
    def usage(self, customer_id: str, at_ms: int | None = None) -> UsageRecord:
        """Usage of the period containing at_ms (None: the current one); durable commits only."""
    def list_ledger(self, customer_id: str, at_ms: int | None = None, after: int = 0, limit: int = 100) -> LedgerPage:
        """The ledger entries of the period containing at_ms (None: the current one) with seq > after, oldest first,
        LMDB's and the archive's, at most limit (1..=MAX_LEDGER_PAGE); an org's include its members'. Page on with
        next_after while more is true."""
    def closed_periods(self, customer_id: str, limit: int = 100) -> list[ClosedPeriod]:
        """The budget's closed periods, newest first (limit 1..=1000)."""
    def roll_due(self) -> int:
        """Start the periods that have ended (the engine does this itself every reap_interval_ms)."""
    def raise_alert(self, kind: str, customer_id: str, message: str, values: dict[str, int] | None = None) -> int:
        """Store an alert durably; only "settlement_dead_letter", "invoice_spike" and "reconcile_divergence" may be
        raised from outside (the engine raises the others itself). Returns a ticket."""
    def alerts_after(self, after_seq: int, limit: int = 1000) -> list[AlertEntry]:
        """Durable alerts with seq > after_seq, oldest first (limit 1..=10_000)."""
    def alert_seq(self) -> int:
        """The newest durable alert's seq (0: none)."""
    def alert_cursor(self) -> int:
        """The alert webhook's delivery cursor (every alert up to it was delivered)."""
    def set_alert_cursor(self, seq: int) -> int:
        """Advance the cursor (it never goes back). Returns a ticket."""
    # -- settlement: the outbox that Commit writes in the same transaction as the ledger entry --------------------
    def outbox_pending(self, limit: int = 1000) -> list[OutboxEntry]:
        """The oldest `limit` (1..=10_000) durable outbox entries, in ledger order."""
    def outbox_claim(self, seqs: list[int], identifier: str) -> int:
        """Fix the meter-event identifier of these entries before the first send (an entry keeps its first claim,
        so a resend repeats the same event). Returns a ticket: wait for it before sending."""
    def outbox_ack(self, seqs: list[int]) -> int:
        """Stripe accepted these: remove them and mark their ledger entries settled. Idempotent. Returns a ticket."""
    def outbox_dead_letter(self, seqs: list[int], reason: str, *, fate_unknown: bool = False) -> int:
        """Stripe refused these for good: move them to the dead letters with `reason` (1..=1024 bytes).
        fate_unknown: they may be at Stripe already (an earlier send went unanswered; restored entries always are)."""
    def dead_letters(self, limit: int = 1000) -> list[DeadLetterEntry]: ...
    def dead_letter_requeue(self, seq: int, *, confirmed_missing: bool = False) -> int:
        """Back to the outbox under a fresh identifier (`<identifier>-requeue<n>`, n counting every requeue).
        NOT_FOUND if no such letter; FAILED_PRECONDITION for a fate_unknown letter without confirmed_missing."""
    def put_document(self, name: str, body: str) -> int:
        """Replace a named document (the webhooks' state) in LMDB, in ticket order after every change submitted
        before it, so a durable state that holds it holds those changes too. Returns a ticket."""
    def document(self, name: str) -> str | None:
        """The durable body of a named document, or None."""
    @property
    def instance_id(self) -> str:
        """This data dir's random instance id (16 hex digits), in every reservation id it issues."""
    def outbox_stats(self) -> OutboxStats: ...
    def backup(self, dest_dir: str) -> int:
        """Write a consistent, compacted copy of the environment to dest_dir/data.mdb while serving (dest_dir: an
        absolute path, new or empty; the file is created 0600 and exclusively; GIL released). Returns its size in
        bytes. Restore it with `spendgate restore`, which gives the copy a new instance id."""
    def durable_ticket(self) -> int:
        """The highest ticket whose change is durable in LMDB."""
    def wait_durable(self, ticket: int, timeout_ms: int = 30_000) -> None:
        """Block (without the GIL) until `ticket` is durable. Raises EngineError("unavailable") if the writer
        failed or the engine closed first, and EngineError("unavailable") on timeout."""
    def notify_fd(self) -> int:
        """A non-blocking file descriptor that becomes readable when durable_ticket() advances or the engine fails.
        Drain it with os.read; then read durable_ticket() and failure()."""
    def failure(self) -> str | None:
        """Why the writer stopped, or None while it is healthy. After a failure every call raises
        EngineError("unavailable"): restart the process; LMDB still holds every acknowledged change."""
    def reap_expired(self) -> int:
        """Expire due holds now (the engine also does this itself every reap_interval_ms). Returns how many."""
    def stats(self) -> dict[str, int]:
        """Counters for metrics: budgets, active_holds, queue_depth, durable_ticket, map_size_bytes,
        map_used_bytes (pages holding data), map_high_water_bytes, map_capacity_bytes, expired_total, batches_total,
        ops_total, outbox_depth, breaker_trips_total, periods_rolled_total, alert_seq, clock_steps_total (wall-clock
        steps seen since the start), clock_step_pending_ms (the step not yet followed, wall minus trusted time; 0 while
        the clocks agree)."""
    def check_invariants(self) -> None:
        """Verify the in-memory books (held equals the sum of open holds; available == limit - spent - held;
        spent + held <= limit + overdraft). Raises EngineError("internal") naming the first broken one."""
    def close(self) -> None:
        """Write everything queued, make it durable, stop the threads, close LMDB and release the data dir (so it
        can be reopened, in this process or another). Every later call raises EngineError("unavailable").
        Idempotent."""
