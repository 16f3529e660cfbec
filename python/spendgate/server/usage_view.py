"""One customer's usage dashboard as HTML sections, shared by the customer's usage page and the operator page.

    board = dashboard_for(engine, "cus_1", now_ms=now)          # EngineError("not_found") without a budget
    html = dashboard_sections(board, unit)                       # numbers first: the big number, the projection,
                                                                 # the daily chart, the breakdowns
    html += limit_section(board, unit, control="")               # the limit (and the stop-at form, when allowed)

Figures come from the usage record of the current period (spendgate.policy.usage_report, the same as GetUsage) and
the balance. Every value that reaches the HTML goes through html.escape; amounts go through the display unit. The
chart is an inline SVG (no script): the last CHART_DAYS days as bars, days of the previous period lighter, and a
dashed line at the included quota's even share per day (the pace that uses exactly the quota by the period's end).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import html
import time
from typing import Final

from spendgate import _core
from spendgate.display import DisplayUnit
from spendgate.policy.usage_report import (
    DAY_MS,
    MIN_ELAPSED_FOR_PROJECTION_MS,
    NEVER_MS,
    usage_report,
)

CHART_DAYS: Final[int] = 30
TOP_ROWS: Final[int] = 10
MEMBER_DIMENSION: Final[str] = "member"  # the engine's: an org's usage names the member that spent it
ACTION_DIMENSION: Final[str] = "action"
# The chart's drawing box, in SVG user units (it scales to its container).
CHART_WIDTH: Final[int] = 720
CHART_HEIGHT: Final[int] = 220
CHART_LEFT: Final[int] = 70
CHART_RIGHT: Final[int] = 10
CHART_TOP: Final[int] = 12
CHART_BOTTOM: Final[int] = 24
CHART_LABEL_EVERY_DAYS: Final[int] = 5
PROGRESS_WIDTH: Final[int] = 600
PROGRESS_HEIGHT: Final[int] = 14
SHARE_BAR_WIDTH: Final[int] = 100
SHARE_BAR_HEIGHT: Final[int] = 8
CURRENT_FILL: Final[str] = "#3d6fd6"
PREVIOUS_FILL: Final[str] = "#b7c6e8"
OVER_FILL: Final[str] = "#b3261e"
QUOTA_STROKE: Final[str] = "#a15c00"
TRACK_FILL: Final[str] = "#e3e6eb"
QUOTA_STOPS: Final[str] = "the included quota"

STYLE: Final[str] = """
.dash section{background:#fff;border:1px solid #e3e6eb;border-radius:8px;padding:14px 18px;margin:0 0 14px}
.dash h2{font-size:1rem;margin:0 0 8px;color:#3a4354}
.dash .big{font-size:2.4rem;font-weight:700;font-variant-numeric:tabular-nums;line-height:1.1}
.dash .of{color:#5b6475;margin:2px 0 8px}.dash .sub{color:#5b6475;font-size:.85rem;margin-top:6px}
.dash svg{display:block;max-width:100%;height:auto}.dash svg.share{display:inline-block;vertical-align:middle}
.dash table{border-collapse:collapse;width:100%}
.dash th,.dash td{padding:5px 8px;border-bottom:1px solid #eef0f3;text-align:left}
.dash td.num,.dash th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.dash .legend{font-size:.8rem;color:#5b6475}
.dash .swatch{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
.dash .s-cur{background:#3d6fd6}.dash .s-prev{background:#b7c6e8}.dash .s-quota{border-top:2px dashed #a15c00;height:0}
.dash .cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px}
.dash .cols{margin:0 0 14px}.dash .cols section{margin:0}.dash svg.daily{width:100%}
.dash .ok{color:#17753a}.dash .warn{color:#a15c00}.dash .bad{color:#b3261e}
.dash form{margin-top:10px}.dash input[type=number]{padding:6px;width:140px;font-size:1rem}
.dash button{padding:6px 12px;font-size:.95rem}.dash .note{font-size:.85rem;color:#5b6475}
.dash .notice{padding:8px 12px;border-radius:6px;background:#eaf5ee;color:#17753a;margin:0 0 12px}
.dash .notice.bad{background:#fbeceb;color:#b3261e}
"""
# The Content-Security-Policy source that allows the stylesheet above (pages put it in its own <style> element).
STYLE_CSP_SOURCE: Final[str] = "'sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode() + "'"


@dataclasses.dataclass(frozen=True, slots=True)
class Dashboard:
    customer_id: str
    limit: int  # the operator's
    stop_at: int  # the customer's own, 0: none
    enforced: int  # what Reserve admits up to: the limit, capped by the kill switch and the stop-at
    block_overage: bool
    hard: bool  # usage stops at `enforced` (hard mode, or a stop-at); soft mode lets calls pass the limit, flagged
    frozen: bool
    used: int  # committed this period (the usage record: GetUsage's total)
    reserved: int  # held by calls in flight
    included: int
    projected: int
    projected_overage: int
    period_start_ms: int
    period_end_ms: int  # NEVER_MS for a lifetime period
    limit_reached_ms: int | None  # when `enforced` is reached at this period's rate; None: not this period
    days: tuple[tuple[str, int, bool], ...]  # (YYYY-MM-DD, units, in the current period), oldest first
    by_model: tuple[tuple[str, int], ...]  # (model, units), largest first
    by_dimension: tuple[tuple[str, str, int], ...]  # (key, value, units): the top values of each key
    members: int  # > 0: an org
    credits: int = 0  # prepaid credits in `limit` this period (Admin.GrantCredits)


def dashboard_for(engine: _core.Engine, customer_id: str, *, now_ms: int) -> Dashboard:
    """The dashboard figures of the customer's current period. Raises EngineError("not_found")."""
    view = engine.balance(customer_id)
    report = usage_report(engine.usage(customer_id), now_ms=now_ms, top=TOP_ROWS)
    enforced = view.limit
    if view.block_overage:
        enforced = min(enforced, view.included)
    if view.stop_at > 0:
        enforced = min(enforced, view.stop_at)
    models: dict[str, int] = {}
    for model, _, _, units in report.by_model:
        models[model] = models.get(model, 0) + units
    return Dashboard(
        customer_id=view.customer_id,
        limit=view.limit,
        stop_at=view.stop_at,
        enforced=enforced,
        block_overage=view.block_overage,
        hard=view.mode == "hard" or view.stop_at > 0,
        frozen=view.frozen,
        used=report.total,
        reserved=view.reserved,
        included=report.included,
        projected=report.projected_total,
        projected_overage=report.projected_overage,
        period_start_ms=report.period_start_ms,
        period_end_ms=report.period_end_ms,
        limit_reached_ms=_reached_at(
            report.total + view.reserved, enforced, report.period_start_ms, report.period_end_ms, now_ms, report.total
        ),
        days=_last_days(engine, customer_id, report.daily, report.period_start_ms, now_ms),
        by_model=tuple(sorted(models.items(), key=lambda row: (-row[1], row[0]))),
        by_dimension=report.by_dimension,
        members=view.members,
        credits=view.credits,
    )


def _reached_at(used: int, limit: int, start_ms: int, end_ms: int, now_ms: int, committed: int) -> int | None:
    """When spending at this period's average rate reaches `limit`: now if it is reached, None if not this period
    (or a period without an end, or too early to tell)."""
    if used >= limit:
        return now_ms
    elapsed_ms = now_ms - start_ms
    if end_ms == NEVER_MS or elapsed_ms < MIN_ELAPSED_FOR_PROJECTION_MS or committed <= 0:
        return None
    at_ms = now_ms + -(-(limit - used) * elapsed_ms // committed)
    return at_ms if at_ms < end_ms else None


def _last_days(
    engine: _core.Engine, customer_id: str, daily: tuple[tuple[str, int], ...], start_ms: int, now_ms: int
) -> tuple[tuple[str, int, bool], ...]:
    """The last CHART_DAYS days up to today: this period's series, and before its start the previous period's."""
    days = {day: (units, True) for day, units in daily}
    today = now_ms // DAY_MS
    first = today - CHART_DAYS + 1
    if start_ms // DAY_MS > first:
        closed = engine.closed_periods(customer_id, 1)
        if closed:
            previous = usage_report(engine.usage(customer_id, closed[0]["start_ms"]), now_ms=now_ms)
            for day, units in previous.daily:
                days.setdefault(day, (units, False))
    series = []
    for number in range(first, today + 1):
        name = (dt.date(1970, 1, 1) + dt.timedelta(days=number)).isoformat()
        units, current = days.get(name, (0, number >= start_ms // DAY_MS))
        series.append((name, units, current))
    return tuple(series)


# -- the sections ------------------------------------------------------------------------------------------------------


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def date_text(ms: int) -> str:
    """'3 Dec 2026' (UTC)."""
    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return f"{when.day} {when:%b %Y}"


def share_text(part: int, whole: int) -> str:
    return "-" if whole <= 0 else f"{100 * part / whole:,.1f} %"


def dashboard_sections(board: Dashboard, unit: DisplayUnit) -> str:
    """Numbers first: the big number with its progress bar, the projection, the daily chart, the breakdowns."""
    return big_number(board, unit) + projection(board, unit) + daily_chart(board, unit) + breakdowns(board, unit)


def big_number(board: Dashboard, unit: DisplayUnit) -> str:
    against = board.included if board.included > 0 else board.enforced
    what = "included" if board.included > 0 else "limit"
    period = (
        f"This period: {esc(date_text(board.period_start_ms))} – {esc(date_text(board.period_end_ms - 1))}"
        if board.period_end_ms != NEVER_MS
        else "No period end: usage never resets"
    )
    in_flight = f" · {esc(unit.format(board.reserved))} in progress" if board.reserved else ""
    return (
        '<section class="used"><h2>Used this period</h2>'
        f'<div class="big" id="used">{esc(unit.format(board.used))}</div>'
        f'<div class="of" id="of-included">of {esc(unit.format(against))} {what} · '
        f"{esc(share_text(board.used, against))}"
        f'</div>{progress_bar(board.used, against)}<div class="sub">{period}{in_flight}</div></section>'
    )


def progress_bar(part: int, whole: int) -> str:
    """A wide bar of part/whole as SVG (red past 100 %), with the share as its accessible name."""
    share = 0.0 if whole <= 0 else part / whole
    width = PROGRESS_WIDTH * min(1.0, share)
    fill = OVER_FILL if share > 1 else CURRENT_FILL
    return (
        f'<svg class="progress" role="img" aria-label="{esc(share_text(part, whole))} used" '
        f'width="{PROGRESS_WIDTH}" height="{PROGRESS_HEIGHT}" viewBox="0 0 {PROGRESS_WIDTH} {PROGRESS_HEIGHT}">'
        f'<rect width="{PROGRESS_WIDTH}" height="{PROGRESS_HEIGHT}" rx="7" fill="{TRACK_FILL}"/>'
        f'<rect class="fill" width="{width:.1f}" height="{PROGRESS_HEIGHT}" rx="7" fill="{fill}"/></svg>'
    )


def projection(board: Dashboard, unit: DisplayUnit) -> str:
    if board.period_end_ms == NEVER_MS:
        return (
            '<section class="projection"><h2>Projection</h2><p>This budget has no period end, so there is '
            "nothing to project.</p></section>"
        )
    # Where usage stops, nothing past it is spent: the projection says so instead of a figure that cannot happen.
    stopped = board.hard and board.projected > board.enforced
    expected = min(board.projected, board.enforced) if stopped else board.projected
    over = max(0, expected - board.included) if board.included > 0 else 0
    line = f"On track for <strong>{esc(unit.format(expected))}</strong> this period"
    if board.included > 0:
        line += (
            f', <strong class="warn">{esc(unit.format(over))} over the included quota</strong>'
            if over
            else ", within the included quota"
        )
    line += f" (usage stops there; at this rate it would be {esc(unit.format(board.projected))})." if stopped else "."
    limit = f"{limit_name(board)} of {unit.format(board.enforced)}"
    blocked = " Usage past the included quota is blocked." if limit_name(board) == QUOTA_STOPS else ""
    if board.used + board.reserved >= board.enforced:
        reach = f'<p class="bad">{esc(limit[0].upper() + limit[1:])} is reached: new usage is refused.{blocked}</p>'
    elif board.limit_reached_ms is not None:
        when = date_text(board.limit_reached_ms)
        when = "today" if when == date_text(time.time_ns() // 1_000_000) else f"on {when}"
        reach = f'<p>At this rate {esc(limit)} is reached <strong class="warn">{esc(when)}</strong>.{blocked}</p>'
    else:
        reach = f"<p>At this rate {esc(limit)} is not reached this period.{blocked}</p>"
    return f'<section class="projection"><h2>Projection</h2><p id="projection">{line}</p>{reach}</section>'


def limit_name(board: Dashboard) -> str:
    """What sets the point where usage stops, in the customer's words."""
    if board.stop_at and board.enforced == board.stop_at and board.stop_at < board.limit:
        return "your stop-at"
    if board.block_overage and board.enforced == board.included and board.included < board.limit:
        return QUOTA_STOPS
    return "the limit"


def daily_chart(board: Dashboard, unit: DisplayUnit) -> str:
    """The last CHART_DAYS days as an inline SVG bar chart, with the included quota's even share per day."""
    period_days = (board.period_end_ms - board.period_start_ms) / DAY_MS if board.period_end_ms != NEVER_MS else 0
    per_day = board.included / period_days if board.included > 0 and period_days > 0 else 0.0
    svg = daily_chart_svg(board.days, unit, per_day)
    legend = (
        '<div class="legend"><span class="swatch s-cur"></span>this period'
        + (
            '<span class="swatch s-prev"></span>previous period'
            if any(units and not current for _, units, current in board.days)
            else ""
        )
        + (
            f'<span class="swatch s-quota"></span>included quota per day ({esc(unit.format(round(per_day)))}, '
            f"{esc(unit.format(board.included))} over {period_days:,.0f} days)"
            if per_day
            else ""
        )
        + "</div>"
    )
    return f'<section class="chart"><h2>Daily usage, last {CHART_DAYS} days</h2>{svg}{legend}</section>'


def daily_chart_svg(
    days: tuple[tuple[str, int, bool], ...] | list[tuple[str, int, bool]], unit: DisplayUnit, quota_per_day: float = 0.0
) -> str:
    """One bar per day, each with a <title> (its date and amount); a date label every few days; the peak on the
    axis; a dashed line at `quota_per_day` (0: none)."""
    if not days:
        return "<p>No usage recorded yet.</p>"
    peak = max(units for _, units, _ in days)
    top = max(peak, quota_per_day) * 1.1 or 1
    plot_w = CHART_WIDTH - CHART_LEFT - CHART_RIGHT
    plot_h = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    base = CHART_TOP + plot_h
    slot = plot_w / len(days)
    parts = [
        f'<line x1="{CHART_LEFT}" y1="{base}" x2="{CHART_WIDTH - CHART_RIGHT}" y2="{base}" stroke="#c5cad3"/>',
        (
            f'<text x="{CHART_LEFT - 6}" y="{base}" font-size="11" text-anchor="end" fill="#5b6475">'
            f"{esc(unit.format(0))}</text>"
        ),
    ]
    if peak:
        y = base - plot_h * peak / top
        parts.append(
            f'<line x1="{CHART_LEFT}" y1="{y:.1f}" x2="{CHART_WIDTH - CHART_RIGHT}" y2="{y:.1f}" '
            f'stroke="#eef0f3"/><text x="{CHART_LEFT - 6}" y="{y + 4:.1f}" font-size="11" '
            f'text-anchor="end" fill="#5b6475">{esc(unit.format(peak))}</text>'
        )
    for index, (day, units, current) in enumerate(days):
        height = plot_h * units / top
        x = CHART_LEFT + index * slot + slot * 0.15
        fill = CURRENT_FILL if current else PREVIOUS_FILL
        label = ""
        if (len(days) - 1 - index) % CHART_LABEL_EVERY_DAYS == 0:
            label = (
                f'<text x="{x + slot * 0.35:.1f}" y="{CHART_HEIGHT - 6}" font-size="11" text-anchor="middle" '
                f'fill="#5b6475">{esc(day[5:])}</text>'
            )
        parts.append(
            f'<g class="day"><title>{esc(day)}: {esc(unit.format(units))}</title>'
            f'<rect x="{x:.1f}" y="{base - height:.1f}" width="{slot * 0.7:.1f}" height="{height:.1f}" '
            f'fill="{fill}"/>{label}</g>'
        )
    if quota_per_day > 0:
        y = base - plot_h * quota_per_day / top
        parts.append(
            f'<line class="quota" x1="{CHART_LEFT}" y1="{y:.1f}" x2="{CHART_WIDTH - CHART_RIGHT}" '
            f'y2="{y:.1f}" stroke="{QUOTA_STROKE}" stroke-width="2" stroke-dasharray="6 4">'
            f"<title>included quota per day: {esc(unit.format(round(quota_per_day)))}</title></line>"
        )
    return (
        f'<svg class="daily" role="img" aria-label="Daily usage, peak {esc(unit.format(peak))}" '
        f'width="{CHART_WIDTH}" height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}">'
        f"{''.join(parts)}</svg>"
    )


def breakdowns(board: Dashboard, unit: DisplayUnit) -> str:
    """What drives the usage: the top actions (and any other dimension), the members of an org, the models."""
    keys = sorted(
        {key for key, _, _ in board.by_dimension if key != MEMBER_DIMENSION},
        key=lambda key: (key != ACTION_DIMENSION, key),
    )
    tables = []
    for key in keys:
        rows = [(value, units) for k, value, units in board.by_dimension if k == key]
        title = "Top actions" if key == ACTION_DIMENSION else f"By {key}"
        tables.append(share_table(title, key.capitalize(), rows, board.used, unit, css_id=f"by-{key}"))
    members = [(value, units) for k, value, units in board.by_dimension if k == MEMBER_DIMENSION]
    if board.members > 0 or members:
        tables.append(share_table("By member", "Member", members, board.used, unit, css_id="by-member"))
    if board.by_model:
        tables.append(share_table("By model", "Model", list(board.by_model), board.used, unit, css_id="by-model"))
    if not tables:
        return ""
    return f'<div class="cols">{"".join(tables)}</div>'


def share_table(
    title: str, column: str, rows: list[tuple[str, int]], total: int, unit: DisplayUnit, *, css_id: str
) -> str:
    body = (
        "".join(
            f'<tr><td>{esc(name)}</td><td class="num">{esc(unit.format(units))}</td>'
            f'<td class="num">{share_bar(units, total)} {esc(share_text(units, total))}</td></tr>'
            for name, units in rows[:TOP_ROWS]
        )
        or '<tr><td colspan="3">No usage yet.</td></tr>'
    )
    return (
        f'<section id="{esc(css_id)}"><h2>{esc(title)}</h2><table><thead><tr><th>{esc(column)}</th>'
        f'<th class="num">Used</th><th class="num">Share</th></tr></thead><tbody>{body}</tbody></table></section>'
    )


def share_bar(part: int, whole: int) -> str:
    share = 0.0 if whole <= 0 else min(1.0, part / whole)
    return (
        f'<svg class="share" aria-hidden="true" width="{SHARE_BAR_WIDTH}" height="{SHARE_BAR_HEIGHT}">'
        f'<rect width="{SHARE_BAR_WIDTH}" height="{SHARE_BAR_HEIGHT}" rx="4" fill="{TRACK_FILL}"/>'
        f'<rect width="{SHARE_BAR_WIDTH * share:.1f}" height="{SHARE_BAR_HEIGHT}" rx="4" fill="{CURRENT_FILL}"/>'
        "</svg>"
    )


def limit_section(board: Dashboard, unit: DisplayUnit, *, control: str = "") -> str:
    """The limit in force and why: the provider's limit, the customer's own stop-at, the kill switch; then `control`
    (the stop-at form, already HTML) when the link allows it."""
    rows = [("Limit set by your provider", unit.format(board.limit))]
    if board.credits:
        # Spend draws the provider's limit first, then the credits: what is left of them carries into the next period.
        unused = min(board.credits, max(0, board.limit - board.used))
        rows.append(("Prepaid credits in it", f"{unit.format(unused)} unused of {unit.format(board.credits)}"))
    rows.append(("Your own stop-at", unit.format(board.stop_at) if board.stop_at else "none"))
    if board.block_overage:
        rows.append(("Usage past the included quota", "blocked"))
    rows.append(("Usage stops at", unit.format(board.enforced)))
    rows.append(("Left before it stops", unit.format(max(0, board.enforced - board.used - board.reserved))))
    if board.frozen:
        rows.append(("Status", "paused by your provider"))
    table = "".join(f'<tr><th>{esc(name)}</th><td class="num">{esc(value)}</td></tr>' for name, value in rows)
    return f'<section class="limit" id="limit"><h2>Limit</h2><table>{table}</table>{control}</section>'
