"""The display_unit setting: how amounts of units read, and how typed amounts become units again."""

from __future__ import annotations

import pytest

from spendgate.display import parse_display_unit


def test_micro_dollars_show_as_dollars_and_cents_rounded_half_up() -> None:
    unit = parse_display_unit("usd_micros")
    assert unit.format(12_345_678) == "$12.35"
    assert unit.format(5_000) == "$0.01" and unit.format(4_999) == "$0.00"
    assert unit.format(1_234_567_000_000) == "$1,234,567.00"
    assert unit.parse("$25") == 25_000_000 and unit.parse(" 1,000.50 ") == 1_000_500_000
    assert unit.parse("0.000001") == 1 and unit.to_input(10_500_000) == "10.5"


def test_cents_and_other_currencies() -> None:
    assert parse_display_unit("eur_cents").format(40) == "€0.40"
    assert parse_display_unit("chf_cents").format(300) == "CHF 3.00"
    with pytest.raises(ValueError, match="finer than the smallest amount"):
        parse_display_unit("usd_cents").parse("1.005")


def test_a_named_unit_with_a_scale() -> None:
    credits = parse_display_unit("credits/1000")
    assert credits.format(12_500) == "12.5 credits" and credits.format(3_000) == "3 credits"
    assert credits.parse("2.5 credits") == 2_500 and credits.input_step == "0.001"
    tokens = parse_display_unit("tokens")
    assert tokens.format(1_234) == "1,234 tokens" and tokens.parse("1234") == 1_234
    assert parse_display_unit("units").format(1_234_567) == "1,234,567 units"


@pytest.mark.parametrize("text", ["abc", "-5", "NaN", "Infinity", "1e400x", "9" * 50])
def test_what_is_not_an_amount_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError):
        parse_display_unit("usd_micros").parse(text)


@pytest.mark.parametrize("spec", ["", "usd_millis", "credits/7", "credits/0", "a" * 40, "9lives", "x/1000000000000000"])
def test_a_bad_setting_lists_what_is_accepted(spec: str) -> None:
    with pytest.raises(ValueError, match="expected `units`"):
        parse_display_unit(spec)
