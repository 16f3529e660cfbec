"""Turning outbox entries into meter events, and a claimed entry rebuilt exactly as it was first sent.

Two kinds of entry, two meters:
- A commit in plain units is one event on the units meter (`settle_event_name`): payload {stripe_customer_id, value}.
- A commit priced from tokens (its entry has `usage` with parts) follows Stripe's LLM token-billing convention: one
  event per token type with tokens, on the token meter (`settle_token_event_name`, default `token-billing-tokens`),
  payload {stripe_customer_id, value: the tokens, model, token_type}. Token types on the wire (TOKEN_WIRE_TYPES) are
  those of Vercel's AI Gateway, the convention's reference integration ("input, output, cache-read, and cache-write
  token counts when greater than zero ... token type (`input`, `output`, `cached_input`, or `cached_write`)",
  vercel.com/docs/ai-gateway/ecosystem/stripe-billing). The engine's counts are disjoint; reasoning tokens go out as
  `output`, as the providers bill them and as Stripe's @stripe/token-meter sends them (output + thoughts, its test
  "should not double-count reasoning tokens"). The model goes out as the ledger has it (the price table's name).

Claims. Before the first send the settler fixes one claim identifier on the entries an event settles (outbox_claim);
whatever a crash interrupts, the next round rebuilds the same events from the claim and the entries alone:
- plain entry: the claim is its ledger identifier (`sg-rsv_…`), which is also the event's identifier;
- token entry: the claim is `<ledger identifier>-tokens`; its events are `<ledger identifier>-<token type>`, one per
  type with tokens, values and model from the entry's usage (which never changes), timestamp the commit's;
- plain aggregate (pre-aggregation): `<first member's identifier>-agg<count>x<value>@<ts_ms>`, also the event's;
- token aggregate: `<first member's identifier>-tagg<count>x<input>.<output>.<cached_input>.<cached_write>@<ts_ms>`,
  one customer's entries of one model in a window; its events are `<first member's identifier>-tagg<count>-<type>`.
An aggregate's claim records the whole event (count, values, timestamp), so any member alone rebuilds it exactly, even
when the other members are not in the batch at hand: a resend is always byte-for-byte the first send, and Stripe drops
it as a duplicate. The first member's identifier makes the claim unique (ledger identifiers are unique, and a member is
in one claim only); a requeued entry gets a fresh identifier (`-requeue<n>`), so its events never collide with the
refused ones Stripe still remembers. An entry settles (is acknowledged) only once every event of its claim is accepted.

A claim written before token events existed (a token entry claimed under its bare identifier) is resent as the one
units event it was first sent as: the claim, not today's settings, decides what a resend is.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from spendgate.settle.rules import MAX_EVENT_VALUE

if TYPE_CHECKING:  # TypedDicts of the stub only
    from spendgate._core import OutboxEntry, UsageDetail

# Stripe: identifier "The maximum length is 100 characters."
MAX_IDENTIFIER_CHARS: Final[int] = 100
# The engine's longest id (outbox_claim's identifier): _core.MAX_ID_BYTES, repeated to keep this module importable
# without the engine (a test checks they agree).
MAX_CLAIM_BYTES: Final[int] = 128

# The token meter's dimension payload keys (Stripe's token-billing meter has dimensions `model` and `token_type`).
MODEL_KEY: Final[str] = "model"
TOKEN_TYPE_KEY: Final[str] = "token_type"
# Token types on the wire, in the order their events go out.
TOKEN_WIRE_TYPES: Final[tuple[str, ...]] = ("input", "output", "cached_input", "cached_write")
# The engine's token types (spendgate.policy.prices.TOKEN_TYPES) -> the wire's.
_WIRE_TYPE: Final[dict[str, str]] = {
    "input": "input", "output": "output", "reasoning": "output", "cached_input": "cached_input",
    "cache_write": "cached_write",
}  # fmt: skip
TOKEN_CLAIM_SUFFIX: Final[str] = "-tokens"

_AGGREGATE_RE: Final = re.compile(r"^(?P<base>.+)-agg(?P<count>\d+)x(?P<value>\d+)@(?P<ts_ms>\d+)$")
_TOKEN_AGGREGATE_RE: Final = re.compile(r"^(?P<base>.+)-tagg(?P<count>\d+)x(?P<values>\d+(?:\.\d+){3})@(?P<ts_ms>\d+)$")


@dataclasses.dataclass(frozen=True, slots=True)
class EventNames:
    """The meters' event names: `units` (settle_event_name) and `tokens` (settle_token_event_name; "" settles token
    usage as units on the units meter)."""

    units: str
    tokens: str


@dataclasses.dataclass(frozen=True, slots=True)
class MeterEvent:
    """One meter event to send, and the outbox entries (`seqs`) its claim settles. Several events can share a claim (a
    token entry's types): the entries settle when all of them are accepted."""

    identifier: str
    event_name: str
    stripe_customer_id: str
    value: int
    ts_ms: int
    seqs: tuple[int, ...]
    customer_ids: tuple[str, ...]
    # True when the claim is already durably fixed on the members (a resend); False for a first send.
    claimed: bool
    first_attempt_ms: int | None = None
    # The identifier claimed on the entries (outbox_claim), when it is not the event's own.
    claim: str = ""
    # Payload keys beside the customer and the value: (model, ...), (token_type, ...) for token events.
    dimensions: tuple[tuple[str, str], ...] = ()
    # A member came back with a restored backup: it may be at Stripe already (see rules.restored_unsure).
    restored: bool = False

    @property
    def size(self) -> int:
        return len(self.seqs)

    @property
    def claim_id(self) -> str:
        return self.claim or self.identifier


@dataclasses.dataclass(frozen=True, slots=True)
class AggregateId:
    base: str
    count: int
    value: int
    ts_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class TokenAggregateId:
    base: str
    count: int
    tokens: tuple[int, ...]  # per TOKEN_WIRE_TYPES
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


def token_aggregate_claim(first_identifier: str, count: int, tokens: Sequence[int], ts_ms: int) -> str:
    assert len(tokens) == len(TOKEN_WIRE_TYPES), tokens
    claim = f"{first_identifier}-tagg{count}x{'.'.join(map(str, tokens))}@{ts_ms}"
    assert len(claim.encode()) <= MAX_CLAIM_BYTES, claim
    return claim


def parse_token_aggregate_claim(claim: str) -> TokenAggregateId | None:
    match = _TOKEN_AGGREGATE_RE.match(claim)
    if match is None:
        return None
    tokens = tuple(int(v) for v in match["values"].split("."))
    return TokenAggregateId(match["base"], int(match["count"]), tokens, int(match["ts_ms"]))


def token_counts(usage: UsageDetail | None) -> tuple[int, ...]:
    """Tokens per TOKEN_WIRE_TYPES of a usage (all zero for None or a cache hit)."""
    counts = dict.fromkeys(TOKEN_WIRE_TYPES, 0)
    for token_type, tokens, _units in usage["parts"] if usage is not None else ():
        counts[_WIRE_TYPE[token_type]] += tokens
    return tuple(counts.values())


def event_identifiers(claim: str | None, usage: UsageDetail | None) -> list[str]:
    """The identifiers of the meter events that carry an entry claimed under `claim` (its usage: the entry's own), by
    the claim rules above: what the audit trail shows. [] before the entry is claimed."""
    if not claim:
        return []
    if (tokens := parse_token_aggregate_claim(claim)) is not None:
        base = f"{tokens.base}-tagg{tokens.count}"
        return [f"{base}-{t}" for t, n in zip(TOKEN_WIRE_TYPES, tokens.tokens, strict=True) if n > 0]
    if claim.endswith(TOKEN_CLAIM_SUFFIX):
        base = claim.removesuffix(TOKEN_CLAIM_SUFFIX)
        return [f"{base}-{t}" for t, n in zip(TOKEN_WIRE_TYPES, token_counts(usage), strict=True) if n > 0]
    return [claim]  # a units event: its own identifier, or a pre-aggregated event's


def settles_as_tokens(entry: OutboxEntry, names: EventNames) -> bool:
    """An entry that becomes token events: it has usage with tokens, and the token meter is on."""
    return bool(names.tokens) and any(token_counts(entry["usage"]))


def claimed_events(entries: Iterable[OutboxEntry], names: EventNames) -> list[MeterEvent]:
    """The events of the entries already claimed (sent_as set), rebuilt exactly as first sent from their claims."""
    groups: dict[str, list[OutboxEntry]] = {}
    for entry in entries:
        if entry["sent_as"] is not None:
            groups.setdefault(entry["sent_as"], []).append(entry)
    events: list[MeterEvent] = []
    for claim, members in groups.items():
        if (tokens := parse_token_aggregate_claim(claim)) is not None:
            base = f"{tokens.base}-tagg{tokens.count}"
            events += _token_events(claim, base, members, tokens.tokens, tokens.ts_ms, names, claimed=True)
        elif claim.endswith(TOKEN_CLAIM_SUFFIX):  # one token entry: its usage and time make the events
            base = claim.removesuffix(TOKEN_CLAIM_SUFFIX)
            counts = token_counts(members[0]["usage"])
            events += _token_events(claim, base, members, counts, members[0]["ts_ms"], names, claimed=True)
        elif (parsed := parse_aggregate_identifier(claim)) is not None:
            # From the identifier: right even when members are missing here.
            events.append(_event(claim, names.units, members, parsed.value, parsed.ts_ms, claimed=True))
        else:
            value, ts_ms = sum(e["amount"] for e in members), max(e["ts_ms"] for e in members)
            events.append(_event(claim, names.units, members, value, ts_ms, claimed=True))
    return events


def fresh_events(entries: Iterable[OutboxEntry], window_ms: int, now_ms: int, names: EventNames) -> list[MeterEvent]:
    """Events for the entries not yet claimed: per entry when window_ms is 0; else, for windows of window_ms that have
    ended by now_ms (later commits of an open window would otherwise go out in a second event), one per Stripe
    customer (units) and one claim per Stripe customer and model (tokens). An aggregate never exceeds Stripe's
    largest value: a window that would is split."""
    unclaimed = [e for e in entries if e["sent_as"] is None]
    # A restored entry goes alone under its own identifier: that is the only identifier Stripe can dedupe it by.
    restored = [e for e in unclaimed if e.get("restored_ms") is not None]
    if restored:
        unclaimed = [e for e in unclaimed if e.get("restored_ms") is None]
        return [ev for entry in restored for ev in _fresh_group([entry], names)] + fresh_events(
            unclaimed, window_ms, now_ms, names
        )
    if window_ms <= 0:
        events: list[MeterEvent] = []
        for entry in unclaimed:
            events += _fresh_group([entry], names)
        return events
    windows: dict[tuple[str, str | None, int], list[OutboxEntry]] = {}
    for entry in unclaimed:
        window = entry["ts_ms"] // window_ms
        if (window + 1) * window_ms > now_ms:
            continue  # still open
        model = entry["usage"]["model"] if settles_as_tokens(entry, names) else None  # type: ignore[index]
        windows.setdefault((entry["stripe_customer_id"], model, window), []).append(entry)
    events = []
    for (_, model, _), members in windows.items():
        ordered = sorted(members, key=lambda e: e["seq"])
        groups = _split_tokens(ordered) if model is not None else _split_by_value(ordered)
        for group in groups:
            events += _fresh_group(group, names)
    return events


def aggregate_event(members: Sequence[OutboxEntry], event_name: str) -> MeterEvent:
    """One units event for these unclaimed members (of one Stripe customer): the sum, stamped with the latest time."""
    value = sum(e["amount"] for e in members)
    ts_ms = max(e["ts_ms"] for e in members)
    if len(members) == 1:
        return _event(members[0]["identifier"], event_name, members, value, ts_ms, claimed=False)
    identifier = aggregate_identifier(members[0]["identifier"], len(members), value, ts_ms)
    return _event(identifier, event_name, members, value, ts_ms, claimed=False)


def _fresh_group(members: Sequence[OutboxEntry], names: EventNames) -> list[MeterEvent]:
    """The events of one new claim: members of one customer (and, for tokens, one model) in one window."""
    if not settles_as_tokens(members[0], names):
        return [aggregate_event(members, names.units)]
    first = members[0]["identifier"]
    ts_ms = max(e["ts_ms"] for e in members)
    counts = tuple(map(sum, zip(*(token_counts(e["usage"]) for e in members), strict=True)))
    if len(members) == 1:
        return _token_events(first + TOKEN_CLAIM_SUFFIX, first, members, counts, ts_ms, names, claimed=False)
    claim = token_aggregate_claim(first, len(members), counts, ts_ms)
    return _token_events(claim, f"{first}-tagg{len(members)}", members, counts, ts_ms, names, claimed=False)


def _token_events(
    claim: str,
    base: str,
    members: Sequence[OutboxEntry],
    counts: Sequence[int],
    ts_ms: int,
    names: EventNames,
    *,
    claimed: bool,
) -> list[MeterEvent]:
    """One event per token type with tokens. An event_name of "" (the token meter turned off after this claim) is
    left for the settler's rules to refuse: the claim must be resent as it was, or not at all."""
    usage = members[0]["usage"]
    assert usage is not None, members[0]
    model = usage["model"]
    events = []
    for token_type, tokens in zip(TOKEN_WIRE_TYPES, counts, strict=True):
        if tokens > 0:
            dimensions = ((MODEL_KEY, model), (TOKEN_TYPE_KEY, token_type))
            events.append(
                _event(
                    f"{base}-{token_type}",
                    names.tokens,
                    members,
                    tokens,
                    ts_ms,
                    claimed=claimed,
                    claim=claim,
                    dimensions=dimensions,
                )
            )
    return events


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


def _split_tokens(members: list[OutboxEntry]) -> list[list[OutboxEntry]]:
    """Token entries in groups whose every type's sum stays within Stripe's largest value (so the claim, which holds
    the sums, also stays within the engine's id length)."""
    groups: list[list[OutboxEntry]] = [[]]
    totals = [0] * len(TOKEN_WIRE_TYPES)
    for entry in members:
        counts = token_counts(entry["usage"])
        if groups[-1] and any(t + c > MAX_EVENT_VALUE for t, c in zip(totals, counts, strict=True)):
            groups.append([])
            totals = [0] * len(TOKEN_WIRE_TYPES)
        groups[-1].append(entry)
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
    return groups


def _event(
    identifier: str,
    event_name: str,
    members: Sequence[OutboxEntry],
    value: int,
    ts_ms: int,
    *,
    claimed: bool,
    claim: str = "",
    dimensions: tuple[tuple[str, str], ...] = (),
) -> MeterEvent:
    firsts = [e["first_attempt_ms"] for e in members if e["first_attempt_ms"] is not None]
    return MeterEvent(
        identifier=identifier,
        event_name=event_name,
        stripe_customer_id=members[0]["stripe_customer_id"],
        value=value,
        ts_ms=ts_ms,
        seqs=tuple(e["seq"] for e in members),
        customer_ids=tuple(dict.fromkeys(e["customer_id"] for e in members)),
        claimed=claimed,
        first_attempt_ms=min(firsts) if firsts else None,
        claim=claim,
        dimensions=dimensions,
        restored=any(e.get("restored_ms") is not None for e in members),
    )
