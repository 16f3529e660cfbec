"""The app-facing spendgate client, in a blocking (`Client`) and an asyncio (`AsyncClient`) flavour.

    from spendgate.client import Client, BudgetExceeded

    client = Client("127.0.0.1:50051")
    try:
        with client.reserve("cus_123", amount=500) as hold:   # Reserve; a denial raises BudgetExceeded here
            usage = call_the_llm()
            hold.commit(usage)                               # Commit the actual amount
    except BudgetExceeded as denied:
        ...                                                  # denied.reason, denied.remaining, denied.message

How a `with client.reserve(...)` block ends the hold:
- `hold.commit(actual)` or `hold.release()` inside the block: the hold is settled; leaving the block does nothing more.
- An exception escapes the block before either: the hold is released, then the exception propagates.
- The block ends normally without either: the FULL reserved amount is committed. This is deliberate: usage is never
  silently dropped, so forgetting to commit overcharges by at most the hold instead of undercharging.

Retries: UNAVAILABLE is retried, with exponential backoff and full jitter, up to `RetryPolicy.max_attempts` attempts
- on Reserve only when it carries an idempotency key, so a retry replays the first reservation instead of holding
  twice. Reserve without a key gets a fresh uuid4 key, so every Reserve is retried safely. Pass your own key (stable
  across your own retries, e.g. the request id) to make the replay cover your retries too.
- on Commit and Release always: the server makes them idempotent per reservation.
Nothing else is retried. Every attempt has its own deadline of `timeout_s`.

Errors: every gRPC error becomes a `SpendgateError` subclass (`InvalidArgument`, `NotFound`, `AlreadyExists`, ...,
see `error_from_rpc`) carrying the server's status code and message. A denial is not an error on the wire (it is an
OK reply with granted=false); `reserve` turns it into `BudgetExceeded`, `reserve_raw` returns it as is.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

import grpc
import grpc.aio

from spendgate.alerts import START_SEQ_METADATA_KEY
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AlreadyExists",
    "AsyncClient",
    "AsyncHold",
    "BudgetExceeded",
    "Client",
    "DeadlineExceeded",
    "Estimate",
    "FailedPrecondition",
    "Hold",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "SpendgateError",
    "Unauthenticated",
    "Unavailable",
    "error_from_rpc",
    "tls_credentials",
]

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final[float] = 5.0
"""Deadline of each attempt of each call, unless the client or the call says otherwise."""

# A sidecar is local: after it restarts, reconnect within about a second instead of gRPC's default backoff (which
# grows to 120 s) so that the client's own bounded retries can reach the new process.
_CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)

_T = TypeVar("_T")
_Metadata = tuple[tuple[str, str], ...]


# ----------------------------------------------------------------------------------------------------------------------
# Errors


class SpendgateError(Exception):
    """Base of every error this client raises. `code` is the gRPC status (None for `BudgetExceeded`, which is an OK
    reply); `message` is the server's explanation, meant to say what was wrong and how to fix it."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message if self.code is None else f"{self.code.name}: {self.message}"


class InvalidArgument(SpendgateError):
    """The request was malformed (an amount out of range, an empty or too long id, ...)."""


class NotFound(SpendgateError):
    """No such budget or reservation."""


class AlreadyExists(SpendgateError):
    """The idempotency key was already used with a different amount."""


class FailedPrecondition(SpendgateError):
    """The request conflicts with the current state (e.g. committing a released hold)."""


class ResourceExhausted(SpendgateError):
    """A server-wide limit was reached (too many holds or budgets, a full write queue)."""


class PermissionDenied(SpendgateError):
    """The token may not call this method (e.g. an app token calling Admin)."""


class Unauthenticated(SpendgateError):
    """No token, or an unknown one, where the server requires tokens."""


class Unavailable(SpendgateError):
    """The server could not be reached, or is shutting down or failed, even after the retries allowed."""


class DeadlineExceeded(SpendgateError):
    """The server did not answer within `timeout_s`. The call may or may not have taken effect."""


class Internal(SpendgateError):
    """A bug or corruption on the server side."""


_ERROR_BY_CODE: Final[dict[grpc.StatusCode, type[SpendgateError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}


def _status_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    # Errors raised by real calls (sync and aio) are also grpc.Call objects with code() and details(); a bare
    # RpcError (only raised by hand, e.g. in an interceptor) has neither, so read it as UNKNOWN with its str().
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else None
    return code, details or str(err) or code.name


def error_from_rpc(err: grpc.RpcError) -> SpendgateError:
    """The one mapping from a gRPC error to the `SpendgateError` subclass for its status code."""
    code, message = _status_of(err)
    return _ERROR_BY_CODE.get(code, SpendgateError)(message, code)


class BudgetExceeded(SpendgateError):
    """Reserve was denied: the hold does not fit the budget (or the budget has too many open holds).

    `reason` is a `spendgate.v1.DenyReason` value; `remaining` the units still available; `message` the server's
    explanation."""

    def __init__(self, customer_id: str, amount: int, response: pb.ReserveResponse) -> None:
        assert not response.granted, "BudgetExceeded is only for denials"
        self.customer_id = customer_id
        self.amount = amount
        self.reason: int = response.reason
        self.remaining: int = response.remaining
        reason_name = pb.DenyReason.Name(response.reason) if response.reason in pb.DenyReason.values() else "UNKNOWN"
        self.reason_name: str = reason_name
        text = response.message or f"{customer_id}: {amount} units denied ({reason_name}, {response.remaining} left)"
        super().__init__(text, None)


class HoldEnded(BudgetExceeded):
    """A Reserve retried under an idempotency key whose hold has ended (DENY_REASON_HOLD_ENDED): it was committed,
    released or expired (`state`, a `spendgate.v1.HoldState`), so nothing is held for this call. Reserve again under
    a new idempotency key before calling the model."""

    def __init__(self, customer_id: str, amount: int, response: pb.ReserveResponse) -> None:
        super().__init__(customer_id, amount, response)
        self.state: int = response.state
        self.reservation_id: str = response.reservation_id


# ----------------------------------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True)
class RetryPolicy:
    """How UNAVAILABLE is retried: at most `max_attempts` attempts in all, waiting a random time in
    [0, min(max_backoff_s, initial_backoff_s * 2**(attempt-1))] after each failed attempt (full jitter, so clients
    that failed together do not retry together)."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        assert self.max_attempts >= 1, "max_attempts counts the first attempt, so it is at least 1"
        assert 0 <= self.initial_backoff_s <= self.max_backoff_s

    def should_retry(self, err: grpc.RpcError, *, retryable_call: bool, attempt: int) -> bool:
        code, _ = _status_of(err)
        return retryable_call and code == grpc.StatusCode.UNAVAILABLE and attempt < self.max_attempts

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        return random.uniform(0.0, min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1)))


# ----------------------------------------------------------------------------------------------------------------------
# What the sync and async clients share: channel set-up, request building, reply checking.


def _metadata(token: str | None) -> _Metadata:
    # Plain metadata rather than call credentials: gRPC only sends call credentials over TLS, and a sidecar is often
    # reached in plaintext over loopback.
    return (("authorization", f"Bearer {token}"),) if token else ()


def _channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [*_CHANNEL_OPTIONS, *options]


def tls_credentials(
    root_certificates: bytes | None = None, private_key: bytes | None = None, certificate_chain: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM bytes: the CA that signed the sidecar's certificate (None: the system's), and
    for mTLS this client's key and certificate chain."""
    assert (private_key is None) == (certificate_chain is None), "mTLS needs both private_key and certificate_chain"
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def _credentials_of(
    credentials: grpc.ChannelCredentials | None,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    if root_certificates is None and private_key is None and certificate_chain is None:
        return credentials
    assert credentials is None, "pass credentials or the PEM arguments, not both"
    return tls_credentials(root_certificates, private_key, certificate_chain)


@dataclass(frozen=True)
class Estimate:
    """What an LLM call may cost at most, for Reserve: the server prices its worst case with its price table."""

    model: str
    input_tokens: int = 0
    max_output_tokens: int = 0


def _reserve_request(
    customer_id: str,
    amount: int,
    idempotency_key: str | None,
    ttl_ms: int,
    estimate: Estimate | None = None,
    dimensions: Mapping[str, str] | None = None,
) -> pb.ReserveRequest:
    # An auto key makes every Reserve safe to retry: a lost reply is replayed, never held twice.
    key = idempotency_key if idempotency_key else str(uuid.uuid4())
    request = pb.ReserveRequest(
        customer_id=customer_id, amount=amount, idempotency_key=key, ttl_ms=ttl_ms, dimensions=dict(dimensions or {})
    )
    if estimate is not None:
        assert amount == 0, "pass an amount or an estimate, not both"
        request.estimate.CopyFrom(
            pb.TokenEstimate(
                model=estimate.model, input_tokens=estimate.input_tokens, max_output_tokens=estimate.max_output_tokens
            )
        )
    return request


def _quote_request(customer_id: str, amount: int, estimate: Estimate | None) -> pb.QuoteRequest:
    request = pb.QuoteRequest(customer_id=customer_id, amount=amount)
    if estimate is not None:
        assert amount == 0, "pass an amount or an estimate, not both"
        request.estimate.CopyFrom(
            pb.TokenEstimate(
                model=estimate.model, input_tokens=estimate.input_tokens, max_output_tokens=estimate.max_output_tokens
            )
        )
    return request


def _grant_request(customer_id: str, amount: int, idempotency_key: str, reason: str) -> pb.GrantCreditsRequest:
    # No automatic key, unlike Reserve: a retry of the caller's own (after a timeout, a restart) must send the key of
    # the first attempt, or it grants twice. The caller names the grant (e.g. the payment's id); the server refuses
    # an empty key (InvalidArgument).
    return pb.GrantCreditsRequest(
        customer_id=customer_id, amount=amount, idempotency_key=idempotency_key, reason=reason
    )


def _token_usage(usage: Any) -> pb.TokenUsage:
    """A pb.TokenUsage from itself or from anything with its field names (spendgate.policy.TokenUsage, which the
    provider helpers in spendgate.policy.providers return)."""
    if isinstance(usage, pb.TokenUsage):
        return usage
    return pb.TokenUsage(
        model=usage.model,
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cache_hit=usage.cache_hit,
    )


def _commit_request(
    reservation_id: str, amount: int | None, usage: Any, dimensions: Mapping[str, str] | None
) -> pb.CommitRequest:
    assert (amount is None) != (usage is None), "commit an amount or a usage, not both"
    request = pb.CommitRequest(reservation_id=reservation_id, amount=amount or 0, dimensions=dict(dimensions or {}))
    if usage is not None:
        request.usage.CopyFrom(_token_usage(usage))
    return request


# SetBudget's optional settings, as keyword arguments of set_budget.
_MODES: Final[dict[str, pb.EnforcementMode]] = {"hard": pb.ENFORCEMENT_MODE_HARD, "soft": pb.ENFORCEMENT_MODE_SOFT}


def _set_budget_request(
    customer_id: str,
    limit: int | None,
    stripe_customer_id: str | None,
    *,
    included: int | None = None,
    soft_limit: int | None = None,
    mode: str | None = None,
    block_overage: bool | None = None,
    parent_id: str | None = None,
    period: pb.Period | None = None,
    breaker_multiplier: int | None = None,
    stop_at: int | None = None,
) -> pb.SetBudgetRequest:
    request = pb.SetBudgetRequest(
        customer_id=customer_id,
        stripe_customer_id=stripe_customer_id or "",
        parent_id=parent_id or "",
        mode=_MODES[mode] if mode else pb.ENFORCEMENT_MODE_UNSPECIFIED,
    )
    for name, value in (
        ("limit", limit),
        ("included", included),
        ("soft_limit", soft_limit),
        ("block_overage", block_overage),
        ("breaker_multiplier", breaker_multiplier),
        ("stop_at", stop_at),
    ):
        if value is not None:
            setattr(request, name, value)
    if period is not None:
        request.period.CopyFrom(period)
    return request


def _check_granted(customer_id: str, amount: int, response: pb.ReserveResponse) -> pb.ReserveResponse:
    """Raise BudgetExceeded on a denial; otherwise check what the contract promises about a grant."""
    if not response.granted:
        denial = HoldEnded if response.reason == pb.DENY_REASON_HOLD_ENDED else BudgetExceeded
        raise denial(customer_id, amount or response.amount, response)
    assert response.state == pb.HOLD_STATE_ACTIVE, "a granted Reserve holds: its state is ACTIVE"
    assert response.reservation_id, "a granted Reserve must carry a reservation_id"
    assert amount == 0 or response.amount == amount, "a granted Reserve holds exactly the requested amount"
    return response


class _HoldBase:
    """A granted reservation. `settling` turns true once commit or release was attempted: from then on, leaving the
    `with` block must not release (a commit that failed on our side may still have reached the server)."""

    def __init__(self, customer_id: str, response: pb.ReserveResponse) -> None:
        self.customer_id = customer_id
        self.reservation_id: str = response.reservation_id
        self.amount: int = response.amount
        self.remaining: int = response.remaining
        self.expires_at_ms: int = response.expires_at_ms
        self.replayed: bool = response.replayed
        self.settling = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(customer_id={self.customer_id!r}, reservation_id={self.reservation_id!r}, "
            f"amount={self.amount}, replayed={self.replayed}, settling={self.settling})"
        )


def _log_release_failure(hold: _HoldBase, err: SpendgateError) -> None:
    # The caller's exception matters more than this one: log, and let the server's TTL expire the hold.
    _log.warning(
        "spendgate: could not release %s after an exception (%s); it expires at %d ms",
        hold.reservation_id,
        err,
        hold.expires_at_ms,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Blocking client


class Hold(_HoldBase):
    """A granted reservation from `Client.reserve`. Use it as a context manager (see the module doc) or settle it
    yourself with `commit` or `release`."""

    def __init__(self, client: Client, customer_id: str, response: pb.ReserveResponse) -> None:
        super().__init__(customer_id, response)
        self._client = client

    def commit(
        self,
        amount: int | None = None,
        *,
        usage: Any = None,
        dimensions: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> pb.CommitResponse:
        """Record `amount` actual units, or the call's token `usage` (priced by the server; a TokenUsage from
        spendgate.policy.providers). More than the hold is recorded in full and flagged."""
        self.settling = True
        return self._client.commit(self.reservation_id, amount, usage=usage, dimensions=dimensions, timeout_s=timeout_s)

    def release(self, *, timeout_s: float | None = None) -> pb.ReleaseResponse:
        """Void the hold: nothing is charged."""
        self.settling = True
        return self._client.release(self.reservation_id, timeout_s=timeout_s)

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.settling:
            return
        if exc is None:
            self.commit(self.amount)  # never drop usage: an unsettled clean exit charges the whole hold
            return
        try:
            self.release()
        except SpendgateError as err:
            _log_release_failure(self, err)


class Client:
    """Blocking spendgate client. Thread-safe (one gRPC channel, shared). Close it, or use it as a context manager.

    `channel`: use this channel instead of dialling `target` (the caller keeps ownership: `close` leaves it open).
    `token`: sent as `authorization: Bearer <token>` where the server requires tokens.
    `credentials`: TLS channel credentials; plaintext when None. Or, as PEM bytes: `root_certificates` (the CA of the
    sidecar's certificate), and for mTLS `private_key` and `certificate_chain` (see tls_credentials).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
    ) -> None:
        assert (target is None) != (channel is None), "pass exactly one of target and channel"
        assert timeout_s > 0
        credentials = _credentials_of(credentials, root_certificates, private_key, certificate_chain)
        self._owns_channel = channel is None
        if channel is None:
            assert target is not None
            opts = _channel_options(options)
            channel = (
                grpc.secure_channel(target, credentials, opts) if credentials else grpc.insecure_channel(target, opts)
            )
        self._channel = channel
        self._budget = pb_grpc.BudgetStub(channel)
        self._admin = pb_grpc.AdminStub(channel)
        self._metadata = _metadata(token)
        self._timeout_s = timeout_s
        self._retry = retry

    def _call(self, rpc: Callable[..., Any], request: Any, *, retryable: bool, timeout_s: float | None) -> Any:
        attempt = 1
        while True:
            try:
                return rpc(
                    request, timeout=self._timeout_s if timeout_s is None else timeout_s, metadata=self._metadata
                )
            except grpc.RpcError as err:
                if not self._retry.should_retry(err, retryable_call=retryable, attempt=attempt):
                    raise error_from_rpc(err) from err
            time.sleep(self._retry.backoff_s(attempt))
            attempt += 1

    def reserve_raw(
        self,
        customer_id: str,
        amount: int = 0,
        *,
        estimate: Estimate | None = None,
        dimensions: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        ttl_ms: int = 0,
        timeout_s: float | None = None,
    ) -> pb.ReserveResponse:
        """Reserve, returning the reply as is: a denial is `granted=False`, not an exception."""
        request = _reserve_request(customer_id, amount, idempotency_key, ttl_ms, estimate, dimensions)
        response: pb.ReserveResponse = self._call(
            self._budget.Reserve, request, retryable=bool(request.idempotency_key), timeout_s=timeout_s
        )
        return response

    def reserve(
        self,
        customer_id: str,
        amount: int = 0,
        *,
        estimate: Estimate | None = None,
        dimensions: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        ttl_ms: int = 0,
        timeout_s: float | None = None,
    ) -> Hold:
        """Hold `amount` units, or the worst case of `estimate`, or raise `BudgetExceeded`. The hold is a context
        manager (see the module doc)."""
        response = self.reserve_raw(
            customer_id,
            amount,
            estimate=estimate,
            dimensions=dimensions,
            idempotency_key=idempotency_key,
            ttl_ms=ttl_ms,
            timeout_s=timeout_s,
        )
        return Hold(self, customer_id, _check_granted(customer_id, amount, response))

    def commit(
        self,
        reservation_id: str,
        amount: int | None = None,
        *,
        usage: Any = None,
        dimensions: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> pb.CommitResponse:
        request = _commit_request(reservation_id, amount, usage, dimensions)
        response: pb.CommitResponse = self._call(self._budget.Commit, request, retryable=True, timeout_s=timeout_s)
        return response

    def release(self, reservation_id: str, *, timeout_s: float | None = None) -> pb.ReleaseResponse:
        request = pb.ReleaseRequest(reservation_id=reservation_id)
        response: pb.ReleaseResponse = self._call(self._budget.Release, request, retryable=True, timeout_s=timeout_s)
        return response

    def balance(self, customer_id: str, *, timeout_s: float | None = None) -> pb.Balance:
        request = pb.GetBalanceRequest(customer_id=customer_id)
        response: pb.Balance = self._call(self._budget.GetBalance, request, retryable=False, timeout_s=timeout_s)
        return response

    def quote(
        self, customer_id: str, amount: int = 0, *, estimate: Estimate | None = None, timeout_s: float | None = None
    ) -> pb.QuoteResponse:
        """Budget.Quote: what a Reserve of `amount` (or the worst case of `estimate`) would hold, with its parts per
        token type, and whether it would be granted now (`granted`; else `reason` and `message`). Holds nothing, so
        it is retried like any read."""
        request = _quote_request(customer_id, amount, estimate)
        response: pb.QuoteResponse = self._call(self._budget.Quote, request, retryable=True, timeout_s=timeout_s)
        return response

    def grant_credits(
        self, customer_id: str, amount: int, idempotency_key: str, reason: str = "", *, timeout_s: float | None = None
    ) -> pb.GrantCreditsResponse:
        """Admin.GrantCredits: add `amount` credits on top of the budget's limit, once per `idempotency_key` (a
        retry, by this client or yours, replays the first grant: `replayed`). AlreadyExists: the key granted another
        customer or amount."""
        request = _grant_request(customer_id, amount, idempotency_key, reason)
        response: pb.GrantCreditsResponse = self._call(
            self._admin.GrantCredits, request, retryable=True, timeout_s=timeout_s
        )
        return response

    def set_budget(
        self,
        customer_id: str,
        limit: int | None = None,
        stripe_customer_id: str | None = None,
        *,
        timeout_s: float | None = None,
        **policy: Any,
    ) -> pb.SetBudgetResponse:
        """Create the budget or change its settings (Admin; needs an admin token where tokens are configured).
        `policy`: included, soft_limit, mode ("hard"/"soft"), block_overage, parent_id, period (a pb.Period),
        breaker_multiplier, stop_at (the customer's own, 0 removes it); what is not given stays unchanged."""
        request = _set_budget_request(customer_id, limit, stripe_customer_id, **policy)
        response: pb.SetBudgetResponse = self._call(
            self._admin.SetBudget, request, retryable=False, timeout_s=timeout_s
        )
        return response

    def freeze(
        self, customer_id: str, frozen: bool = True, reason: str = "", *, timeout_s: float | None = None
    ) -> pb.SetBudgetResponse:
        """Freeze (every Reserve denied) or unfreeze a budget (Admin)."""
        request = pb.FreezeBudgetRequest(customer_id=customer_id, frozen=frozen, reason=reason)
        response: pb.SetBudgetResponse = self._call(
            self._admin.FreezeBudget, request, retryable=True, timeout_s=timeout_s
        )
        return response

    def usage(self, customer_id: str, period: str = "", *, top: int = 0, timeout_s: float | None = None) -> pb.Usage:
        """The usage of a period: "" (current), "previous", or an ISO date inside it."""
        request = pb.GetUsageRequest(customer_id=customer_id, period=period, top=top)
        response: pb.Usage = self._call(self._budget.GetUsage, request, retryable=True, timeout_s=timeout_s)
        return response

    def list_ledger(
        self, customer_id: str, period: str = "", *, after: int = 0, limit: int = 0, timeout_s: float | None = None
    ) -> pb.ListLedgerResponse:
        """One page of the audit trail (Admin): the period's ledger entries with seq > after, oldest first, with their
        settlement state; page on with after=response.next_after while response.more."""
        request = pb.ListLedgerRequest(customer_id=customer_id, period=period, after=after, limit=limit)
        response: pb.ListLedgerResponse = self._call(
            self._admin.ListLedger, request, retryable=True, timeout_s=timeout_s
        )
        return response

    def usage_link(
        self,
        customer_id: str,
        *,
        ttl_s: float = 3600,
        allow_limit: bool = False,
        ceiling: int = 0,
        timeout_s: float | None = None,
    ) -> pb.CreateUsageLinkResponse:
        """A signed link to the customer's usage page (Admin.CreateUsageLink): `.url`, `.expires_at_ms`. It opens
        for `ttl_s` seconds (60 to 31 days); with `allow_limit` the page may set the customer's own stop-at up to
        `ceiling` units. Hand it to that customer (a redirect, or the src of an iframe)."""
        request = _usage_link_request(customer_id, ttl_s, allow_limit, ceiling)
        response: pb.CreateUsageLinkResponse = self._call(
            self._admin.CreateUsageLink, request, retryable=True, timeout_s=timeout_s
        )
        return response

    def ping(self, *, timeout_s: float | None = None) -> None:
        self._call(self._budget.Ping, pb.PingRequest(), retryable=False, timeout_s=timeout_s)

    def close(self) -> None:
        """Close the channel if this client opened it. Idempotent."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def watch_alerts(
        self, after_seq: int = 0, *, from_start: bool = False, customer_ids: Sequence[str] = ()
    ) -> Iterator[pb.Alert]:
        """Budget.WatchAlerts: the alerts after `after_seq` (all those kept with `from_start`; neither: from now on),
        then live ones as they are raised, in seq order, only `customer_ids`' when given. It never ends by itself.

        On UNAVAILABLE (the sidecar restarting or draining) it reconnects under the client's RetryPolicy, resuming
        after the last alert it yielded, so nothing is skipped or repeated; the attempts count from the last alert.
        Other errors raise (ResourceExhausted: this stream fell behind, or too many streams are open): call again
        with after_seq set to the last seq you processed. Break out of the loop to close the stream."""
        position = _AlertPosition(after_seq, from_start, tuple(customer_ids))
        attempt = 1
        while True:
            call = self._budget.WatchAlerts(position.request(), metadata=self._metadata)
            try:
                position.started(call.initial_metadata())
                for alert in call:
                    attempt = 1
                    position.seen(alert)
                    yield alert
                return  # the server ended the stream without an error
            except grpc.RpcError as err:
                if not self._retry.should_retry(err, retryable_call=True, attempt=attempt):
                    raise error_from_rpc(err) from err
            finally:
                call.cancel()
            time.sleep(self._retry.backoff_s(attempt))
            attempt += 1


# ----------------------------------------------------------------------------------------------------------------------
# asyncio client


class AsyncHold(_HoldBase):
    """A granted reservation from `AsyncClient.reserve`; the async twin of `Hold`."""

    def __init__(self, client: AsyncClient, customer_id: str, response: pb.ReserveResponse) -> None:
        super().__init__(customer_id, response)
        self._client = client

    async def commit(
        self,
        amount: int | None = None,
        *,
        usage: Any = None,
        dimensions: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> pb.CommitResponse:
        self.settling = True
        return await self._client.commit(
            self.reservation_id, amount, usage=usage, dimensions=dimensions, timeout_s=timeout_s
        )

    async def release(self, *, timeout_s: float | None = None) -> pb.ReleaseResponse:
        self.settling = True
        return await self._client.release(self.reservation_id, timeout_s=timeout_s)

    async def _finish(self, exc: BaseException | None) -> None:
        if self.settling:
            return
        if exc is None:
            await self.commit(self.amount)  # never drop usage: an unsettled clean exit charges the whole hold
            return
        try:
            await self.release()
        except SpendgateError as err:
            _log_release_failure(self, err)


class _AsyncReservation:
    """What `AsyncClient.reserve` returns: `async with` reserves on entry (a denial raises before the body runs) and
    ends the hold on exit as `Hold` does."""

    def __init__(self, reserve: Callable[[], Awaitable[AsyncHold]]) -> None:
        self._reserve = reserve
        self._hold: AsyncHold | None = None

    async def __aenter__(self) -> AsyncHold:
        assert self._hold is None, "a reservation context can be entered once"
        self._hold = await self._reserve()
        return self._hold

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._hold is not None
        await self._hold._finish(exc)


class AsyncClient:
    """asyncio spendgate client; same arguments and behaviour as `Client`. Create it inside the event loop that uses
    it. Close it with `await close()`, or use `async with`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = RetryPolicy(),
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
    ) -> None:
        assert (target is None) != (channel is None), "pass exactly one of target and channel"
        assert timeout_s > 0
        credentials = _credentials_of(credentials, root_certificates, private_key, certificate_chain)
        self._owns_channel = channel is None
        if channel is None:
            assert target is not None
            opts = _channel_options(options)
            channel = (
                grpc.aio.secure_channel(target, credentials, opts)
                if credentials
                else grpc.aio.insecure_channel(target, opts)
            )
        self._channel = channel
        self._budget = pb_grpc.BudgetStub(channel)
        self._admin = pb_grpc.AdminStub(channel)
        self._metadata = _metadata(token)
        self._timeout_s = timeout_s
        self._retry = retry

    async def _call(self, rpc: Callable[..., Any], request: Any, *, retryable: bool, timeout_s: float | None) -> Any:
        attempt = 1
        while True:
            try:
                return await rpc(
                    request, timeout=self._timeout_s if timeout_s is None else timeout_s, metadata=self._metadata
                )
            except grpc.RpcError as err:  # grpc.aio.AioRpcError is a grpc.RpcError
                if not self._retry.should_retry(err, retryable_call=retryable, attempt=attempt):
                    raise error_from_rpc(err) from err
            await asyncio.sleep(self._retry.backoff_s(attempt))
            attempt += 1

    async def reserve_raw(
        self,
        customer_id: str,
        amount: int = 0,
        *,
        estimate: Estimate | None = None,
        dimensions: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        ttl_ms: int = 0,
        timeout_s: float | None = None,
    ) -> pb.ReserveResponse:
        """Reserve, returning the reply as is: a denial is `granted=False`, not an exception."""
        request = _reserve_request(customer_id, amount, idempotency_key, ttl_ms, estimate, dimensions)
        response: pb.ReserveResponse = await self._call(
            self._budget.Reserve, request, retryable=bool(request.idempotency_key), timeout_s=timeout_s
        )
        return response

    def reserve(
        self,
        customer_id: str,
        amount: int = 0,
        *,
        estimate: Estimate | None = None,
        dimensions: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        ttl_ms: int = 0,
        timeout_s: float | None = None,
    ) -> _AsyncReservation:
        """`async with client.reserve(...) as hold:` holds `amount` units (or the worst case of `estimate`) or
        raises `BudgetExceeded` on entry."""

        async def acquire() -> AsyncHold:
            response = await self.reserve_raw(
                customer_id,
                amount,
                estimate=estimate,
                dimensions=dimensions,
                idempotency_key=idempotency_key,
                ttl_ms=ttl_ms,
                timeout_s=timeout_s,
            )
            return AsyncHold(self, customer_id, _check_granted(customer_id, amount, response))

        return _AsyncReservation(acquire)

    async def commit(
        self,
        reservation_id: str,
        amount: int | None = None,
        *,
        usage: Any = None,
        dimensions: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> pb.CommitResponse:
        request = _commit_request(reservation_id, amount, usage, dimensions)
        response: pb.CommitResponse = await self._call(
            self._budget.Commit, request, retryable=True, timeout_s=timeout_s
        )
        return response

    async def release(self, reservation_id: str, *, timeout_s: float | None = None) -> pb.ReleaseResponse:
        request = pb.ReleaseRequest(reservation_id=reservation_id)
        response: pb.ReleaseResponse = await self._call(
            self._budget.Release, request, retryable=True, timeout_s=timeout_s
        )
        return response

    async def balance(self, customer_id: str, *, timeout_s: float | None = None) -> pb.Balance:
        request = pb.GetBalanceRequest(customer_id=customer_id)
        response: pb.Balance = await self._call(self._budget.GetBalance, request, retryable=False, timeout_s=timeout_s)
        return response

    async def quote(
        self, customer_id: str, amount: int = 0, *, estimate: Estimate | None = None, timeout_s: float | None = None
    ) -> pb.QuoteResponse:
        """Budget.Quote, as Client.quote: holds nothing."""
        request = _quote_request(customer_id, amount, estimate)
        response: pb.QuoteResponse = await self._call(self._budget.Quote, request, retryable=True, timeout_s=timeout_s)
        return response

    async def grant_credits(
        self, customer_id: str, amount: int, idempotency_key: str, reason: str = "", *, timeout_s: float | None = None
    ) -> pb.GrantCreditsResponse:
        """Admin.GrantCredits, as Client.grant_credits: once per idempotency_key."""
        request = _grant_request(customer_id, amount, idempotency_key, reason)
        response: pb.GrantCreditsResponse = await self._call(
            self._admin.GrantCredits, request, retryable=True, timeout_s=timeout_s
        )
        return response

    async def set_budget(
        self,
        customer_id: str,
        limit: int | None = None,
        stripe_customer_id: str | None = None,
        *,
        timeout_s: float | None = None,
        **policy: Any,
    ) -> pb.SetBudgetResponse:
        """Create the budget or change its settings (Admin); `policy` as for Client.set_budget."""
        request = _set_budget_request(customer_id, limit, stripe_customer_id, **policy)
        response: pb.SetBudgetResponse = await self._call(
            self._admin.SetBudget, request, retryable=False, timeout_s=timeout_s
        )
        return response

    async def freeze(
        self, customer_id: str, frozen: bool = True, reason: str = "", *, timeout_s: float | None = None
    ) -> pb.SetBudgetResponse:
        request = pb.FreezeBudgetRequest(customer_id=customer_id, frozen=frozen, reason=reason)
        response: pb.SetBudgetResponse = await self._call(
            self._admin.FreezeBudget, request, retryable=True, timeout_s=timeout_s
        )
        return response

    async def usage(
        self, customer_id: str, period: str = "", *, top: int = 0, timeout_s: float | None = None
    ) -> pb.Usage:
        request = pb.GetUsageRequest(customer_id=customer_id, period=period, top=top)
        response: pb.Usage = await self._call(self._budget.GetUsage, request, retryable=True, timeout_s=timeout_s)
        return response

    async def list_ledger(
        self, customer_id: str, period: str = "", *, after: int = 0, limit: int = 0, timeout_s: float | None = None
    ) -> pb.ListLedgerResponse:
        """As Client.list_ledger."""
        request = pb.ListLedgerRequest(customer_id=customer_id, period=period, after=after, limit=limit)
        response: pb.ListLedgerResponse = await self._call(
            self._admin.ListLedger, request, retryable=True, timeout_s=timeout_s
        )
        return response

    async def usage_link(
        self,
        customer_id: str,
        *,
        ttl_s: float = 3600,
        allow_limit: bool = False,
        ceiling: int = 0,
        timeout_s: float | None = None,
    ) -> pb.CreateUsageLinkResponse:
        """The async twin of Client.usage_link."""
        request = _usage_link_request(customer_id, ttl_s, allow_limit, ceiling)
        response: pb.CreateUsageLinkResponse = await self._call(
            self._admin.CreateUsageLink, request, retryable=True, timeout_s=timeout_s
        )
        return response

    async def ping(self, *, timeout_s: float | None = None) -> None:
        await self._call(self._budget.Ping, pb.PingRequest(), retryable=False, timeout_s=timeout_s)

    async def close(self) -> None:
        """Close the channel if this client opened it. Idempotent."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def watch_alerts(
        self, after_seq: int = 0, *, from_start: bool = False, customer_ids: Sequence[str] = ()
    ) -> AsyncIterator[pb.Alert]:
        """`async for alert in client.watch_alerts(...)`: the async twin of `Client.watch_alerts`."""
        position = _AlertPosition(after_seq, from_start, tuple(customer_ids))
        attempt = 1
        while True:
            call = self._budget.WatchAlerts(position.request(), metadata=self._metadata)
            try:
                position.started(await call.initial_metadata())
                async for alert in call:
                    attempt = 1
                    position.seen(alert)
                    yield alert
                return  # the server ended the stream without an error
            except grpc.RpcError as err:
                if not self._retry.should_retry(err, retryable_call=True, attempt=attempt):
                    raise error_from_rpc(err) from err
            finally:
                call.cancel()
            await asyncio.sleep(self._retry.backoff_s(attempt))
            attempt += 1


def _usage_link_request(customer_id: str, ttl_s: float, allow_limit: bool, ceiling: int) -> pb.CreateUsageLinkRequest:
    return pb.CreateUsageLinkRequest(
        customer_id=customer_id, ttl_ms=round(ttl_s * 1000), allow_limit=allow_limit, ceiling=ceiling
    )


# ----------------------------------------------------------------------------------------------------------------------
# Alerts: where a WatchAlerts stream resumes


class _AlertPosition:
    """What to ask for when a watch (re)connects: after the last alert seen, else after where the server said the
    stream started (so that "from now" keeps no gap across a reconnect), else the caller's request."""

    def __init__(self, after_seq: int, from_start: bool, customer_ids: tuple[str, ...]) -> None:
        self.after_seq = after_seq
        self.from_start = from_start
        self.customer_ids = customer_ids

    def request(self) -> pb.WatchAlertsRequest:
        return pb.WatchAlertsRequest(
            after_seq=self.after_seq, from_start=self.from_start, customer_ids=self.customer_ids
        )

    def started(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        for key, value in metadata or ():
            if key == START_SEQ_METADATA_KEY:
                start = int(value)
                # "After 0" is from the oldest alert kept: from_start says that without contradicting after_seq.
                self.after_seq, self.from_start = start, start == 0

    def seen(self, alert: pb.Alert) -> None:
        self.after_seq, self.from_start = alert.seq, False
