"""The price arithmetic, rule by rule, with the exact numbers each rule gives.

The tables here are built in code, so that the numbers do not move when the bundled prices do. The model "m" has
Anthropic-shaped rates: input $3.00, cached input $0.30, cache write $3.75, output $15.00 per million tokens, and
reasoning at the output rate. 1 budget unit = 1 micro-USD unless the table converts to credits.
"""

from __future__ import annotations

import datetime
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate import _core
from spendgate.policy import prices
from spendgate.policy.prices import (
    FALLBACK_MODEL,
    MAX_AMOUNT_UNITS,
    MAX_MARKUP_BASIS_POINTS,
    MAX_PRICE_MICRO_USD_PER_MTOK,
    MAX_TOKENS_PER_TYPE,
    TOKEN_TYPES,
    ModelPrice,
    PriceError,
    PriceTable,
    Rates,
    TokenUsage,
    UnknownModelError,
)

AS_OF = datetime.date(2026, 11, 18)


def rates(input: int, cached_input: int, cache_write: int, output: int, reasoning: int | None = None) -> Rates:
    return Rates(input, cached_input, cache_write, output, output if reasoning is None else reasoning)


M_RATES = rates(3_000_000, 300_000, 3_750_000, 15_000_000)


def table(*models: ModelPrice, **settings_: object) -> PriceTable:
    return PriceTable(as_of=AS_OF, models={m.model: m for m in models}, **settings_)  # type: ignore[arg-type]


M = table(ModelPrice("m", M_RATES))


def usage(**counts: int) -> TokenUsage:
    return TokenUsage("m", **counts)


def test_a_plain_call_costs_each_token_at_its_rate_in_micro_usd() -> None:
    # 1,000 x $3 / MTok = 3,000 micro-USD; 500 x $15 / MTok = 7,500.
    charge = M.charge(usage(input_tokens=1_000, output_tokens=500))
    assert charge.units == 10_500
    assert charge.units_of("input") == 3_000 and charge.units_of("output") == 7_500
    assert charge.model == "m" and not charge.fallback and not charge.cache_hit


def test_cached_input_is_billed_at_the_cached_rate_not_the_input_rate() -> None:
    # LiteLLM #26807 billed cached tokens at the full input rate: 10,000 x $3 + 7,500 = 37,500.
    charge = M.charge(usage(input_tokens=1_000, cached_input_tokens=9_000, output_tokens=500))
    assert charge.units_of("cached_input") == 2_700  # 9,000 x $0.30 / MTok
    assert charge.units == 3_000 + 2_700 + 7_500 == 13_200


def test_cache_writes_are_billed_at_the_cache_write_rate() -> None:
    charge = M.charge(usage(input_tokens=1_000, cache_write_tokens=4_000, output_tokens=500))
    assert charge.units_of("cache_write") == 15_000  # 4,000 x $3.75 / MTok
    assert charge.units == 25_500


def test_reasoning_tokens_are_billed_at_the_reasoning_rate() -> None:
    thinking = table(ModelPrice("m", rates(3_000_000, 300_000, 3_750_000, 15_000_000, reasoning=20_000_000)))
    charge = thinking.charge(usage(output_tokens=500, reasoning_tokens=1_500))
    assert charge.units_of("output") == 7_500
    assert charge.units_of("reasoning") == 30_000  # 1,500 x $20 / MTok
    assert charge.units == 37_500
    # At the default (reasoning = output) the same tokens cost the output rate.
    assert M.charge(usage(output_tokens=500, reasoning_tokens=1_500)).units == 30_000


def test_an_integer_markup_multiplies_the_cost() -> None:
    marked = table(ModelPrice("m", M_RATES), markup_basis_points=1_000)  # 10 %
    assert marked.charge(usage(input_tokens=1_000, output_tokens=500)).units == 11_550


def test_a_decimal_markup_is_exact_and_the_result_rounds_up() -> None:
    marked = table(ModelPrice("m", M_RATES), markup_basis_points=1_250)  # 12.5 %
    # 10,500 x 1.125 = 11,812.5 -> 11,813
    assert marked.charge(usage(input_tokens=1_000, output_tokens=500)).units == 11_813


def test_credits_divide_the_cost_and_round_up_once() -> None:
    credits = table(ModelPrice("m", M_RATES), micro_usd_per_credit=1_000)  # 1 credit = $0.001
    assert credits.unit_name == "credit" and M.unit_name == "micro_usd"
    assert credits.charge(usage(input_tokens=1_000, output_tokens=500)).units == 11  # 10.5 credits
    with_markup = table(ModelPrice("m", M_RATES), micro_usd_per_credit=1_000, markup_basis_points=1_250)
    assert with_markup.charge(usage(input_tokens=1_000, output_tokens=500)).units == 12  # 11.8125 credits
    assert with_markup.estimate("m", 1_000, 500).units == 13  # 11,250 x 1.125 = 12,656.25 micro-USD


def test_a_call_worth_a_fraction_of_a_unit_costs_one() -> None:
    tiny = table(ModelPrice("t", rates(300_000, 0, 0, 300_000)))  # $0.30 / MTok
    assert tiny.charge(TokenUsage("t", input_tokens=1)).units == 1  # 0.3 micro-USD
    assert tiny.charge(TokenUsage("t")).units == 0  # nothing used, nothing charged


def test_rounding_is_once_per_call_not_per_token_type() -> None:
    tiny = table(ModelPrice("t", rates(300_000, 0, 0, 300_000)))
    charge = tiny.charge(TokenUsage("t", input_tokens=1, output_tokens=1))
    assert charge.units == 1  # 0.6 -> 1; rounding each type up would give 2
    assert charge.units_of("input") == 1 and charge.units_of("output") == 0  # the tie goes to the first type


def test_the_breakdown_gives_the_remainder_to_the_largest_fractions() -> None:
    odd = table(ModelPrice("o", rates(700_000, 200_000, 0, 600_000)))
    charge = odd.charge(TokenUsage("o", input_tokens=1, cached_input_tokens=1, output_tokens=1))
    assert charge.units == 2  # 0.7 + 0.2 + 0.6 = 1.5
    assert [line.units for line in charge.breakdown] == [1, 0, 0, 1, 0]
    assert [line.tokens for line in charge.breakdown] == [1, 1, 0, 1, 0]
    assert [line.token_type for line in charge.breakdown] == list(TOKEN_TYPES)


def test_a_cache_hit_costs_nothing_whatever_the_counts() -> None:
    charge = M.charge(usage(input_tokens=100_000, cached_input_tokens=5_000, output_tokens=4_000, cache_hit=True))
    assert charge.units == 0 and charge.cache_hit
    assert [line.units for line in charge.breakdown] == [0, 0, 0, 0, 0]
    assert charge.breakdown[0].tokens == 100_000  # the counts are kept for the record


def test_the_estimate_prices_every_token_at_the_highest_rate_of_its_side() -> None:
    # Input side: max($3, $0.30, $3.75) = $3.75; output side: max($15, $15).
    estimate = M.estimate("m", input_tokens=1_000, max_output_tokens=500)
    assert estimate.units == 3_750 + 7_500 == 11_250
    assert (estimate.model, estimate.requested_model, estimate.fallback) == ("m", "m", False)
    thinking = table(ModelPrice("m", rates(3_000_000, 300_000, 3_750_000, 15_000_000, reasoning=20_000_000)))
    assert thinking.estimate("m", 1_000, 500).units == 3_750 + 10_000


def test_the_estimate_covers_the_most_expensive_usage_that_fits_in_it() -> None:
    estimate = M.estimate("m", input_tokens=1_000, max_output_tokens=500)
    worst = M.charge(usage(cache_write_tokens=1_000, output_tokens=500))
    assert worst.units == estimate.units


def test_an_unknown_model_is_denied_with_what_to_do() -> None:
    with pytest.raises(UnknownModelError) as denied:
        M.estimate("gpt-9", 10, 10)
    message = str(denied.value)
    assert "no price for model 'gpt-9'" in message
    assert 'Add [models."gpt-9"]' in message and "[aliases]" in message
    assert "fallback price in [unknown_model]" in message
    with pytest.raises(UnknownModelError):
        M.charge(TokenUsage("gpt-9", input_tokens=1))


def test_an_unknown_model_is_priced_at_the_fallback_when_one_is_set() -> None:
    fallback = ModelPrice(FALLBACK_MODEL, rates(10_000_000, 10_000_000, 10_000_000, 30_000_000))
    lenient = table(ModelPrice("m", M_RATES), unknown_model=fallback)
    estimate = lenient.estimate("gpt-9", 1_000, 100)
    assert (estimate.units, estimate.fallback, estimate.model) == (13_000, True, FALLBACK_MODEL)
    charge = lenient.charge(TokenUsage("gpt-9", input_tokens=1_000, output_tokens=100))
    assert (charge.units, charge.fallback, charge.requested_model) == (13_000, True, "gpt-9")
    assert not lenient.charge(usage(input_tokens=1_000)).fallback  # known models keep their price


def test_aliases_and_provider_prefixes_resolve_to_the_priced_model() -> None:
    aliased = table(ModelPrice("gpt-6-sol", M_RATES), aliases={"gpt-6-sol-2026-09-22": "gpt-6-sol"})
    assert aliased.resolve_model("gpt-6-sol") == "gpt-6-sol"
    assert aliased.resolve_model("gpt-6-sol-2026-09-22") == "gpt-6-sol"
    assert aliased.resolve_model("openai/gpt-6-sol") == "gpt-6-sol"
    assert aliased.resolve_model("openai/gpt-6-sol-2026-09-22") == "gpt-6-sol"
    assert aliased.resolve_model("models/gpt-6-sol") == "gpt-6-sol"
    assert aliased.estimate("openai/gpt-6-sol-2026-09-22", 1_000, 500).model == "gpt-6-sol"


def test_lookup_never_guesses() -> None:
    sol = table(ModelPrice("gpt-6-sol", M_RATES))
    near_misses = ("GPT-6-SOL", "gpt-6-sol-fast", "gpt-6", "azure/gpt-6-sol", "openai/openai/gpt-6-sol", " gpt-6-sol")
    for near_miss in near_misses:
        assert sol.resolve_model(near_miss) is None, near_miss
    with pytest.raises(UnknownModelError) as denied:
        sol.estimate("gpt-6-sol-2026-09-22", 1, 1)  # a dated id is not stripped, but the message says how to alias it
    assert 'add "gpt-6-sol-2026-09-22" = "gpt-6-sol" to [aliases]' in str(denied.value)


LONG = ModelPrice(
    "l",
    rates(2_000_000, 200_000, 2_500_000, 10_000_000),
    long_context_above_prompt_tokens=272_000,
    long_context_rates=rates(4_000_000, 400_000, 5_000_000, 15_000_000),
)


def test_long_context_rates_apply_to_the_whole_call_above_the_threshold() -> None:
    long_table = table(LONG)
    at = long_table.charge(TokenUsage("l", input_tokens=72_000, cached_input_tokens=200_000, output_tokens=1_000))
    assert at.units == 144_000 + 40_000 + 10_000  # 272,000 prompt tokens: the base rates
    above = long_table.charge(TokenUsage("l", input_tokens=72_001, cached_input_tokens=200_000, output_tokens=1_000))
    assert above.units == 288_004 + 80_000 + 15_000  # one more: every token at the long rates, output too
    assert long_table.estimate("l", 272_000, 1_000).units == 680_000 + 10_000
    assert long_table.estimate("l", 272_001, 1_000).units == 1_360_005 + 15_000


def test_counts_out_of_bounds_are_refused() -> None:
    with pytest.raises(PriceError, match="input_tokens: expected 0..=1_000_000_000 tokens"):
        usage(input_tokens=MAX_TOKENS_PER_TYPE + 1)
    with pytest.raises(PriceError, match="a token count is an int"):
        usage(output_tokens=True)
    with pytest.raises(PriceError, match="expected 0..="):
        usage(cached_input_tokens=-1)
    with pytest.raises(PriceError, match="max_output_tokens"):
        M.estimate("m", 1, -5)
    with pytest.raises(PriceError, match="over 128 bytes"):
        M.estimate("x" * 129, 1, 1)


def test_the_bounds_keep_every_call_within_the_engines_amount_limit() -> None:
    assert MAX_AMOUNT_UNITS == _core.MAX_AMOUNT_UNITS
    top = rates(*[MAX_PRICE_MICRO_USD_PER_MTOK] * 5)
    dearest = table(ModelPrice("x", top), markup_basis_points=MAX_MARKUP_BASIS_POINTS)
    worst = dearest.charge(TokenUsage("x", **{f"{t}_tokens": MAX_TOKENS_PER_TYPE for t in TOKEN_TYPES}))
    assert worst.units == 550_000_000_000_000 <= MAX_AMOUNT_UNITS
    assert dearest.estimate("x", MAX_TOKENS_PER_TYPE, MAX_TOKENS_PER_TYPE).units <= MAX_AMOUNT_UNITS
    assert prices._worst_call_units() == worst.units


# A property: for any prices, markup, conversion and usage within an estimate, the charge never exceeds the estimate,
# and its breakdown sums to its total with each type within one unit of its exact share.
token_counts = st.integers(0, MAX_TOKENS_PER_TYPE)
price_values = st.integers(0, MAX_PRICE_MICRO_USD_PER_MTOK)


@st.composite
def model_prices(draw: st.DrawFn) -> ModelPrice:
    base = Rates(*(draw(price_values) for _ in TOKEN_TYPES))
    if not draw(st.booleans()):
        return ModelPrice("p", base)
    raise_by = [draw(st.integers(0, MAX_PRICE_MICRO_USD_PER_MTOK - base.micro_usd_per_mtok(t))) for t in TOKEN_TYPES]
    long = Rates(*(base.micro_usd_per_mtok(t) + d for t, d in zip(TOKEN_TYPES, raise_by, strict=True)))
    return ModelPrice("p", base, draw(st.integers(1, MAX_TOKENS_PER_TYPE)), long)


@st.composite
def usages_within(draw: st.DrawFn, input_tokens: int, max_output_tokens: int) -> TokenUsage:
    cached = draw(st.integers(0, input_tokens))
    cache_write = draw(st.integers(0, input_tokens - cached))
    fresh = draw(st.integers(0, input_tokens - cached - cache_write))
    reasoning = draw(st.integers(0, max_output_tokens))
    output = draw(st.integers(0, max_output_tokens - reasoning))
    return TokenUsage("p", fresh, cached, cache_write, output, reasoning)


@settings(max_examples=400, deadline=None)
@given(
    price=model_prices(),
    markup=st.integers(0, MAX_MARKUP_BASIS_POINTS),
    credit=st.one_of(st.none(), st.integers(1, 10**6)),
    input_tokens=token_counts,
    max_output_tokens=token_counts,
    data=st.data(),
)
def test_no_charge_within_an_estimate_exceeds_it(
    price: ModelPrice, markup: int, credit: int | None, input_tokens: int, max_output_tokens: int, data: st.DataObject
) -> None:
    priced = table(price, markup_basis_points=markup, micro_usd_per_credit=credit)
    estimate = priced.estimate("p", input_tokens, max_output_tokens)
    used = data.draw(usages_within(input_tokens, max_output_tokens))
    charge = priced.charge(used)
    assert charge.units <= estimate.units
    assert sum(line.units for line in charge.breakdown) == charge.units
    # The same rules, computed independently with Fractions: the total is the exact cost rounded up once, and each
    # type's share is its exact share rounded down or up.
    rates_used = price.rates_for(used.prompt_tokens)
    per_micro_usd_mtok_token = Fraction(10_000 + markup, 1_000_000 * 10_000 * (credit or 1))
    exact = {t: used.tokens(t) * rates_used.micro_usd_per_mtok(t) * per_micro_usd_mtok_token for t in TOKEN_TYPES}
    assert charge.units == math.ceil(sum(exact.values()))
    for line in charge.breakdown:
        assert line.units in (math.floor(exact[line.token_type]), math.ceil(exact[line.token_type])), line
