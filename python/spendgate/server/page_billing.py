"""The operator page's billing sections: invoice spikes (the invoice-spike guard's records, each one an invoice_spike
alert) on the overview, and a customer's last scheduled reconciliation with Stripe on the customer page. Kept out of
page.py, which only places them; every value goes through page.esc."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from spendgate.server.page import age, card, esc, units

# Invoice spikes listed on the overview, newest first.
SPIKES_SHOWN: Final[int] = 20


def invoice_spikes_section(records: Sequence[tuple[str, Mapping[str, Any]]], now_ms: int) -> str:
    """The guard's spike records (invoice id, record), newest first; "" when there is none."""
    if not records:
        return ""
    rows = "".join(_spike_row(invoice_id, record, now_ms) for invoice_id, record in records[:SPIKES_SHOWN])
    return (
        "<h2>Invoice spikes</h2><p>Draft invoices more than invoice_spike_percent above the customer's previous "
        "invoice (each raised an invoice_spike alert). A held draft waits for <code>spendgate invoices release "
        'INVOICE</code>.</p><table><thead><tr><th>Invoice</th><th>Stripe customer</th><th class="num">Draft'
        '</th><th class="num">Previous</th><th>State</th><th>Seen</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def _spike_row(invoice_id: str, record: Mapping[str, Any], now_ms: int) -> str:
    if record.get("released_ms"):
        state = f"released {age(int(record['released_ms']), now_ms)}"
    elif record.get("held"):
        state = "HELD (auto_advance false)"
    else:
        state = "alert only"
    currency = str(record.get("currency") or "")
    previous = record.get("previous_total")
    cells = [
        f"<td>{esc(invoice_id)}</td>",
        f"<td>{esc(record.get('customer', ''))}</td>",
        f'<td class="num">{esc(units(int(record.get("draft_total") or 0)))} {esc(currency)}</td>',
        (
            f'<td class="num">{esc(units(previous) if isinstance(previous, int) else "-")} '
            f"{esc(record.get('previous_id', ''))}</td>"
        ),
        f"<td>{esc(state)}</td>",
        f"<td>{esc(age(int(record.get('ts_ms') or 0), now_ms))}</td>",
    ]
    return "<tr>" + "".join(cells) + "</tr>"


def reconcile_section(result: Mapping[str, Any] | None, now_ms: int) -> str:
    """A customer's last scheduled reconciliation (spendgate.settle.scheduled.CustomerResult.as_dict()), or that
    there was none yet."""
    if result is None:
        return (
            "<h2>Reconciled with Stripe</h2><p>Not reconciled yet (the sidecar reconciles every "
            "reconcile_interval_ms, with STRIPE_API_KEY set).</p>"
        )
    tone = "bad" if result["divergent"] else "ok"
    cards = "".join(
        [
            card("Stripe's meter total", units(result["stripe"]), tone),
            card("Ledger, settled", units(result["settled"])),
            card("Pending (in flight)", f"{result['pending']:,} ({result['in_flight']:,})"),
            card("Verdict", str(result["status"]), tone),
            card("Reconciled", age(int(result["ts_ms"]), now_ms)),
        ]
    )
    return (
        f"<h2>Reconciled with Stripe</h2><p>Stripe customer {esc(result['stripe_customer_id'])}, "
        f"{esc(result['unit'])} committed since {esc(result['window_start'])} (its current period), up to now.</p>"
        f'<div class="cards">{cards}</div>'
    )
