"""The outbox alarm: the outbox is bounded (max_outbox_entries; at the bound new Reserves fail), so say so early.

One WARNING when the depth crosses 80 % of the bound, one ERROR when it reaches the bound, and one WARNING when it is
back under 75 % (the 5 points of hysteresis keep a depth hovering at 80 % from logging on every check).
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # a TypedDict of the stub only
    from spendgate._core import OutboxStats

log = logging.getLogger("spendgate.settle")

HIGH_FRACTION: Final[float] = 0.80
RECOVERED_FRACTION: Final[float] = 0.75


class Level(enum.IntEnum):
    OK = 0
    HIGH = 1
    FULL = 2


class OutboxMonitor:
    def __init__(self, settling: bool) -> None:
        self.level = Level.OK
        self._settling = settling

    def check(self, stats: OutboxStats) -> Level:
        depth, bound = stats["depth"], stats["max_entries"]
        if depth >= bound:
            level = Level.FULL
        elif depth >= HIGH_FRACTION * bound:
            level = Level.HIGH
        elif depth < RECOVERED_FRACTION * bound:
            level = Level.OK
        else:
            level = self.level if self.level != Level.FULL else Level.HIGH  # inside the hysteresis band
        if level != self.level:
            self._log(level, depth, bound)
            self.level = level
        return level

    def _log(self, level: Level, depth: int, bound: int) -> None:
        why = (
            "Stripe is not taking events fast enough (see `spendgate settle status`)"
            if self._settling
            else "settlement is off (no STRIPE_API_KEY)"
        )
        if level == Level.FULL:
            log.error(
                "ALARM: the settlement outbox is full: %d of %d entries (max_outbox_entries); new Reserves are refused "
                "until it drains (commits still go in); %s",
                depth,
                bound,
                why,
            )
        elif level == Level.HIGH:
            log.warning(
                "ALARM: the settlement outbox is at %d of %d entries (>= %d%% of max_outbox_entries); at the bound new "
                "Reserves are refused; %s",
                depth,
                bound,
                round(HIGH_FRACTION * 100),
                why,
            )
        else:
            log.warning(
                "the settlement outbox recovered: %d of %d entries (< %d%% of max_outbox_entries)",
                depth,
                bound,
                round(RECOVERED_FRACTION * 100),
            )
