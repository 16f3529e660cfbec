"""Metering: estimates and charges in budget units, with the usage detail the engine keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from spendgate.policy.metering import Meter, fingerprint
from spendgate.policy.price_book import PriceBook
from spendgate.policy.prices import PriceError, TokenUsage, UnknownModelError

PRICES = """
as_of = 2026-11-01
use_bundled = false

[unknown_model]
policy = "fallback"
input = 1_000_000
cached_input = "input"
cache_write = "input"
output = 2_000_000

[models."m"]
input = 3_000_000
cached_input = 300_000
cache_write = 3_750_000
output = 15_000_000
"""


@pytest.fixture
def meter(tmp_path: Path) -> Meter:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return Meter(PriceBook(path))


def test_a_charge_s_parts_sum_to_its_units_and_skip_unused_types(meter: Meter) -> None:
    units, detail = meter.charge(
        TokenUsage(model="m", input_tokens=1_000, cached_input_tokens=1_000, output_tokens=100)
    )
    assert units == 3_000 + 300 + 1_500
    assert detail == {
        "model": "m",
        "parts": [("input", 1_000, 3_000), ("cached_input", 1_000, 300), ("output", 100, 1_500)],
        "cache_hit": False,
        "fallback": False,
    }


def test_a_cache_hit_records_no_tokens(meter: Meter) -> None:
    assert meter.charge(TokenUsage(model="m", input_tokens=5, cache_hit=True)) == (
        0,
        {"model": "m", "parts": [], "cache_hit": True, "fallback": False},
    )


def test_a_fallback_price_keeps_the_model_s_own_name(meter: Meter) -> None:
    units, detail = meter.charge(TokenUsage(model="brand-new", input_tokens=1_000))
    assert (units, detail["model"], detail["fallback"]) == (1_000, "brand-new", True)


def test_an_estimate_of_nothing_is_bad_input(meter: Meter) -> None:
    with pytest.raises(PriceError, match="0 units"):
        meter.estimate("m", 0, 0)
    assert meter.estimate("m", 1_000, 0).units == 3_750


def test_the_fingerprint_names_the_call_not_its_price() -> None:
    assert fingerprint("m", 10, 20) == "m|10|20"


def test_deny_policy_raises_unknown_model(tmp_path: Path) -> None:
    path = tmp_path / "deny.toml"
    path.write_text(
        PRICES.replace('policy = "fallback"', 'policy = "deny"').split("input = 1_000_000")[0]
        + PRICES.split("output = 2_000_000")[1]
    )
    with pytest.raises(UnknownModelError):
        Meter(PriceBook(path)).estimate("other", 1, 1)
