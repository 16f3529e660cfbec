"""Token prices: what a call may cost (Reserve) and what it did cost (Commit), in exact integers.

A `PriceTable` maps a model to its prices in micro-USD per million tokens for five token types, applies the table's
markup and, when the table sets one, converts to credits. Budget units are micro-USD, or credits when
`micro_usd_per_credit` is set.

    table = load_price_table("prices.toml")                   # the bundled default, overridden by the user's file
    estimate = table.estimate("gpt-6-sol", input_tokens=12_000, max_output_tokens=2_000)
    with client.reserve(customer, amount=estimate.units) as hold:   # Reserve the worst case
        response = call_the_llm()
        bill = table.charge(usage_from_openai(response, model=estimate.model))
        hold.commit(bill.units)                                # Commit exactly what was used (bill.breakdown: per type)

The rules (tests/python/policy/test_prices.py pins each with numbers):
- Counts are disjoint (`TokenUsage`): input excludes cached and cache-write tokens; output excludes reasoning tokens.
  Each type is billed at its own rate: cached input at the cached rate, never at the full input rate.
- A call's exact cost is sum(tokens x rate) x (1 + markup), divided by 1,000,000 (rates are per million tokens) and by
  `micro_usd_per_credit`. It is rounded UP ONCE per call, after markup and conversion: a call worth 0.3 units costs 1.
- The breakdown floors each type's exact share and gives the rounding remainder, one unit each, to the types with the
  largest dropped fractions (ties in TOKEN_TYPES order). Its units sum exactly to the total; a type with no tokens
  gets none.
- `cache_hit=True` (the app served the answer from its own cache, no provider call) costs 0 units.
- The estimate is the worst case: every input token at the highest of the input, cached-input and cache-write rates,
  every output token at the highest of the output and reasoning rates, markup applied, rounded up. So the charge of
  any usage with input + cached + cache_write <= input_tokens and output + reasoning <= max_output_tokens never
  exceeds it (a hypothesis test checks this).
- Long context: a model may have a second set of rates for prompts (input + cached + cache write) above a threshold;
  they then apply to every token of the call. They are never lower than the base rates, so the worst case holds.
- Lookup (`PriceTable.resolve_model`): the exact key; else an alias from `[aliases]`; else the same two after dropping
  one provider prefix (PROVIDER_PREFIXES: "openai/gpt-6-sol" -> "gpt-6-sol"). Nothing else: no case folding, no
  stripping of dated suffixes, no nearest match, so an unknown id can never be priced as a cheaper model.
- Unknown models: policy "deny" (the default) raises UnknownModelError, which says how to fix it; a fallback price
  prices them and marks the result `fallback=True`.
- No float anywhere: Python ints, with every bound a named constant below, so that no call can exceed the engine's
  MAX_AMOUNT_UNITS (checked at import).
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

# The five token types, the names used in the price file, breakdowns and logs.
INPUT: Final[str] = "input"
CACHED_INPUT: Final[str] = "cached_input"
CACHE_WRITE: Final[str] = "cache_write"
OUTPUT: Final[str] = "output"
REASONING: Final[str] = "reasoning"
TOKEN_TYPES: Final[tuple[str, ...]] = (INPUT, CACHED_INPUT, CACHE_WRITE, OUTPUT, REASONING)
PROMPT_TYPES: Final[tuple[str, ...]] = (INPUT, CACHED_INPUT, CACHE_WRITE)
COMPLETION_TYPES: Final[tuple[str, ...]] = (OUTPUT, REASONING)

# The engine's bound on an amount (rust/src/limits.rs; a test checks it equals spendgate._core.MAX_AMOUNT_UNITS). Kept
# here so that this module stays pure Python.
MAX_AMOUNT_UNITS: Final[int] = 1 << 53
# Bounds on what a table and a call may hold.
MAX_TOKENS_PER_TYPE: Final[int] = 10**9
MAX_MODEL_NAME_BYTES: Final[int] = 128
MAX_MODELS: Final[int] = 10_000
MAX_ALIASES: Final[int] = 10_000
MAX_PRICE_MICRO_USD_PER_MTOK: Final[int] = 10**10  # $10,000 per million tokens
MAX_MARKUP_BASIS_POINTS: Final[int] = 100_000  # 1,000 %
MAX_MICRO_USD_PER_CREDIT: Final[int] = 10**12  # $1,000,000 per credit
# Unit conversions.
TOKENS_PER_MTOK: Final[int] = 1_000_000
BASIS_POINTS_PER_WHOLE: Final[int] = 10_000  # 100 % = 10,000 basis points
BASIS_POINTS_PER_PERCENT: Final[int] = 100
# One segment a lookup may drop: routers and SDKs put these in front of the provider's own id.
PROVIDER_PREFIXES: Final[tuple[str, ...]] = ("openai/", "anthropic/", "google/", "gemini/", "models/")
# The key the fallback price of unknown models goes by (Estimate.model, Charge.model); no file may name a model so.
FALLBACK_MODEL: Final[str] = "*fallback*"
# Only to make the "unknown model" message helpful; never used to price.
_DATED_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")


def _worst_call_units() -> int:
    # Every type at the bound, at the highest rate and markup, one micro-USD per credit.
    numerator = len(TOKEN_TYPES) * MAX_TOKENS_PER_TYPE * MAX_PRICE_MICRO_USD_PER_MTOK
    numerator *= BASIS_POINTS_PER_WHOLE + MAX_MARKUP_BASIS_POINTS
    return -(-numerator // (TOKENS_PER_MTOK * BASIS_POINTS_PER_WHOLE))


# The bounds above are chosen so that this holds; the per-call check in _units is then a second line of defence.
assert _worst_call_units() <= MAX_AMOUNT_UNITS, _worst_call_units()


class PriceError(ValueError):
    """A price computation was asked something out of bounds (a count over MAX_TOKENS_PER_TYPE, ...)."""


class UnknownModelError(PriceError):
    """The table has no price for the model and its unknown-model policy is "deny"."""

    def __init__(self, model: str, hint: str = "") -> None:
        self.model = model
        super().__init__(
            f"no price for model {model!r}: the price table denies unknown models. Add [models.{_toml_key(model)}] "
            f"(or an alias in [aliases]) to the price table, or set a fallback price in [unknown_model]{hint}"
        )


class PriceTableError(ValueError):
    """A price file is unreadable or invalid. The message names the file and, where it can, the line."""


def check_model_name(name: object) -> str:
    """`name` if it is a usable model name (1..=MAX_MODEL_NAME_BYTES UTF-8 bytes, no whitespace or control
    characters); raises PriceError saying what is wrong otherwise."""
    if not isinstance(name, str) or not name:
        raise PriceError(f"a model name is a non-empty string, got {name!r}")
    if len(name.encode()) > MAX_MODEL_NAME_BYTES:
        raise PriceError(f"model name {name[:40]!r}... is over {MAX_MODEL_NAME_BYTES} bytes")
    if any(c.isspace() or not c.isprintable() for c in name):
        raise PriceError(f"model name {name!r} has whitespace or control characters")
    return name


def check_tokens(what: str, value: object) -> int:
    """`value` if it is a token count (an int in 0..=MAX_TOKENS_PER_TYPE; bool is not a count); raises PriceError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise PriceError(f"{what}: a token count is an int, got {value!r}")
    if not 0 <= value <= MAX_TOKENS_PER_TYPE:
        raise PriceError(f"{what}: expected 0..={MAX_TOKENS_PER_TYPE:_} tokens, got {value:_}")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class TokenUsage:
    """What one call used, in DISJOINT counts: `input_tokens` excludes cached and cache-write tokens, and
    `output_tokens` excludes reasoning tokens. (OpenAI's prompt_tokens includes its cached tokens and its
    completion_tokens includes reasoning tokens; Anthropic's input_tokens already excludes cache reads and writes:
    spendgate.policy.providers converts.) `cache_hit`: the app answered from its own cache, with no provider call."""

    model: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_hit: bool = False

    def __post_init__(self) -> None:
        check_model_name(self.model)
        for token_type in TOKEN_TYPES:
            check_tokens(f"{token_type}_tokens", self.tokens(token_type))
        if not isinstance(self.cache_hit, bool):
            raise PriceError(f"cache_hit is a bool, got {self.cache_hit!r}")

    def tokens(self, token_type: str) -> int:
        """The count of one token type (a name from TOKEN_TYPES)."""
        count: int = getattr(self, f"{token_type}_tokens")
        return count

    @property
    def prompt_tokens(self) -> int:
        """Every token of the prompt: input + cached input + cache write."""
        return sum(self.tokens(t) for t in PROMPT_TYPES)

    @property
    def completion_tokens(self) -> int:
        """Every generated token: output + reasoning."""
        return sum(self.tokens(t) for t in COMPLETION_TYPES)


@dataclasses.dataclass(frozen=True, slots=True)
class Rates:
    """One price per token type, in micro-USD per million tokens (1_000_000 = $1.00 per MTok)."""

    input_micro_usd_per_mtok: int
    cached_input_micro_usd_per_mtok: int
    cache_write_micro_usd_per_mtok: int
    output_micro_usd_per_mtok: int
    reasoning_micro_usd_per_mtok: int

    def __post_init__(self) -> None:
        for token_type in TOKEN_TYPES:
            rate = self.micro_usd_per_mtok(token_type)
            assert isinstance(rate, int) and 0 <= rate <= MAX_PRICE_MICRO_USD_PER_MTOK, (token_type, rate)

    @classmethod
    def of(cls, by_type: Mapping[str, int]) -> Rates:
        """From a mapping of every name in TOKEN_TYPES to its rate."""
        return cls(**{f"{t}_micro_usd_per_mtok": by_type[t] for t in TOKEN_TYPES})

    def micro_usd_per_mtok(self, token_type: str) -> int:
        rate: int = getattr(self, f"{token_type}_micro_usd_per_mtok")
        return rate

    def worst_prompt_rate(self) -> int:
        return max(self.micro_usd_per_mtok(t) for t in PROMPT_TYPES)

    def worst_completion_rate(self) -> int:
        return max(self.micro_usd_per_mtok(t) for t in COMPLETION_TYPES)

    def covers(self, other: Rates) -> bool:
        """True when no rate here is below the same rate in `other`."""
        return all(self.micro_usd_per_mtok(t) >= other.micro_usd_per_mtok(t) for t in TOKEN_TYPES)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's prices. `long_context_rates`, when set, replace `rates` for a whole call whose prompt tokens
    (input + cached + cache write) exceed `long_context_above_prompt_tokens`."""

    model: str
    rates: Rates
    long_context_above_prompt_tokens: int | None = None
    long_context_rates: Rates | None = None
    # The most tokens one call may have in all (prompt + output) and the most it may generate (reasoning included);
    # None: not known. The HTTP proxy bounds a call's worst case with them (spendgate.proxy.estimate).
    context_window_tokens: int | None = None
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        check_model_name(self.model)
        for bound in (self.context_window_tokens, self.max_output_tokens):
            assert bound is None or 1 <= bound <= MAX_TOKENS_PER_TYPE, self
        assert (self.long_context_above_prompt_tokens is None) == (self.long_context_rates is None), self
        if self.long_context_rates is not None:
            # The estimate relies on this: more prompt tokens never make any token cheaper.
            assert self.long_context_rates.covers(self.rates), self

    def rates_for(self, prompt_tokens: int) -> Rates:
        """The rates a call with this many prompt tokens pays, for every one of its tokens."""
        above = self.long_context_above_prompt_tokens
        if above is not None and prompt_tokens > above and self.long_context_rates is not None:
            return self.long_context_rates
        return self.rates


@dataclasses.dataclass(frozen=True, slots=True)
class ChargeLine:
    """One token type of a charge: its count and its share of the call's units."""

    token_type: str
    tokens: int
    units: int


@dataclasses.dataclass(frozen=True, slots=True)
class Estimate:
    """The worst case of a call, to Reserve. `model` is the table's key the requested name resolved to.
    `breakdown`: (INPUT, input_tokens, units) and (OUTPUT, max_output_tokens, units), split like a Charge's and
    summing to `units` (what Budget.Quote and Reserve show per token type)."""

    units: int
    model: str
    requested_model: str
    input_tokens: int
    max_output_tokens: int
    fallback: bool = False
    breakdown: tuple[ChargeLine, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Charge:
    """What a call cost, to Commit: `units` in total, rounded up once; `breakdown` per token type (in TOKEN_TYPES
    order), whose units sum exactly to `units`."""

    units: int
    model: str
    requested_model: str
    breakdown: tuple[ChargeLine, ...]
    cache_hit: bool = False
    fallback: bool = False

    def __post_init__(self) -> None:
        assert sum(line.units for line in self.breakdown) == self.units, self
        assert tuple(line.token_type for line in self.breakdown) == TOKEN_TYPES, self

    def units_of(self, token_type: str) -> int:
        return next(line.units for line in self.breakdown if line.token_type == token_type)


@dataclasses.dataclass(frozen=True)
class PriceTable:
    """A loaded, validated price table (build one with load_price_table). Immutable: PriceBook swaps whole tables.

    as_of: the date the prices were read from their sources. markup_basis_points: 1_250 is 12.5 %.
    micro_usd_per_credit: None, budget units are micro-USD; else units are credits of that many micro-USD.
    unknown_model: None denies unknown models; else their price. sources: the files it was built from."""

    as_of: datetime.date
    models: Mapping[str, ModelPrice]
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    markup_basis_points: int = 0
    micro_usd_per_credit: int | None = None
    unknown_model: ModelPrice | None = None
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))
        object.__setattr__(self, "aliases", MappingProxyType(dict(self.aliases)))
        assert 0 <= self.markup_basis_points <= MAX_MARKUP_BASIS_POINTS, self.markup_basis_points
        assert self.micro_usd_per_credit is None or 1 <= self.micro_usd_per_credit <= MAX_MICRO_USD_PER_CREDIT
        assert len(self.models) <= MAX_MODELS and len(self.aliases) <= MAX_ALIASES
        assert all(key == price.model for key, price in self.models.items())
        assert all(target in self.models and alias not in self.models for alias, target in self.aliases.items())

    @property
    def unit_name(self) -> str:
        """What a budget unit is under this table: "credit" or "micro_usd"."""
        return "micro_usd" if self.micro_usd_per_credit is None else "credit"

    def resolve_model(self, model: str) -> str | None:
        """The key of `model` in `models` by the lookup rule (exact, alias, then once more without one provider
        prefix), or None when the table has no price for it."""
        key = self._exact_or_alias(model)
        if key is not None:
            return key
        for prefix in PROVIDER_PREFIXES:
            if model.startswith(prefix):
                return self._exact_or_alias(model[len(prefix) :])
        return None

    def price_of(self, model: str) -> tuple[ModelPrice, bool]:
        """(price, fallback) for `model`; raises UnknownModelError when it is unknown and the policy denies."""
        check_model_name(model)
        key = self.resolve_model(model)
        if key is not None:
            return self.models[key], False
        if self.unknown_model is not None:
            return self.unknown_model, True
        raise UnknownModelError(model, self._unknown_hint(model))

    def estimate(self, model: str, input_tokens: int, max_output_tokens: int) -> Estimate:
        """The worst case of a call of `model` with `input_tokens` prompt tokens in all (cached or not) and at most
        `max_output_tokens` generated tokens (reasoning included)."""
        check_tokens("input_tokens", input_tokens)
        check_tokens("max_output_tokens", max_output_tokens)
        price, fallback = self.price_of(model)
        rates = price.rates_for(input_tokens)
        shares = {
            INPUT: self._scale(input_tokens * rates.worst_prompt_rate()),
            OUTPUT: self._scale(max_output_tokens * rates.worst_completion_rate()),
        }
        units = _ceil_div(sum(shares.values()), self._denominator())
        _check_units(units, model)
        tokens = {INPUT: input_tokens, OUTPUT: max_output_tokens}
        lines = tuple(
            ChargeLine(t, tokens[t], u) for t, u in _allocate(shares, self._denominator(), units, (INPUT, OUTPUT))
        )
        return Estimate(units, price.model, model, input_tokens, max_output_tokens, fallback, lines)

    def charge(self, usage: TokenUsage) -> Charge:
        """The exact cost of a finished call: each token type at its own rate, markup applied, converted, rounded up
        once. A cache hit costs 0."""
        price, fallback = self.price_of(usage.model)
        if usage.cache_hit:
            lines = tuple(ChargeLine(t, usage.tokens(t), 0) for t in TOKEN_TYPES)
            return Charge(0, price.model, usage.model, lines, cache_hit=True, fallback=fallback)
        rates = price.rates_for(usage.prompt_tokens)
        shares = {t: self._scale(usage.tokens(t) * rates.micro_usd_per_mtok(t)) for t in TOKEN_TYPES}
        units = _ceil_div(sum(shares.values()), self._denominator())
        _check_units(units, usage.model)
        lines = tuple(ChargeLine(t, usage.tokens(t), u) for t, u in _allocate(shares, self._denominator(), units))
        return Charge(units, price.model, usage.model, lines, fallback=fallback)

    def _exact_or_alias(self, name: str) -> str | None:
        if name in self.models:
            return name
        return self.aliases.get(name)

    def _scale(self, cost_micro_usd_per_mtok_tokens: int) -> int:
        # The markup multiplies the numerator; its /10,000 goes into the denominator, so nothing is rounded here.
        return cost_micro_usd_per_mtok_tokens * (BASIS_POINTS_PER_WHOLE + self.markup_basis_points)

    def _denominator(self) -> int:
        return TOKENS_PER_MTOK * BASIS_POINTS_PER_WHOLE * (self.micro_usd_per_credit or 1)

    def _unknown_hint(self, model: str) -> str:
        base = _DATED_SUFFIX.sub("", model)
        key = self.resolve_model(base) if base != model else None
        if key is None:
            return "."
        return (
            f". It looks like a dated snapshot of {key!r}: if it has the same price, add "
            f"{_toml_key(model)} = {_toml_key(key)} to [aliases]."
        )


def _ceil_div(numerator: int, denominator: int) -> int:
    assert numerator >= 0 and denominator > 0, (numerator, denominator)
    return -(-numerator // denominator)


def _check_units(units: int, model: str) -> None:
    # Unreachable within the bounds above (checked at import); kept so that a change of bounds cannot overflow silently.
    if units > MAX_AMOUNT_UNITS:
        raise PriceError(
            f"a call of {model!r} would cost {units:_} units, over the engine's bound {MAX_AMOUNT_UNITS:_}"
        )


def _allocate(
    shares: Mapping[str, int], denominator: int, total: int, types: tuple[str, ...] = TOKEN_TYPES
) -> list[tuple[str, int]]:
    """Split `total` (= ceil(sum(shares) / denominator)) over `types`: each gets the floor of its exact share; the
    remainder goes one unit each to the largest dropped fractions, ties in `types` order."""
    floors = {t: shares[t] // denominator for t in types}
    fractions = {t: shares[t] % denominator for t in types}
    remainder = total - sum(floors.values())
    # ceil(sum) - sum(floors) = ceil(sum of fractions / denominator): at most one unit per type with a fraction.
    assert 0 <= remainder <= sum(1 for t in types if fractions[t] > 0), (remainder, fractions)
    by_fraction = sorted(types, key=lambda t: (-fractions[t], types.index(t)))
    for token_type in by_fraction[:remainder]:
        floors[token_type] += 1
    return [(t, floors[t]) for t in types]


def _toml_key(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def load_price_table(path: str | Path | None) -> PriceTable:
    """The bundled default table (spendgate/policy/default_prices.toml) overridden by the file at `path` (None: the
    default alone). Raises PriceTableError naming the file and line. The file format: spendgate.policy.price_file."""
    from spendgate.policy import price_file  # the TOML side imports this module

    return price_file.load_price_table(path)
