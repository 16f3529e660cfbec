"""How the pages show an amount of budget units to people: the `display_unit` setting.

    unit = parse_display_unit("usd_micros")        # ValueError saying what is accepted
    unit.format(12_345_678)                        # '$12.35'
    unit.parse("$25")                              # 25_000_000 (ValueError for text that is no amount of this unit)

The engine counts integer units; what a unit is depends on how the operator priced things. The setting says:
- `units` (the default): the integers themselves, "1,234 units";
- `<currency>_micros` or `<currency>_cents` (a three-letter ISO code: usd, eur, gbp, ...): units are millionths or
  hundredths of that currency, shown with two decimals, rounded half up to the cent: "$12.35", "€0.40", "CHF 3.00";
- `NAME` or `NAME/SCALE`: SCALE units (a power of ten, default 1) make one NAME, shown after the number with as many
  decimals as the scale needs: `credits/1000` shows 12,500 units as "12.5 credits".

Stdlib only: the settings (spendgate.config) check the setting with it.
"""

from __future__ import annotations

import dataclasses
import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Final

DEFAULT_DISPLAY_UNIT: Final[str] = "units"
CURRENCY_SYMBOLS: Final[dict[str, str]] = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥", "inr": "₹"}
CURRENCY_SCALES: Final[dict[str, int]] = {"micros": 1_000_000, "cents": 100}
# The largest SCALE of NAME/SCALE (10**12: a trillion units make one NAME).
MAX_SCALE_DIGITS: Final[int] = 12
MAX_NAME_CHARS: Final[int] = 24
# Longest amount text parse() looks at (a form field).
MAX_AMOUNT_CHARS: Final[int] = 40
_CURRENCY: Final[re.Pattern[str]] = re.compile(r"^([a-z]{3})_(micros|cents)$")
_NAMED: Final[re.Pattern[str]] = re.compile(
    rf"^([A-Za-z][A-Za-z0-9 -]{{0,{MAX_NAME_CHARS - 1}}})(?:/(1(?:0{{0,{MAX_SCALE_DIGITS}}})))?$"
)
ACCEPTED: Final[str] = (
    "`units`, `<currency>_micros` or `<currency>_cents` (such as `usd_micros`), or `NAME` or `NAME/SCALE` with "
    "SCALE a power of ten (such as `credits/1000`)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class DisplayUnit:
    """prefix + number + suffix; `scale` units make one displayed 1; `decimals` shown (money: always 2)."""

    prefix: str
    suffix: str
    scale: int
    decimals: int
    money: bool

    def format(self, units: int) -> str:
        """An amount of units as people read it, with thousands separators."""
        value = Decimal(units) / self.scale
        if self.money:
            text = f"{value.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,.2f}"
        else:
            text = f"{value:,.{self.decimals}f}"
            if "." in text:
                text = text.rstrip("0").rstrip(".")
        sign = ""
        if text.startswith("-"):
            sign, text = "-", text[1:]
        return f"{sign}{self.prefix}{text}{self.suffix}"

    @property
    def input_step(self) -> str:
        """The step of an <input type=number> for this unit (the smallest amount it can hold)."""
        return "1" if self.decimals == 0 else "0." + "0" * (self.decimals - 1) + "1"

    @property
    def name(self) -> str:
        """What one displayed amount is called, for labels ("$", "credits", "units")."""
        return (self.prefix or self.suffix).strip()

    def to_input(self, units: int) -> str:
        """An amount as the plain number a form field holds (no separators or symbols)."""
        value = Decimal(units) / self.scale
        text = f"{value:.{self.decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text

    def parse(self, text: str) -> int:
        """The units of an amount typed in this unit ("25", "$25.50", "1,000 credits"). Raises ValueError saying
        what was wrong: not a number, negative, or finer than one unit."""
        cleaned = text.strip()[: MAX_AMOUNT_CHARS + 1]
        if len(cleaned) > MAX_AMOUNT_CHARS:
            raise ValueError(f"an amount is at most {MAX_AMOUNT_CHARS} characters")
        for part in (self.prefix.strip(), self.suffix.strip()):
            if part and part in cleaned:
                cleaned = cleaned.replace(part, "")
        cleaned = cleaned.replace(",", "").replace(" ", "")
        try:
            value = Decimal(cleaned)
        except InvalidOperation:
            raise ValueError(
                f"{text.strip()[:MAX_AMOUNT_CHARS]!r} is not a number: type an amount such as "
                f"{self.to_input(self.scale * 25)}"
            ) from None
        if not value.is_finite() or value < 0:
            raise ValueError(f"{text.strip()[:MAX_AMOUNT_CHARS]!r} is not a positive amount")
        units = value * self.scale
        if units != units.to_integral_value():
            raise ValueError(f"{text.strip()[:MAX_AMOUNT_CHARS]!r} is finer than the smallest amount, {self.format(1)}")
        return int(units)


def parse_display_unit(text: str) -> DisplayUnit:
    """The DisplayUnit a `display_unit` setting names. Raises ValueError listing what is accepted."""
    spec = text.strip()
    if spec == DEFAULT_DISPLAY_UNIT:
        return DisplayUnit(prefix="", suffix=" units", scale=1, decimals=0, money=False)
    currency = _CURRENCY.match(spec.lower())
    if currency:
        code, fraction = currency.groups()
        symbol = CURRENCY_SYMBOLS.get(code, code.upper() + " ")
        return DisplayUnit(prefix=symbol, suffix="", scale=CURRENCY_SCALES[fraction], decimals=2, money=True)
    named = _NAMED.match(spec)
    if named:
        name, scale_text = named.groups()
        scale = int(scale_text or "1")
        return DisplayUnit(prefix="", suffix=" " + name.strip(), scale=scale, decimals=len(str(scale)) - 1, money=False)
    raise ValueError(f"expected {ACCEPTED}, got {text!r}")
