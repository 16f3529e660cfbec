"""The outbox alarm: one WARNING at 80 %, one ERROR at the bound, one WARNING on recovery."""

from __future__ import annotations

import logging

import pytest

from spendgate.settle.monitor import Level, OutboxMonitor


def stats(depth: int, bound: int = 100) -> dict[str, int | None]:
    return {"depth": depth, "oldest_ts_ms": None, "dead_letters": 0, "max_entries": bound}


def test_the_alarm_logs_once_per_crossing(caplog: pytest.LogCaptureFixture) -> None:
    monitor = OutboxMonitor(settling=True)
    caplog.set_level(logging.DEBUG, logger="spendgate.settle")
    depths = [10, 79, 80, 85, 99, 100, 120, 100, 90, 79, 76, 74, 50, 80]
    levels = [monitor.check(stats(d)) for d in depths]  # type: ignore[arg-type]
    assert levels == [
        Level.OK,
        Level.OK,
        Level.HIGH,
        Level.HIGH,
        Level.HIGH,
        Level.FULL,
        Level.FULL,
        Level.FULL,
        Level.HIGH,
        Level.HIGH,
        Level.HIGH,
        Level.OK,
        Level.OK,
        Level.HIGH,
    ]
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in records] == ["WARNING", "ERROR", "WARNING", "WARNING", "WARNING"]
    assert "ALARM" in records[0][1] and "80 of 100" in records[0][1]
    assert "full" in records[1][1] and "Reserves are refused" in records[1][1]
    assert "recovered" in records[3][1]


def test_without_settlement_the_alarm_says_why_the_outbox_grows(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="spendgate.settle")
    OutboxMonitor(settling=False).check(stats(90))  # type: ignore[arg-type]
    assert "settlement is off (no STRIPE_API_KEY)" in caplog.records[0].getMessage()
