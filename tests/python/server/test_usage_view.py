"""The dashboard sections both pages share: the figures from a real engine, and the SVG they draw."""

from __future__ import annotations

import re
import time
from pathlib import Path

from spendgate import _core
from spendgate.display import parse_display_unit
from spendgate.policy.usage_report import DAY_MS
from spendgate.server import usage_view

UNITS = parse_display_unit("units")


def test_the_daily_chart_draws_a_bar_per_day_and_the_quota_line() -> None:
    days = [("2026-11-29", 1_000, False), ("2026-11-30", 0, False), ("2026-12-01", 4_500, True)]
    svg = usage_view.daily_chart_svg(days, UNITS, quota_per_day=2_000)
    assert svg.startswith("<svg") and svg.count('<g class="day">') == 3
    assert "<title>2026-12-01: 4,500 units</title>" in svg and ">12-01</text>" in svg
    assert 'aria-label="Daily usage, peak 4,500 units"' in svg
    quota = re.search(r'<line class="quota" x1="[\d.]+" y1="([\d.]+)"', svg)
    tallest = re.findall(r'<rect x="[\d.]+" y="([\d.]+)"', svg)
    assert quota is not None and float(tallest[2]) < float(quota.group(1))  # 4,500 is drawn above the 2,000 line
    assert svg.count(usage_view.PREVIOUS_FILL) == 2 and svg.count(usage_view.CURRENT_FILL) == 1
    assert "No usage recorded yet" in usage_view.daily_chart_svg([], UNITS)


def test_the_dashboard_of_an_org_from_the_engine(tmp_path: Path) -> None:
    engine = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    try:
        engine.update_budget("org", limit=10_000, included=4_000)
        engine.update_budget("a", limit=10_000, parent_id="org")
        engine.update_budget("b", limit=10_000, parent_id="org")
        for member, action, amount in (("a", "report", 1_500), ("b", "chat", 500), ("a", "chat", 1_000)):
            hold = engine.reserve(member, amount, dimensions={"action": action})
            engine.wait_durable(engine.commit(hold.reservation_id, amount).ticket)
        engine.wait_durable(engine.update_budget("org", stop_at=6_000).ticket)
        now_ms = time.time_ns() // 1_000_000
        board = usage_view.dashboard_for(engine, "org", now_ms=now_ms)
        assert (board.used, board.included, board.limit, board.stop_at, board.enforced) == (
            3_000,
            4_000,
            10_000,
            6_000,
            6_000,
        )
        assert len(board.days) == usage_view.CHART_DAYS and board.days[-1][2]
        # All of it on the day of the commits (today, or yesterday if midnight passed since).
        assert [units for _, units, _ in board.days[-2:] if units] == [3_000]
        assert ("action", "chat", 1_500) in board.by_dimension and ("member", "a", 2_500) in board.by_dimension
        html = usage_view.dashboard_sections(board, UNITS) + usage_view.limit_section(board, UNITS)
        text = " ".join(re.sub(r"<[^>]+>", " ", html).split())
        assert "3,000 units" in text and "of 4,000 units included · 75.0 %" in text
        assert "Top actions Action Used Share" in text and "By member Member Used Share a 2,500 units 83.3 %" in text
        assert "Your own stop-at 6,000 units" in text and "Usage stops at 6,000 units" in text
        # The limit date at this period's rate: linear, and only when it falls inside the period.
        reached = board.limit_reached_ms
        if reached is not None:
            assert now_ms <= reached < board.period_end_ms
        elapsed = now_ms - board.period_start_ms
        assert (
            usage_view._reached_at(
                3_000, 6_000, board.period_start_ms, board.period_start_ms + 10 * elapsed, now_ms, 3_000
            )
            == now_ms + elapsed
        )
        assert usage_view._reached_at(6_000, 6_000, 0, DAY_MS, now_ms, 6_000) == now_ms
    finally:
        engine.close()


def test_the_limit_section_shows_the_prepaid_credits_in_the_limit_and_what_is_unused(tmp_path: Path) -> None:
    engine = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    try:
        engine.update_budget("cus_prepaid", limit=1_000)
        engine.wait_durable(engine.grant_credits("cus_prepaid", 500, "pack-1", "credit pack").ticket)
        hold = engine.reserve("cus_prepaid", 1_200)
        engine.wait_durable(engine.commit(hold.reservation_id, 1_200).ticket)  # the 1,000, then 200 of the credits
        board = usage_view.dashboard_for(engine, "cus_prepaid", now_ms=time.time_ns() // 1_000_000)
        assert (board.limit, board.credits, board.enforced, board.used) == (1_500, 500, 1_500, 1_200)
        text = " ".join(re.sub(r"<[^>]+>", " ", usage_view.limit_section(board, UNITS)).split())
        assert "Limit set by your provider 1,500 units Prepaid credits in it 300 units unused of 500 units" in text
        assert "Left before it stops 300 units" in text
        engine.update_budget("cus_plain", limit=1_000)
        plain = usage_view.limit_section(usage_view.dashboard_for(engine, "cus_plain", now_ms=0), UNITS)
        assert "Prepaid credits" not in plain
    finally:
        engine.close()
