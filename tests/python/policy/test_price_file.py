"""The price file: the bundled default, a user's file over it, and errors that name the file and the line."""

from __future__ import annotations

import datetime
import textwrap
from pathlib import Path

import pytest

from spendgate.policy.price_file import BUNDLED_SOURCE, merge_layers, parse_layer
from spendgate.policy.prices import (
    FALLBACK_MODEL,
    PriceTable,
    PriceTableError,
    TokenUsage,
    UnknownModelError,
    load_price_table,
)

# A minimal model in the file's units (micro-USD per MTok): $3 input, $0.30 cached, $3.75 cache write, $15 output.
MODEL_M = """
[models."m"]
input = 3_000_000
cached_input = 300_000
cache_write = 3_750_000
output = 15_000_000
"""


def write(tmp_path: Path, text: str, name: str = "prices.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(tmp_path: Path, text: str) -> PriceTable:
    return load_price_table(write(tmp_path, text))


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(PriceTableError) as failed:
        load(tmp_path, text)
    return str(failed.value)


def test_the_bundled_table_is_dated_and_covers_three_providers_tiers() -> None:
    bundled = load_price_table(None)
    assert bundled.as_of == datetime.date(2026, 11, 18)
    assert bundled.sources == (BUNDLED_SOURCE,)
    assert bundled.markup_basis_points == 0 and bundled.micro_usd_per_credit is None and bundled.unknown_model is None
    assert len(bundled.models) >= 12
    expected = {
        "gpt-6-astra", "gpt-6.2-sol", "gpt-6-sol", "gpt-6-luna",
        "claude-fable-5-1", "claude-opus-5-5", "claude-opus-5", "claude-sonnet-5", "claude-haiku-5-5",
        "gemini-3.1-pro-preview", "gemini-3.8-flash", "gemini-3.5-flash", "gemini-2.5-flash-lite",
    }  # fmt: skip
    assert expected <= set(bundled.models)
    for price in bundled.models.values():
        rates = price.rates
        # Every provider bills reasoning as output, and a cache read is never dearer than a plain input token.
        assert rates.reasoning_micro_usd_per_mtok == rates.output_micro_usd_per_mtok, price.model
        assert rates.cached_input_micro_usd_per_mtok < rates.input_micro_usd_per_mtok, price.model


def test_bundled_prices_pin_a_call_per_provider() -> None:
    bundled = load_price_table(None)
    # GPT-6 Sol: 86 x $2 + 1,920 cached x $0.20 + 108 x $10 + 192 reasoning x $10 (micro-USD).
    sol = TokenUsage("gpt-6-sol", input_tokens=86, cached_input_tokens=1_920, output_tokens=108, reasoning_tokens=192)
    assert bundled.charge(sol).units == 172 + 384 + 1_080 + 1_920
    # Claude Opus 5.5: 21 x $4 + 188,086 cache writes x $5 + 393 x $20.
    opus = TokenUsage("claude-opus-5-5", input_tokens=21, cache_write_tokens=188_086, output_tokens=393)
    assert bundled.charge(opus).units == 84 + 940_430 + 7_860
    # Gemini 3.1 Pro above 200k prompt tokens: every token at the long rates ($4 input, $0.40 cached, $18 output).
    pro = TokenUsage("gemini-3.1-pro-preview", input_tokens=1_000, cached_input_tokens=200_000, output_tokens=2_000)
    assert bundled.charge(pro).units == 4_000 + 80_000 + 36_000
    # Haiku 5.5 below its 100,000-token threshold: $0.10 input, $0.50 output.
    haiku = TokenUsage("claude-haiku-5-5", input_tokens=10_000, output_tokens=1_000)
    assert bundled.charge(haiku).units == 1_000 + 500


def test_the_bundled_table_denies_unknown_models() -> None:
    with pytest.raises(UnknownModelError, match="'gpt-4-turbo'"):
        load_price_table(None).estimate("gpt-4-turbo", 100, 100)


def test_a_users_file_overrides_a_bundled_model_whole_and_the_table_settings(tmp_path: Path) -> None:
    user = load(
        tmp_path,
        """
        markup_percent = "12.5"
        micro_usd_per_credit = 1_000

        [models."gpt-6-sol"]            # a negotiated price: replaces the bundled entry, long context included
        input = 1_000_000
        cached_input = "input"
        cache_write = "input"
        output = 5_000_000
        """,
    )
    sol = user.models["gpt-6-sol"]
    assert sol.rates.cached_input_micro_usd_per_mtok == 1_000_000 and sol.long_context_rates is None
    assert user.models["gpt-6-luna"] == load_price_table(None).models["gpt-6-luna"]  # the rest stays bundled
    assert (user.markup_basis_points, user.micro_usd_per_credit) == (1_250, 1_000)
    assert user.as_of == datetime.date(2026, 11, 18)  # from the bundled table
    assert user.sources == (BUNDLED_SOURCE, str(tmp_path / "prices.toml"))
    # 300,000 x $1 + 20,000 x $5 = 400,000 micro-USD, x 1.125 = 450,000, / 1,000 = 450 credits.
    assert user.charge(TokenUsage("gpt-6-sol", input_tokens=300_000, output_tokens=20_000)).units == 450


def test_use_bundled_false_starts_from_the_users_file_alone(tmp_path: Path) -> None:
    alone = load(tmp_path, "as_of = 2026-12-01\nuse_bundled = false\n" + MODEL_M)
    assert set(alone.models) == {"m"} and alone.as_of == datetime.date(2026, 12, 1)
    assert "no as_of" in load_error(tmp_path, "use_bundled = false\n" + MODEL_M)


def test_markup_is_an_integer_or_an_exact_decimal_string(tmp_path: Path) -> None:
    assert load(tmp_path, "markup_percent = 15").markup_basis_points == 1_500
    assert load(tmp_path, 'markup_percent = "12.5"').markup_basis_points == 1_250
    assert load(tmp_path, 'markup_percent = "0.01"').markup_basis_points == 1
    message = load_error(tmp_path, "as_of = 2026-12-01\nmarkup_percent = 12.5")
    assert "line 2" in message and 'write 12.5 as a string ("12.5"): a float is not exact' in message
    assert "decimal string" in load_error(tmp_path, 'markup_percent = "12.555"')
    assert "expected 0..=1000 %" in load_error(tmp_path, "markup_percent = 1001")


def test_reasoning_defaults_to_the_output_price_and_references_name_a_priced_type(tmp_path: Path) -> None:
    m = load(tmp_path, MODEL_M).models["m"]
    assert m.rates.reasoning_micro_usd_per_mtok == 15_000_000
    gemini_like = load(tmp_path, MODEL_M.replace("cache_write = 3_750_000", 'cache_write = "input"')).models["m"]
    assert gemini_like.rates.cache_write_micro_usd_per_mtok == 3_000_000
    chain = MODEL_M.replace("cache_write = 3_750_000", 'cache_write = "cached_input"').replace(
        "cached_input = 300_000", 'cached_input = "input"'
    )
    assert "a reference names another token type priced with a number" in load_error(tmp_path, chain)


def test_a_missing_price_names_the_model_and_its_line(tmp_path: Path) -> None:
    text = "as_of = 2026-12-01\n" + MODEL_M.replace("cached_input = 300_000\n", "")
    message = load_error(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'prices.toml'}, line 3: model 'm': missing price 'cached_input'")
    assert 'or "input" if it is billed at the input rate' in message


def test_unknown_keys_are_errors_not_silent_defaults(tmp_path: Path) -> None:
    message = load_error(tmp_path, "as_of = 2026-12-01\nmarkup_precent = 10\n")
    assert "line 2: unknown setting 'markup_precent'" in message
    message = load_error(tmp_path, MODEL_M.replace("output =", "ouptut ="))
    assert "line 1: model 'm': unknown key 'ouptut'" in message


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    message = load_error(tmp_path, 'as_of = 2026-12-01\n[models."m"\ninput = 1\n')
    assert message.startswith(f"{tmp_path / 'prices.toml'}: not valid TOML:") and "line 2" in message


def test_long_context_rates_are_checked(tmp_path: Path) -> None:
    long_part = """
    [models."m".long_context]
    above_prompt_tokens = 200_000
    input = 6_000_000
    cached_input = 600_000
    cache_write = "input"
    output = 10_000_000
    """
    message = load_error(tmp_path, MODEL_M + textwrap.dedent(long_part))
    assert "line 7: model 'm', long_context: output 10_000_000 is below the base rate 15_000_000" in message
    good = load(tmp_path, MODEL_M + textwrap.dedent(long_part).replace("10_000_000", "22_500_000")).models["m"]
    assert good.long_context_above_prompt_tokens == 200_000
    assert good.rates_for(200_001).cache_write_micro_usd_per_mtok == 6_000_000
    no_threshold = MODEL_M + textwrap.dedent(long_part).replace("above_prompt_tokens = 200_000\n", "")
    assert "missing 'above_prompt_tokens'" in load_error(tmp_path, no_threshold)


def test_aliases_must_point_at_a_model_and_must_not_shadow_one(tmp_path: Path) -> None:
    aliased = load(tmp_path, MODEL_M + '\n[aliases]\n"m-2026-12-01" = "m"\n"openai/x" = "gpt-6-sol"\n')
    assert aliased.resolve_model("m-2026-12-01") == "m" and aliased.resolve_model("openai/x") == "gpt-6-sol"
    message = load_error(tmp_path, MODEL_M + '\n[aliases]\n"m-old" = "n"\n')
    assert "line 8: aliases: 'm-old' points to 'n', which is not a model in the table" in message
    assert "is also a model key" in load_error(tmp_path, MODEL_M + '\n[aliases]\n"m" = "gpt-6-sol"\n')


def test_a_later_files_model_takes_over_an_earlier_files_alias() -> None:
    earlier = parse_layer('as_of = 2026-12-01\n[aliases]\n"m-latest" = "m"\n' + MODEL_M, "earlier.toml")
    later = parse_layer(MODEL_M.replace('"m"', '"m-latest"').replace("3_000_000", "1_000_000"), "later.toml")
    merged = merge_layers([earlier, later])
    assert merged.resolve_model("m-latest") == "m-latest"  # the later file's own price, not the alias to "m"
    assert merged.models["m-latest"].rates.input_micro_usd_per_mtok == 1_000_000 and "m-latest" not in merged.aliases
    with pytest.raises(PriceTableError, match="earlier.toml, line 3: aliases: 'm-latest' is also a model key"):
        merge_layers([later, earlier])  # the alias comes after the model it would shadow


def test_the_unknown_model_policy_is_deny_or_a_fallback_price(tmp_path: Path) -> None:
    fallback = load(
        tmp_path,
        """
        [unknown_model]
        policy = "fallback"
        input = 10_000_000
        cached_input = "input"
        cache_write = "input"
        output = 30_000_000
        """,
    )
    estimate = fallback.estimate("some-new-model", 1_000, 100)
    assert (estimate.units, estimate.fallback, estimate.model) == (13_000, True, FALLBACK_MODEL)
    deny_with_prices = '[unknown_model]\npolicy = "deny"\ninput = 1\n'
    assert "policy is deny, but prices are given" in load_error(tmp_path, deny_with_prices)
    assert "policy must be one of ['deny', 'fallback']" in load_error(tmp_path, '[unknown_model]\npolicy = "allow"\n')
    assert "reserved for the unknown-model fallback" in load_error(tmp_path, MODEL_M.replace('"m"', '"*fallback*"'))


def test_values_out_of_range_are_errors(tmp_path: Path) -> None:
    assert "expected 0..=10_000_000_000, got 10_000_000_001" in load_error(
        tmp_path, MODEL_M.replace("output = 15_000_000", "output = 10_000_000_001")
    )
    assert "expected an integer, got 1.5" in load_error(tmp_path, MODEL_M.replace("input = 3_000_000", "input = 1.5"))
    assert "micro_usd_per_credit: expected 1..=" in load_error(tmp_path, "micro_usd_per_credit = 0")
    assert "as_of must be a TOML date" in load_error(tmp_path, 'as_of = "2026-12-01"')
    assert "over 128 bytes" in load_error(tmp_path, MODEL_M.replace('"m"', '"' + "x" * 129 + '"'))


def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(PriceTableError, match=f"{tmp_path / 'missing.toml'}: cannot read the price file"):
        load_price_table(tmp_path / "missing.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(PriceTableError, match="not UTF-8"):
        load_price_table(tmp_path / "latin1.toml")


def test_a_model_may_give_its_context_window_and_largest_output(tmp_path: Path) -> None:
    path = tmp_path / "bounds.toml"
    path.write_text(
        'as_of = 2026-11-18\n[models."m"]\ninput = 1\ncached_input = 1\ncache_write = 1\noutput = 1\n'
        "context_window_tokens = 200_000\nmax_output_tokens = 8_192\n"
    )
    price = load_price_table(path).models["m"]
    assert (price.context_window_tokens, price.max_output_tokens) == (200_000, 8_192)
    path.write_text(path.read_text().replace("8_192", "0"))
    with pytest.raises(PriceTableError, match="max_output_tokens: expected 1"):
        load_price_table(path)
