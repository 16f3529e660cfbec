"""`spendgate ledger export`: every ledger entry of a budget period, archived ones included, as CSV or JSON lines.

It pages through Admin.ListLedger on a running sidecar (the sidecar reads LMDB and the archive; nothing here opens the
data dir). The period is pinned by the first page: later pages ask for that period by a time inside it, so a roll-over
during the export cannot switch it to the next one. The export's count and total are checked against GetUsage's for
the same period: for a closed period they must be equal (the usage record is kept with the ledger in one
transaction); for the current one, commits made meanwhile may follow the export.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import IO, Any, Final

from spendgate.policy.prices import TOKEN_TYPES
from spendgate.v1 import spendgate_pb2 as pb

FORMATS: Final[tuple[str, ...]] = ("csv", "jsonl")
# Entries asked for per ListLedger call: the server's most (MAX_LEDGER_PAGE, repeated here to keep the CLI free of
# the compiled engine).
PAGE_LIMIT: Final[int] = 1_000
STATE_WORDS: Final[dict[int, str]] = {
    pb.SETTLEMENT_STATE_PENDING: "pending", pb.SETTLEMENT_STATE_SENT: "sent",
    pb.SETTLEMENT_STATE_DEAD_LETTER: "dead_letter", pb.SETTLEMENT_STATE_CREDIT: "credit",
}  # fmt: skip
CSV_COLUMNS: Final[tuple[str, ...]] = (
    "seq", "time", "ts_ms", "customer_id", "parent", "reservation_id", "amount", "reserved", "excess", "model",
    *(f"tokens_{t}" for t in TOKEN_TYPES), "cache_hit", "dimensions", "stripe_customer_id", "identifier",
    "meter_event_identifiers", "state", "settled_ms", "dead_letter_reason", "archived", "period_start_ms", "kind",
    "reason",
)  # fmt: skip

ListLedger = Callable[[pb.ListLedgerRequest], pb.ListLedgerResponse]


class ExportError(Exception):
    """The sidecar's pages did not make sense (a cursor that does not advance, a period that changed)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExportSummary:
    entries: int  # commits (usage); grants are counted apart
    total: int
    grants: int
    period_start_ms: int
    period_end_ms: int


def pages(list_ledger: ListLedger, customer_id: str, period: str) -> Iterator[pb.ListLedgerResponse]:
    """Every page of the period, from the start, until the sidecar says there is no more."""
    request = pb.ListLedgerRequest(customer_id=customer_id, period=period, after=0, limit=PAGE_LIMIT)
    first_start_ms: int | None = None
    while True:
        page = list_ledger(request)
        if first_start_ms is None:
            first_start_ms = page.period_start_ms
            request.period = inside_period(page.period_start_ms)
        elif page.period_start_ms != first_start_ms:
            raise ExportError(
                f"the period changed during the export (from {first_start_ms} to "
                f"{page.period_start_ms} ms): run it again with --period DATE"
            )
        yield page
        if not page.more:
            return
        if page.next_after <= request.after:
            raise ExportError(f"the sidecar's cursor did not advance past {request.after}: report this as a bug")
        request.after = page.next_after


def inside_period(start_ms: int) -> str:
    """A GetUsage period selector for the period starting at `start_ms`: the first whole second in it (whole seconds
    survive the selector's float conversion exactly)."""
    second = -(-start_ms // 1000)
    return dt.datetime.fromtimestamp(second, dt.UTC).isoformat()


def entry_record(entry: pb.LedgerEntry) -> dict[str, Any]:
    """One entry as plain values (JSON lines write it as is)."""
    return {
        "seq": entry.seq,
        "time": iso_ms(entry.ts_ms),
        "ts_ms": entry.ts_ms,
        "customer_id": entry.customer_id,
        "parent": entry.parent,
        "reservation_id": entry.reservation_id,
        "amount": entry.amount,
        "reserved": entry.reserved,
        "excess": entry.excess,
        "model": entry.model,
        "tokens": {part.token_type: part.tokens for part in entry.parts},
        "units_by_type": {part.token_type: part.units for part in entry.parts},
        "cache_hit": entry.cache_hit,
        "dimensions": dict(sorted(entry.dimensions.items())),
        "stripe_customer_id": entry.stripe_customer_id,
        "identifier": entry.identifier,
        "meter_event_identifiers": list(entry.meter_event_identifiers),
        "state": STATE_WORDS.get(entry.state, "unknown"),
        "settled_ms": entry.settled_ms,
        "dead_letter_reason": entry.dead_letter_reason,
        "archived": entry.archived,
        "period_start_ms": entry.period_start_ms,
        "claim": entry.claim,
        "kind": entry.kind or "commit",
        "reason": entry.reason,
    }


def csv_row(record: dict[str, Any]) -> dict[str, Any]:
    row = {column: record.get(column, "") for column in CSV_COLUMNS}
    row.update({f"tokens_{t}": record["tokens"].get(t, "") for t in TOKEN_TYPES})
    row["dimensions"] = json.dumps(record["dimensions"], separators=(",", ":")) if record["dimensions"] else ""
    row["meter_event_identifiers"] = " ".join(record["meter_event_identifiers"])
    return row


def iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def export(list_ledger: ListLedger, customer_id: str, period: str, fmt: str, out: IO[str]) -> ExportSummary:
    """Write every entry of the period to `out` (credit grants included, marked kind "grant"); returns how many
    commits and their total units, which GetUsage's commits and total equal (a grant is not usage)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n") if fmt == "csv" else None
    count = total = grants = start_ms = end_ms = 0
    for number, page in enumerate(pages(list_ledger, customer_id, period)):
        if number == 0 and writer is not None:
            writer.writeheader()  # once the sidecar accepted the request: a refusal writes nothing
        start_ms, end_ms = page.period_start_ms, page.period_end_ms
        for entry in page.entries:
            record = entry_record(entry)
            if writer is not None:
                writer.writerow(csv_row(record))
            else:
                out.write(json.dumps(record, separators=(",", ":")) + "\n")
            if entry.kind == "grant":  # a grant adds credits: it is not usage, and GetUsage does not count it
                grants += 1
            else:
                count += 1
                total += entry.amount
    return ExportSummary(entries=count, total=total, grants=grants, period_start_ms=start_ms, period_end_ms=end_ms)
