"""The operator page: server-rendered HTML for people (finance as much as platform engineers). No JavaScript.

    GET /                      settlement health, totals, the first budgets, a search box
    GET /budgets?q=TEXT        budgets whose customer or Stripe customer id contains TEXT (any case)
    GET /customers/{id}        one customer: usage against the included quota and the limit, granted credits (unused,
                               and granted this period), projected spend, and the same dashboard its customer sees
                               (spendgate.server.usage_view: the daily chart with the quota line, the top actions,
                               members and models, the limit and the customer's stop-at)

Every value that reaches the HTML goes through html.escape; numbers carry thousands separators. The data comes from
the engine (read-only calls) and the settlement service; per-customer usage goes through `usage_for`, the one place
fed by the usage record of the current period (spendgate.policy.usage_report, the same figures as GetUsage).
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from spendgate import _core
from spendgate.server.usage_view import STYLE as DASHBOARD_STYLE

if TYPE_CHECKING:
    pass

# Budgets on the overview, and at most this many search results (the page says when there were more).
OVERVIEW_BUDGETS: Final[int] = 50
MAX_RESULTS: Final[int] = 200
# Budgets a search looks through: the engine lists at most this many in one call.
SEARCH_SCAN_BUDGETS: Final[int] = 10_000
MAX_QUERY_CHARS: Final[int] = 128
DEAD_LETTERS_SHOWN: Final[int] = 20
NOT_AVAILABLE: Final[str] = "not available yet"

STYLE: Final[str] = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:16px 24px;max-width:1100px}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:28px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:6px 10px;border-bottom:1px solid #e3e6eb;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #e3e6eb;border-radius:6px;padding:10px 14px;min-width:150px}
.card .label{font-size:.8rem;color:#5b6475}.card .value{font-size:1.2rem;font-weight:600}
.ok{color:#17753a}.warn{color:#a15c00}.bad{color:#b3261e}
svg.bar{vertical-align:middle}
form input[type=search]{padding:6px;width:260px}
header form.sign-out{margin-left:auto}
"""
# The Content-Security-Policy source that allows the one inline stylesheet above (and no other style, and no script).
STYLE_CSP_SOURCE: Final[str] = "'sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode() + "'"
SIGN_OUT_FORM: Final[str] = (
    '<form class="sign-out" method="post" action="/logout"><button type="submit">Sign out</button></form>'
)
BAR_WIDTH: Final[int] = 120
BAR_HEIGHT: Final[int] = 10


@dataclass(frozen=True, slots=True)
class Usage:
    """What the customer page shows. The optional parts are None where no figure exists."""

    customer_id: str
    stripe_customer_id: str
    limit: int
    spent: int
    reserved: int
    remaining: int
    active_holds: int
    overdraft: int
    frozen: bool
    included_units: int | None = None
    projected_units: int | None = None
    daily_units: tuple[tuple[str, int], ...] | None = None  # (YYYY-MM-DD, units committed that day), oldest first
    credits: int = 0  # granted credits in `limit` this period (Admin.GrantCredits: granted or carried in)
    credits_granted: int = 0  # credits granted this period, in `grants` grants
    grants: int = 0


def usage_for(engine: _core.Engine, customer_id: str, *, now_ms: int | None = None) -> Usage:
    """One customer's usage in its current period: the balance, and from the usage record (the same figures as
    GetUsage) the included quota, the projection and the daily series. Raises EngineError("not_found")."""
    from spendgate.policy.usage_report import usage_report  # noqa: PLC0415 - keeps the page module light

    view = engine.balance(customer_id)
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    raw = engine.usage(customer_id)
    report = usage_report(raw, now_ms=now)
    return Usage(
        customer_id=view.customer_id,
        stripe_customer_id=view.stripe_customer_id,
        limit=view.limit,
        spent=view.spent,
        reserved=view.reserved,
        remaining=view.remaining,
        active_holds=view.active_holds,
        overdraft=view.overdraft,
        frozen=view.frozen,
        included_units=report.included,
        projected_units=report.projected_total,
        daily_units=report.daily,
        credits=view.credits,
        credits_granted=raw["granted"],
        grants=raw["grants"],
    )


# -- formatting -------------------------------------------------------------------------------------------------------


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def units(value: int | None) -> str:
    """1234567 -> '1,234,567'; None -> 'not available yet'."""
    return NOT_AVAILABLE if value is None else f"{value:,}"


def percent(part: int, whole: int) -> str:
    return "-" if whole <= 0 else f"{100 * part / whole:,.1f} %"


def age(ms: int, now_ms: int) -> str:
    """How long ago a Unix-ms time was, for people ('never' for 0)."""
    if ms <= 0:
        return "never"
    seconds = max(0, now_ms - ms) / 1000
    if seconds < 120:
        return f"{seconds:,.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:,.0f} min ago"
    return f"{seconds / 3600:,.1f} h ago"


def duration(ms: int) -> str:
    return "-" if ms <= 0 else f"{ms / 1000:,.1f} s"


def bar(part: int, whole: int) -> str:
    """A small horizontal bar of part/whole (red past 100 %), as SVG: its width is an attribute, not an inline style,
    which the Content-Security-Policy refuses."""
    share = 0.0 if whole <= 0 else part / whole
    fill = "#b3261e" if share > 1 else "#3d6fd6"
    width = BAR_WIDTH * min(1.0, share)
    return (
        f'<svg class="bar" aria-hidden="true" width="{BAR_WIDTH}" height="{BAR_HEIGHT}">'
        f'<rect width="{BAR_WIDTH}" height="{BAR_HEIGHT}" rx="3" fill="#e3e6eb"/>'
        f'<rect width="{width:.0f}" height="{BAR_HEIGHT}" rx="3" fill="{fill}"/></svg>'
    )


def with_sign_out(document: str) -> str:
    """A page from layout() with a sign-out button at the end of its header (for a signed-in session)."""
    return document.replace("</header>", SIGN_OUT_FORM + "</header>", 1)


def layout(title: str, body: str, query: str = "") -> str:
    """The whole document: header with navigation and the search form, then `body` (already escaped HTML)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} - spendgate</title><style>{STYLE}</style><style>{DASHBOARD_STYLE}</style></head><body>"
        '<header><a href="/">spendgate</a><a href="/budgets">Budgets</a>'
        '<form method="get" action="/budgets" role="search">'
        f'<input type="search" name="q" value="{esc(query)}" placeholder="Search customers" aria-label="Search '
        'customers"> <button type="submit">Search</button></form></header>'
        f"<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )


def card(label: str, value: str, tone: str = "") -> str:
    cls = f' class="value {tone}"' if tone else ' class="value"'
    return f'<div class="card"><div class="label">{esc(label)}</div><div{cls}>{esc(value)}</div></div>'


# -- the pages ---------------------------------------------------------------------------------------------------------


BUDGET_HEADERS: Final[tuple[tuple[str, bool], ...]] = (
    ("Customer", False),
    ("Stripe customer", False),
    ("Limit", True),
    ("Spent", True),
    ("Reserved", True),
    ("Remaining", True),
    ("Used", True),
    ("Status", False),
)


def budget_table(views: Sequence[_core.BalanceView]) -> str:
    if not views:
        return "<p>No budgets match.</p>"
    head = "".join(f'<th class="num">{esc(h)}</th>' if num else f"<th>{esc(h)}</th>" for h, num in BUDGET_HEADERS)
    rows = "".join(_budget_row(view) for view in views)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _budget_row(view: _core.BalanceView) -> str:
    link = f'<a href="/customers/{esc(_path_quote(view.customer_id))}">{esc(view.customer_id)}</a>'
    used = view.spent + view.reserved
    cells = [
        link,
        esc(view.stripe_customer_id),
        units(view.limit),
        units(view.spent),
        units(view.reserved),
        units(view.remaining),
        f"{bar(used, view.limit)} {esc(percent(used, view.limit))}",
        esc(_status(view)),
    ]
    return (
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if num else f"<td>{cell}</td>"
            for cell, (_, num) in zip(cells, BUDGET_HEADERS, strict=True)
        )
        + "</tr>"
    )


def _status(view: _core.BalanceView | Usage) -> str:
    parts = ["frozen" if view.frozen else "active"]
    if view.overdraft:
        parts.append(f"overdraft {view.overdraft:,}")
    return ", ".join(parts)


def _path_quote(customer_id: str) -> str:
    from urllib.parse import quote  # noqa: PLC0415

    return quote(customer_id, safe="")


def settlement_section(snapshot: dict[str, Any], letters: Iterable[_core.DeadLetterEntry], now_ms: int) -> str:
    """Settlement health: on/off, outbox depth and lag, dead letters (with their reasons), the last error."""
    depth, bound = snapshot["outbox_depth"], snapshot["max_outbox_entries"]
    failing = snapshot.get("failing_since_ms", 0)
    cards = "".join(
        [
            card(
                "Settlement to Stripe",
                "on" if snapshot["enabled"] else "OFF (no STRIPE_API_KEY)",
                "ok" if snapshot["enabled"] else "warn",
            ),
            card("Outbox depth", f"{depth:,} of {bound:,}", "warn" if depth > 0.8 * bound else ""),
            card("Settlement lag (oldest waiting)", duration(snapshot["oldest_age_ms"])),
            card("Dead letters", f"{snapshot['dead_letters']:,}", "bad" if snapshot["dead_letters"] else "ok"),
            card("Last accepted by Stripe", age(snapshot.get("last_success_ms", 0), now_ms)),
            card("Failing since", age(failing, now_ms) if failing else "not failing", "bad" if failing else "ok"),
        ]
    )
    error = snapshot.get("last_error", "")
    last_error = (
        f"<p>Last error: {esc(error)} ({esc(age(snapshot.get('last_error_ms', 0), now_ms))})</p>" if error else ""
    )
    return f'<h2>Settlement health</h2><div class="cards">{cards}</div>{last_error}{dead_letter_table(letters)}'


def dead_letter_table(letters: Iterable[_core.DeadLetterEntry]) -> str:
    rows = "".join(
        f'<tr><td class="num">{letter["seq"]:,}</td><td>{esc(letter["customer_id"])}</td>'
        f'<td class="num">{units(letter["amount"])}</td><td>{esc(letter["reason"])}</td></tr>'
        for letter in letters
    )
    if not rows:
        return ""
    return (
        '<h2>Dead letters</h2><table><thead><tr><th class="num">Seq</th><th>Customer</th>'
        f'<th class="num">Units</th><th>Reason</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def overview_page(engine: _core.Engine, snapshot: dict[str, Any], extra: str = "") -> str:
    """extra: more sections (already escaped HTML), after settlement health (spendgate.server.page_billing)."""
    stats = engine.stats()
    now_ms = time.time_ns() // 1_000_000
    totals = (
        '<div class="cards">'
        + card("Budgets", f"{stats['budgets']:,}")
        + card("Open holds", f"{stats['active_holds']:,}")
        + card("Expired holds reclaimed", f"{stats['expired_total']:,}")
        + "</div>"
    )
    letters = engine.dead_letters(DEAD_LETTERS_SHOWN)
    views = engine.list_budgets("", OVERVIEW_BUDGETS)
    more = f'<p><a href="/budgets">All budgets ({stats["budgets"]:,})</a></p>' if stats["budgets"] > len(views) else ""
    body = (
        totals + settlement_section(snapshot, letters, now_ms) + extra + "<h2>Budgets</h2>" + budget_table(views) + more
    )
    return layout("Overview", body)


def search(engine: _core.Engine, query: str) -> tuple[list[_core.BalanceView], bool]:
    """Budgets whose customer or Stripe customer id contains `query` (any case), and whether there were more than
    MAX_RESULTS. An empty query lists the first budgets."""
    needle = query.strip().lower()
    found = []
    for view in engine.list_budgets("", SEARCH_SCAN_BUDGETS):
        if needle in view.customer_id.lower() or needle in view.stripe_customer_id.lower():
            found.append(view)
            if len(found) > MAX_RESULTS:
                return found[:MAX_RESULTS], True
    return found, False


def budgets_page(engine: _core.Engine, query: str) -> str:
    query = query[:MAX_QUERY_CHARS]
    views, more = search(engine, query)
    what = f"{len(views):,} budget{'s' if len(views) != 1 else ''}"
    summary = f"<p>{esc(what)} matching “{esc(query)}”.</p>" if query.strip() else f"<p>{esc(what)}.</p>"
    tail = f"<p>Only the first {MAX_RESULTS:,} are shown: narrow the search.</p>" if more else ""
    return layout("Budgets", summary + budget_table(views) + tail, query)


def customer_page(usage: Usage, dashboard: str = "", extra: str = "") -> str:
    """The operator's view of one customer; `dashboard` is the customer's own (usage_view sections, already HTML);
    `extra`: more sections (already escaped HTML), at the end (spendgate.server.page_billing)."""
    used = usage.spent + usage.reserved
    included = usage.included_units
    cards = "".join(
        [
            card("Spent", f"{usage.spent:,}"),
            card(
                "Reserved (open holds)",
                f"{usage.reserved:,} in {usage.active_holds:,} hold{'' if usage.active_holds == 1 else 's'}",
            ),
            card("Remaining", f"{usage.remaining:,}"),
            card("Limit", f"{usage.limit:,}" + (f" (with {usage.credits:,} credits)" if usage.credits else "")),
            card("Credits unused", f"{unused_credits(usage):,} of {usage.credits:,}"),
            card(
                "Credits granted this period",
                f"{usage.credits_granted:,} in {usage.grants:,} grant{'' if usage.grants == 1 else 's'}",
            ),
            card("Included quota", units(included)),
            card("Projected spend this period", units(usage.projected_units)),
            card("Status", _status(usage), "bad" if usage.frozen or usage.overdraft else "ok"),
        ]
    )
    against = (
        f"<p>Against the limit: {bar(used, usage.limit)} {esc(percent(used, usage.limit))} "
        f"({used:,} of {usage.limit:,} units spent or held)</p>"
        f"<p>Against the included quota: "
        + (
            f"{bar(usage.spent, included)} {esc(percent(usage.spent, included))}"
            if included is not None
            else esc(NOT_AVAILABLE)
        )
        + "</p>"
    )
    body = (
        f'<p>Stripe customer: {esc(usage.stripe_customer_id)}</p><div class="cards">{cards}</div>{against}'
        f'{extra}<h2>What the customer sees</h2><div class="dash">{dashboard}</div>'
    )
    return layout(f"Customer {usage.customer_id}", body)


def unused_credits(usage: Usage) -> int:
    """The credits not yet drawn: spend draws the configured limit (limit - credits) first, then the credits."""
    return min(usage.credits, max(0, usage.limit - usage.spent))


def not_found_page(customer_id: str) -> str:
    body = (
        f"<p>There is no budget for customer {esc(customer_id)}. Search for it with the box above, or create it "
        "with <code>spendgate budget set</code>.</p>"
    )
    return layout("No such customer", body)
