"""spendgate.v1.Admin: operator calls, in the same convert-call-wait-convert shape as the Budget service."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc.aio

from spendgate import _core
from spendgate._core import EngineError
from spendgate.policy.usage_report import NEVER_MS
from spendgate.server.budget_service import balance_message, period_at
from spendgate.server.durability import DurabilityWaiter
from spendgate.server.status import grpc_errors
from spendgate.service.budgets import grant_credits
from spendgate.service.usage_links import UsageLinks
from spendgate.service.virtual_keys import KeyRecord, VirtualKeys
from spendgate.settle.aggregate import event_identifiers
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from spendgate.settle import SettlementService
    from spendgate.webhooks.invoices import InvoiceGuard

# Quoted: grpc.aio.ServicerContext is generic only in the type stubs.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# ListBudgets with limit 0 returns this many; the engine caps any limit at 10_000.
DEFAULT_LIST_LIMIT: Final[int] = 100
# ListLedger: the engine's page bounds (a limit past the most is INVALID_ARGUMENT, 0 means the default).
DEFAULT_LEDGER_PAGE: Final[int] = _core.DEFAULT_LEDGER_PAGE
MAX_LEDGER_PAGE: Final[int] = _core.MAX_LEDGER_PAGE
SETTLEMENT_STATES: Final[dict[str, pb.SettlementState]] = {
    "pending": pb.SETTLEMENT_STATE_PENDING, "sent": pb.SETTLEMENT_STATE_SENT,
    "dead_letter": pb.SETTLEMENT_STATE_DEAD_LETTER, "credit": pb.SETTLEMENT_STATE_CREDIT,
}  # fmt: skip


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(
        self,
        engine: _core.Engine,
        waiter: DurabilityWaiter,
        settlement: SettlementService | None = None,
        *,
        backup_dir: str = "",
    ) -> None:
        self._engine = engine
        self._waiter = waiter
        self._settlement = settlement
        self._backup_dir = os.path.realpath(backup_dir) if backup_dir else ""

    @grpc_errors
    async def SetBudget(self, request: pb.SetBudgetRequest, context: Context) -> pb.SetBudgetResponse:
        outcome = self._engine.update_budget(request.customer_id, **budget_update(request))
        await self._waiter.wait(outcome.ticket)
        return pb.SetBudgetResponse(
            balance=balance_message(outcome.balance), created=outcome.created, rolled=outcome.rolled
        )

    @grpc_errors
    async def GrantCredits(self, request: pb.GrantCreditsRequest, context: Context) -> pb.GrantCreditsResponse:
        outcome = await grant_credits(
            self._engine,
            self._waiter.wait,
            request.customer_id,
            request.amount,
            request.idempotency_key,
            request.reason,
        )
        return pb.GrantCreditsResponse(
            customer_id=outcome.customer_id, amount=outcome.amount, reason=outcome.reason,
            granted_ms=outcome.granted_ms, limit_after=outcome.limit_after, credits_after=outcome.credits_after,
            replayed=outcome.replayed, balance=balance_message(outcome.balance),
        )  # fmt: skip

    @grpc_errors
    async def FreezeBudget(self, request: pb.FreezeBudgetRequest, context: Context) -> pb.SetBudgetResponse:
        reason = request.reason or (
            "frozen by an operator (Admin.FreezeBudget)"
            if request.frozen
            else "unfrozen by an operator (Admin.FreezeBudget)"
        )
        outcome = self._engine.freeze(request.customer_id, request.frozen, reason)
        await self._waiter.wait(outcome.ticket)
        return pb.SetBudgetResponse(balance=balance_message(outcome.balance), created=False)

    @grpc_errors
    async def ListBudgets(self, request: pb.ListBudgetsRequest, context: Context) -> pb.ListBudgetsResponse:
        views = self._engine.list_budgets(request.prefix, request.limit or DEFAULT_LIST_LIMIT)
        return pb.ListBudgetsResponse(budgets=[balance_message(view) for view in views])

    @grpc_errors
    async def ListDeadLetters(self, request: pb.ListDeadLettersRequest, context: Context) -> pb.ListDeadLettersResponse:
        letters = self._engine.dead_letters(request.limit or DEFAULT_LIST_LIMIT)
        return pb.ListDeadLettersResponse(dead_letters=[dead_letter_message(letter) for letter in letters])

    @grpc_errors
    async def RequeueDeadLetter(
        self, request: pb.RequeueDeadLetterRequest, context: Context
    ) -> pb.RequeueDeadLetterResponse:
        ticket = self._engine.dead_letter_requeue(request.seq, confirmed_missing=request.confirmed_missing)
        await self._waiter.wait(ticket)
        return pb.RequeueDeadLetterResponse(seq=request.seq)

    @grpc_errors
    async def GetSettlementStatus(
        self, request: pb.GetSettlementStatusRequest, context: Context
    ) -> pb.SettlementStatus:
        if self._settlement is not None:
            return pb.SettlementStatus(**self._settlement.snapshot())
        stats = self._engine.outbox_stats()  # a server built without settlement (tests): report it off
        return pb.SettlementStatus(
            enabled=False,
            outbox_depth=stats["depth"],
            max_outbox_entries=stats["max_entries"],
            dead_letters=stats["dead_letters"],
        )

    @grpc_errors
    async def ListLedger(self, request: pb.ListLedgerRequest, context: Context) -> pb.ListLedgerResponse:
        at_ms = period_at(self._engine, request.customer_id, request.period)
        limit = request.limit or DEFAULT_LEDGER_PAGE
        # In a thread: a page may read archive files, and the loop keeps serving meanwhile.
        page = await asyncio.to_thread(self._engine.list_ledger, request.customer_id, at_ms, request.after, limit)
        return pb.ListLedgerResponse(
            entries=[ledger_entry_message(row) for row in page["entries"]],
            next_after=page["next_after"],
            more=page["more"],
            period_start_ms=page["period_start_ms"],
            period_end_ms=0 if page["period_end_ms"] == NEVER_MS else page["period_end_ms"],
            scanned=page["scanned"],
        )

    @grpc_errors
    async def Backup(self, request: pb.BackupRequest, context: Context) -> pb.BackupResponse:
        # Relative paths would land in the sidecar's working directory, not the caller's: refuse them.
        if not os.path.isabs(request.dest_dir):
            raise _core.EngineError(
                "invalid_argument",
                f"dest_dir {request.dest_dir!r} is not an absolute path: pass "
                "an absolute directory on the sidecar's machine (`spendgate backup` does)",
            )
        if self._backup_dir and not _is_under(request.dest_dir, self._backup_dir):
            raise _core.EngineError(
                "invalid_argument",
                f"dest_dir {request.dest_dir!r} is not under backup_dir "
                f"{self._backup_dir!r}: pass a directory inside it (the setting confines backups)",
            )
        if self._settlement is not None:
            # With aggregation possible, an entry unclaimed in the backup might later leave in an aggregate the
            # restored copy cannot repeat: claimed now, it leaves alone under its own identifier in both.
            await self._settlement.prepare_backup()
        durable_ticket = self._engine.durable_ticket()  # every acknowledged change is at or below it
        started_ms = time.time_ns() // 1_000_000
        # In a thread: copying a large environment takes a while, and the loop keeps serving meanwhile.
        size_bytes = await asyncio.to_thread(self._engine.backup, request.dest_dir)
        return pb.BackupResponse(
            dest_dir=request.dest_dir,
            size_bytes=size_bytes,
            durable_ticket=durable_ticket,
            started_ms=started_ms,
            duration_ms=time.time_ns() // 1_000_000 - started_ms,
        )

    # Set by the app (spendgate.server.app) after construction; None in a server built without them.
    virtual_keys: VirtualKeys | None = None

    def _keys(self) -> VirtualKeys:
        if self.virtual_keys is None:
            raise _core.EngineError("failed_precondition", "this server was built without virtual keys")
        return self.virtual_keys

    @grpc_errors
    async def CreateVirtualKey(
        self, request: pb.CreateVirtualKeyRequest, context: Context
    ) -> pb.CreateVirtualKeyResponse:
        key, record = await self._keys().create(request.customer_id)
        return pb.CreateVirtualKeyResponse(key=key, virtual_key=_virtual_key(record))

    @grpc_errors
    async def ListVirtualKeys(self, request: pb.ListVirtualKeysRequest, context: Context) -> pb.ListVirtualKeysResponse:
        return pb.ListVirtualKeysResponse(
            virtual_keys=[_virtual_key(r) for r in self._keys().records(request.customer_id)]
        )

    @grpc_errors
    async def RevokeVirtualKey(
        self, request: pb.RevokeVirtualKeyRequest, context: Context
    ) -> pb.RevokeVirtualKeyResponse:
        gone = await self._keys().revoke(request.key_id_or_customer_id)
        if not gone:
            raise _core.EngineError(
                "not_found", f"no virtual key has id or customer {request.key_id_or_customer_id!r} (spendgate key list)"
            )
        return pb.RevokeVirtualKeyResponse(revoked=[_virtual_key(r) for r in gone])

    # Set by the app: the invoice-spike guard (spendgate.webhooks.invoices); None in a server built without it.
    invoice_guard: InvoiceGuard | None = None

    @grpc_errors
    async def ReleaseInvoice(self, request: pb.ReleaseInvoiceRequest, context: Context) -> pb.ReleaseInvoiceResponse:
        if self.invoice_guard is None:
            raise _core.EngineError("failed_precondition", "this server was built without the invoice-spike guard")
        done = await self.invoice_guard.release(request.invoice_id)
        return pb.ReleaseInvoiceResponse(
            invoice_id=done.invoice_id,
            stripe_customer_id=done.stripe_customer_id,
            status=done.status,
            auto_advance=done.auto_advance,
            was_held=done.was_held,
            total=done.total,
            currency=done.currency,
        )

    # Set by the app once http_listen is bound; None: no HTTP port, so no usage page to link to.
    usage_links: UsageLinks | None = None

    @grpc_errors
    async def CreateUsageLink(self, request: pb.CreateUsageLinkRequest, context: Context) -> pb.CreateUsageLinkResponse:
        if self.usage_links is None:
            raise _no_usage_links()
        url, path, grant = self.usage_links.create(
            self._engine,
            request.customer_id,
            ttl_ms=request.ttl_ms,
            allow_limit=request.allow_limit,
            ceiling=request.ceiling,
            now_ms=time.time_ns() // 1_000_000,
        )
        return pb.CreateUsageLinkResponse(
            url=url, path=path, expires_at_ms=grant.expires_at_s * 1000, scope=grant.scope, ceiling=grant.ceiling
        )


def _no_usage_links() -> EngineError:
    return EngineError(
        "failed_precondition",
        "this sidecar serves no usage page: set http_listen (the usage page is "
        "served there, at the links Admin.CreateUsageLink makes)",
    )


def ledger_entry_message(row: _core.LedgerRow) -> pb.LedgerEntry:
    usage = row["usage"]
    parts = [pb.UsagePart(token_type=t, tokens=n, units=u) for t, n, u in usage["parts"]] if usage else []
    return pb.LedgerEntry(
        seq=row["seq"],
        ts_ms=row["ts_ms"],
        reservation_id=row["reservation_id"],
        customer_id=row["customer_id"],
        parent=row["parent"],
        amount=row["amount"],
        reserved=row["reserved"],
        excess=row["excess"],
        model=usage["model"] if usage else "",
        parts=parts,
        cache_hit=bool(usage and usage["cache_hit"]),
        dimensions=row["dimensions"],
        stripe_customer_id=row["stripe_customer_id"],
        identifier=row["identifier"],
        meter_event_identifiers=event_identifiers(row["claim"], usage),
        state=SETTLEMENT_STATES[row["state"]],
        settled_ms=row["settled_ms"] or 0,
        dead_letter_reason=row["dead_letter_reason"],
        archived=row["archived"],
        period_start_ms=row["period_start_ms"],
        claim=row["claim"] or "",
        kind=row["kind"],
        reason=row["reason"],
    )


def _virtual_key(record: KeyRecord) -> pb.VirtualKey:
    return pb.VirtualKey(key_id=record.key_id, customer_id=record.customer_id, created_ms=record.created_ms)


def _is_under(path: str, root: str) -> bool:
    """Whether `path`, with every symlink of its existing part resolved, is `root` or inside it."""
    resolved = os.path.realpath(path)
    return resolved != root and os.path.commonpath([resolved, root]) == root


MODE_NAMES: Final[dict[int, str]] = {pb.ENFORCEMENT_MODE_HARD: "hard", pb.ENFORCEMENT_MODE_SOFT: "soft"}


def budget_update(request: pb.SetBudgetRequest) -> dict[str, Any]:
    """The engine's update_budget keyword arguments: only what the request sets (the rest stays unchanged)."""
    update: dict[str, Any] = {
        name: getattr(request, name)
        for name in ("limit", "included", "soft_limit", "block_overage", "breaker_multiplier", "stop_at")
        if request.HasField(name)
    }
    if request.stripe_customer_id:
        update["stripe_customer_id"] = request.stripe_customer_id
    if request.mode != pb.ENFORCEMENT_MODE_UNSPECIFIED:
        if request.mode not in MODE_NAMES:
            raise EngineError("invalid_argument", f"mode {request.mode} is not HARD (1) or SOFT (2)")
        update["mode"] = MODE_NAMES[request.mode]
    if request.parent_id:
        update["parent_id"] = request.parent_id
    if request.HasField("period"):
        update["period"] = period_spec(request.period)
    return update


def period_spec(period: pb.Period) -> _core.PeriodSpec:
    """A Period message as the engine's period dict. FIXED is given as the current period [start_ms, end_ms)."""
    if period.kind == pb.PERIOD_KIND_MONTHLY:
        return {"kind": "monthly", "anchor_ms": period.anchor_ms}
    if period.kind == pb.PERIOD_KIND_LIFETIME:
        return {"kind": "lifetime"}
    if period.kind == pb.PERIOD_KIND_FIXED:
        if period.end_ms <= period.start_ms:
            raise EngineError(
                "invalid_argument",
                f"a FIXED period needs start_ms < end_ms (the current period), got {period.start_ms}..{period.end_ms}",
            )
        return {"kind": "fixed", "anchor_ms": period.start_ms, "length_ms": period.end_ms - period.start_ms}
    raise EngineError("invalid_argument", "period.kind is unset: use MONTHLY, FIXED or LIFETIME")


def dead_letter_message(letter: _core.DeadLetterEntry) -> pb.DeadLetter:
    return pb.DeadLetter(
        seq=letter["seq"],
        identifier=letter["identifier"],
        sent_as=letter["sent_as"] or "",
        customer_id=letter["customer_id"],
        stripe_customer_id=letter["stripe_customer_id"],
        amount=letter["amount"],
        ts_ms=letter["ts_ms"],
        first_attempt_ms=letter["first_attempt_ms"] or 0,
        attempts=letter["attempts"],
        reason=letter["reason"],
        dead_ms=letter["dead_ms"],
        requeues=letter["requeues"],
        fate_unknown=letter["fate_unknown"],
    )
