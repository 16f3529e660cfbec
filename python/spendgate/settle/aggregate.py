"""Turning outbox entries into meter events: one event per entry, or, with pre-aggregation, one event per Stripe
customer per closed time window; and a claimed event rebuilt exactly as it was first sent.

Idempotent pre-aggregation. An aggregate's identifier is fixed durably on every member (outbox_claim) before the first
send, and the identifier itself records the event: `<first member's identifier>-agg<count>x<value>@<ts_ms>`. So after a
crash any member alone rebuilds the same event (same identifier, value and timestamp), even when the other members are
not in the batch at hand: a resend is always byte-for-byte the first send, and Stripe drops it as a duplicate.

The first member's identifier makes the aggregate's unique: ledger identifiers are unique, and a requeued member gets a
fresh one (`-requeue<n>`), so a requeued aggregate never collides with the refused one Stripe still remembers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from spendgate.settle.rules import MAX_EVENT_VALUE

if TYPE_CHECKING:  # a TypedDict of the stub only
    from spendgate._core import OutboxEntry

# Stripe: identifier "The maximum length is 100 characters."
MAX_IDENTIFIER_CHARS: Final[int] = 100
_AGGREGATE_RE: Final = re.compile(r"^(?P<base>.+)-agg(?P<count>\d+)x(?P<value>\d+)@(?P<ts_ms>\d+)$")


@dataclasses.dataclass(frozen=True, slots=True)
class MeterEvent:
    """One meter event to send, and the outbox entries (`seqs`) it settles."""

    identifier: str
    stripe_customer_id: str
    value: int
    ts_ms: int
    seqs: tuple[int, ...]
    customer_ids: tuple[str, ...]
    # True when the identifier is already durably fixed on the members (a resend); False for a first send.
    claimed: bool
    first_attempt_ms: int | None = None

    @property
    def size(self) -> int:
        return len(self.seqs)


@dataclasses.dataclass(frozen=True, slots=True)
class AggregateId:
    base: str
    count: int
    value: int
    ts_ms: int


def aggregate_identifier(first_identifier: str, count: int, value: int, ts_ms: int) -> str:
    identifier = f"{first_identifier}-agg{count}x{value}@{ts_ms}"
    assert len(identifier) <= MAX_IDENTIFIER_CHARS, identifier
    return identifier


def parse_aggregate_identifier(identifier: str) -> AggregateId | None:
    match = _AGGREGATE_RE.match(identifier)
    if match is None:
        return None
    return AggregateId(match["base"], int(match["count"]), int(match["value"]), int(match["ts_ms"]))


def claimed_events(entries: Iterable[OutboxEntry]) -> list[MeterEvent]:
    """The events already claimed (sent_as set), rebuilt exactly as first sent, grouped by their identifier."""
    groups: dict[str, list[OutboxEntry]] = {}
    for entry in entries:
        if entry["sent_as"] is not None:
            groups.setdefault(entry["sent_as"], []).append(entry)
    events = []
    for identifier, members in groups.items():
        parsed = parse_aggregate_identifier(identifier)
        if parsed is not None:
            value, ts_ms = parsed.value, parsed.ts_ms  # from the identifier: right even when members are missing here
        else:
            value, ts_ms = sum(e["amount"] for e in members), max(e["ts_ms"] for e in members)
        events.append(_event(identifier, members, value, ts_ms, claimed=True))
    return events


def fresh_events(entries: Iterable[OutboxEntry], window_ms: int, now_ms: int) -> list[MeterEvent]:
    """Events for the entries not yet claimed: one per entry when window_ms is 0; else one per Stripe customer per
    window of window_ms, for windows that have ended by now_ms (later commits of an open window would otherwise go out
    in a second event). An aggregate never exceeds Stripe's largest value: a window that would is split."""
    unclaimed = [e for e in entries if e["sent_as"] is None]
    if window_ms <= 0:
        return [_event(e["identifier"], [e], e["amount"], e["ts_ms"], claimed=False) for e in unclaimed]
    windows: dict[tuple[str, int], list[OutboxEntry]] = {}
    for entry in unclaimed:
        window = entry["ts_ms"] // window_ms
        if (window + 1) * window_ms > now_ms:
            continue  # still open
        windows.setdefault((entry["stripe_customer_id"], window), []).append(entry)
    events = []
    for members in windows.values():
        for group in _split_by_value(sorted(members, key=lambda e: e["seq"])):
            events.append(aggregate_event(group))
    return events


def aggregate_event(members: Sequence[OutboxEntry]) -> MeterEvent:
    """One event for these unclaimed members (of one Stripe customer): the sum, stamped with the latest member's time."""
    value = sum(e["amount"] for e in members)
    ts_ms = max(e["ts_ms"] for e in members)
    if len(members) == 1:
        return _event(members[0]["identifier"], members, value, ts_ms, claimed=False)
    identifier = aggregate_identifier(members[0]["identifier"], len(members), value, ts_ms)
    return _event(identifier, members, value, ts_ms, claimed=False)


def _split_by_value(members: list[OutboxEntry]) -> list[list[OutboxEntry]]:
    groups: list[list[OutboxEntry]] = [[]]
    total = 0
    for entry in members:
        if groups[-1] and total + entry["amount"] > MAX_EVENT_VALUE:
            groups.append([])
            total = 0
        groups[-1].append(entry)
        total += entry["amount"]
    return groups


def _event(identifier: str, members: Sequence[OutboxEntry], value: int, ts_ms: int, *, claimed: bool) -> MeterEvent:
    firsts = [e["first_attempt_ms"] for e in members if e["first_attempt_ms"] is not None]
    return MeterEvent(
        identifier=identifier,
        stripe_customer_id=members[0]["stripe_customer_id"],
        value=value,
        ts_ms=ts_ms,
        seqs=tuple(e["seq"] for e in members),
        customer_ids=tuple(dict.fromkeys(e["customer_id"] for e in members)),
        claimed=claimed,
        first_attempt_ms=min(firsts) if firsts else None,
    )
