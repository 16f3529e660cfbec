"""The price file: TOML in, a validated PriceTable out (spendgate.policy.prices does the arithmetic).

The bundled default, default_prices.toml beside this module, is loaded first; a user's file overrides it: a model the
user's file prices replaces the bundled entry whole (prices are never mixed field by field), an alias replaces the
alias of the same name, and a table setting given replaces the bundled one. `use_bundled = false` starts from nothing.

    as_of = 2026-11-18                  # the date the prices were read (a TOML date); required in the merged table
    markup_percent = "12.5"             # an integer or a decimal string (at most 2 decimals), never a float; default 0
    micro_usd_per_credit = 1_000        # optional: budget units are credits of this many micro-USD; else micro-USD
    use_bundled = true                  # user file only: false ignores the bundled default

    [unknown_model]
    policy = "deny"                     # default; or "fallback" with prices, as a model's below

    [aliases]
    "gpt-6-sol-2026-09-22" = "gpt-6-sol"    # a name -> a model key; no chains

    [models."gpt-6-sol"]                # prices in micro-USD per million tokens: 2_000_000 is $2.00 / MTok
    input = 2_000_000
    cached_input = 200_000              # required; or "input" when cached input is billed at the input rate
    cache_write = 2_500_000             # required; or "input" when writing the cache costs the input rate
    output = 10_000_000
    # reasoning = "output"              # the default: every provider bills reasoning tokens as output

    context_window_tokens = 1_050_000   # optional: the most tokens of a call, prompt and output (the proxy's bound)
    max_output_tokens = 128_000         # optional: the most a call may generate, reasoning included

    [models."gpt-6-sol".long_context]   # optional: rates for a whole call whose prompt exceeds the threshold
    above_prompt_tokens = 272_000       # prompt = input + cached input + cache write
    input = 4_000_000                   # the same keys and rules as above; no rate below the base rate
    ...

A price is an integer, or the name of another token type of the same table whose price is an integer (no chains).
Unknown keys are errors, so that a typo fails instead of silently falling back. Every error names the file and, where
it can be found, the line (TOML syntax errors carry tomllib's line; semantic errors point at the table's header).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from spendgate.policy.prices import (
    BASIS_POINTS_PER_PERCENT,
    FALLBACK_MODEL,
    MAX_ALIASES,
    MAX_MARKUP_BASIS_POINTS,
    MAX_MICRO_USD_PER_CREDIT,
    MAX_MODELS,
    MAX_PRICE_MICRO_USD_PER_MTOK,
    MAX_TOKENS_PER_TYPE,
    OUTPUT,
    REASONING,
    TOKEN_TYPES,
    ModelPrice,
    PriceError,
    PriceTable,
    PriceTableError,
    Rates,
    check_model_name,
)

BUNDLED_RESOURCE: Final[str] = "default_prices.toml"
BUNDLED_SOURCE: Final[str] = "spendgate/policy/default_prices.toml (bundled)"
MAX_PRICE_FILE_BYTES: Final[int] = 1 << 20
TABLE_KEYS: Final[frozenset[str]] = frozenset(
    {"as_of", "markup_percent", "micro_usd_per_credit", "use_bundled", "unknown_model", "aliases", "models"}
)
LONG_CONTEXT_KEY: Final[str] = "long_context"
# A model's token bounds (not prices): ModelPrice.context_window_tokens and .max_output_tokens.
BOUND_KEYS: Final[tuple[str, ...]] = ("context_window_tokens", "max_output_tokens")
THRESHOLD_KEY: Final[str] = "above_prompt_tokens"
POLICY_KEY: Final[str] = "policy"
UNKNOWN_POLICIES: Final[tuple[str, ...]] = ("deny", "fallback")
# What an omitted price means. Only reasoning has a default; an omitted cached_input or cache_write is an error, since
# guessing either way (free? full price?) would bill wrongly without a word.
DEFAULT_PRICE_REFERENCES: Final[Mapping[str, str]] = {REASONING: OUTPUT}
_MARKUP_DECIMAL = re.compile(r"^(\d{1,4})(?:\.(\d{1,2}))?$")


@dataclasses.dataclass
class PriceLayer:
    """One file, parsed and checked on its own; merged with the others by merge_layers."""

    source: str
    text: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    models: dict[str, ModelPrice] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)

    def error(self, message: str, line: int | None = None) -> PriceTableError:
        where = self.source if line is None else f"{self.source}, line {line}"
        return PriceTableError(f"{where}: {message}")

    def line_of(self, pattern: str) -> int | None:
        """The first line (1-based) matching `pattern` (a regex for one line), or None."""
        regex = re.compile(pattern)
        return next((n for n, text in enumerate(self.text.splitlines(), 1) if regex.match(text)), None)

    def key_line(self, key: str) -> int | None:
        return self.line_of(rf"\s*{_key_pattern(key)}\s*=")

    def model_line(self, model: str, *, long_context: bool = False) -> int | None:
        suffix = rf"\s*\.\s*{LONG_CONTEXT_KEY}" if long_context else ""
        header = self.line_of(rf"\s*\[\s*models\s*\.\s*{_key_pattern(model)}{suffix}\s*\]")
        return header if header is not None else self.key_line(model)  # the inline-table form


def _key_pattern(key: str) -> str:
    quoted = re.escape(key.replace("\\", "\\\\").replace('"', '\\"'))
    return rf"(?:\"{quoted}\"|'{re.escape(key)}'|{re.escape(key)})"


def load_price_table(path: str | Path | None) -> PriceTable:
    """The bundled default merged with the file at `path` (None: the bundled default alone)."""
    bundled_text = importlib.resources.files("spendgate.policy").joinpath(BUNDLED_RESOURCE).read_text("utf-8")
    bundled = parse_layer(bundled_text, BUNDLED_SOURCE)
    if path is None:
        return merge_layers([bundled])
    user = parse_layer(_read(Path(path)), str(path))
    layers = [bundled, user] if user.settings.get("use_bundled", True) else [user]
    return merge_layers(layers)


def _read(path: Path) -> str:
    try:
        size_bytes = path.stat().st_size
        if size_bytes > MAX_PRICE_FILE_BYTES:
            raise PriceTableError(f"{path}: the price file is {size_bytes:_} bytes, over {MAX_PRICE_FILE_BYTES:_}")
        return path.read_bytes().decode("utf-8")
    except OSError as error:
        raise PriceTableError(f"{path}: cannot read the price file: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise PriceTableError(f"{path}: the price file is not UTF-8 ({error.reason} at byte {error.start})") from error


def parse_layer(text: str, source: str) -> PriceLayer:
    """One price file on its own: its settings, models and aliases, every value checked."""
    layer = PriceLayer(source, text)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise layer.error(f"not valid TOML: {error}") from error  # tomllib's message carries "(at line N, column M)"
    for key in document:
        if key not in TABLE_KEYS:
            raise layer.error(f"unknown setting {key!r} (expected one of {sorted(TABLE_KEYS)})", layer.key_line(key))
    _parse_settings(layer, document)
    models = _table(layer, document, "models")
    if len(models) > MAX_MODELS:
        raise layer.error(f"{len(models):_} models, over the limit of {MAX_MODELS:_}")
    for name, table in models.items():
        layer.models[name] = _parse_model(layer, name, table)
    _parse_aliases(layer, _table(layer, document, "aliases"))
    return layer


def _table(layer: PriceLayer, document: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise layer.error(f"{key!r} must be a table", layer.key_line(key))
    return value


def _parse_settings(layer: PriceLayer, document: Mapping[str, Any]) -> None:
    settings = layer.settings
    if "as_of" in document:
        as_of = document["as_of"]
        if not isinstance(as_of, datetime.date) or isinstance(as_of, datetime.datetime):
            raise layer.error(f"as_of must be a TOML date like 2026-11-18, got {as_of!r}", layer.key_line("as_of"))
        settings["as_of"] = as_of
    if "markup_percent" in document:
        settings["markup_basis_points"] = _parse_markup(layer, document["markup_percent"])
    if "micro_usd_per_credit" in document:
        settings["micro_usd_per_credit"] = _parse_int(
            layer, "micro_usd_per_credit", document["micro_usd_per_credit"], 1, MAX_MICRO_USD_PER_CREDIT,
            layer.key_line("micro_usd_per_credit"),
        )  # fmt: skip
    if "use_bundled" in document:
        if not isinstance(document["use_bundled"], bool):
            raise layer.error("use_bundled must be true or false", layer.key_line("use_bundled"))
        settings["use_bundled"] = document["use_bundled"]
    if "unknown_model" in document:
        settings["unknown_model"] = _parse_unknown_model(layer, _table(layer, document, "unknown_model"))


def _parse_markup(layer: PriceLayer, value: object) -> int:
    line = layer.key_line("markup_percent")
    if isinstance(value, float):
        raise layer.error(f'markup_percent: write {value} as a string ("{value}"): a float is not exact', line)
    if isinstance(value, int) and not isinstance(value, bool):
        basis_points = value * BASIS_POINTS_PER_PERCENT
    elif isinstance(value, str) and (match := _MARKUP_DECIMAL.match(value)):
        whole, fraction = match.group(1), match.group(2) or ""
        basis_points = int(whole) * BASIS_POINTS_PER_PERCENT + int(fraction.ljust(2, "0"))
    else:
        raise layer.error(f'markup_percent: expected an integer or a decimal string like "12.5", got {value!r}', line)
    if not 0 <= basis_points <= MAX_MARKUP_BASIS_POINTS:
        raise layer.error(f"markup_percent: expected 0..={MAX_MARKUP_BASIS_POINTS // 100} %, got {value}", line)
    return basis_points


def _parse_int(layer: PriceLayer, what: str, value: object, low: int, high: int, line: int | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise layer.error(f"{what}: expected an integer, got {value!r}", line)
    if not low <= value <= high:
        raise layer.error(f"{what}: expected {low:_}..={high:_}, got {value:_}", line)
    return value


def _parse_unknown_model(layer: PriceLayer, table: dict[str, Any]) -> ModelPrice | None:
    line = layer.line_of(r"\s*\[\s*unknown_model\s*\]")
    prices = dict(table)
    policy = prices.pop(POLICY_KEY, "deny")
    if policy not in UNKNOWN_POLICIES:
        raise layer.error(f"unknown_model: policy must be one of {list(UNKNOWN_POLICIES)}, got {policy!r}", line)
    if policy == "deny":
        if prices:
            raise layer.error(f"unknown_model: policy is deny, but prices are given ({sorted(prices)})", line)
        return None
    return _model_price(layer, FALLBACK_MODEL, prices, "unknown_model", line)


def _parse_model(layer: PriceLayer, name: str, table: object) -> ModelPrice:
    line = layer.model_line(name)
    try:
        check_model_name(name)
    except PriceError as error:
        raise layer.error(f"models: {error}", line) from error
    if name == FALLBACK_MODEL:
        raise layer.error(f"models: {FALLBACK_MODEL!r} is reserved for the unknown-model fallback", line)
    if not isinstance(table, dict):
        raise layer.error(f"models.{name}: must be a table of prices", line)
    return _model_price(layer, name, table, f"model {name!r}", line)


def _model_price(layer: PriceLayer, name: str, table: dict[str, Any], what: str, line: int | None) -> ModelPrice:
    prices = dict(table)
    long_context = prices.pop(LONG_CONTEXT_KEY, None)
    bounds = {key: _parse_int(layer, f"{what}, {key}", prices.pop(key), 1, MAX_TOKENS_PER_TYPE, line)
              for key in BOUND_KEYS if key in prices}  # fmt: skip
    rates = _parse_rates(layer, prices, what, line)
    if long_context is None:
        return ModelPrice(
            name,
            rates,
            context_window_tokens=bounds.get("context_window_tokens"),
            max_output_tokens=bounds.get("max_output_tokens"),
        )
    long_line = layer.model_line(name, long_context=True) or line
    long_what = f"{what}, long_context"
    if not isinstance(long_context, dict):
        raise layer.error(f"{long_what}: must be a table", long_line)
    long_prices = dict(long_context)
    if THRESHOLD_KEY not in long_prices:
        message = f"{long_what}: missing {THRESHOLD_KEY!r} (the prompt tokens above which it applies)"
        raise layer.error(message, long_line)
    threshold = _parse_int(layer, f"{long_what}, {THRESHOLD_KEY}", long_prices.pop(THRESHOLD_KEY), 1,
                           MAX_TOKENS_PER_TYPE, long_line)  # fmt: skip
    long_rates = _parse_rates(layer, long_prices, long_what, long_line)
    for token_type in TOKEN_TYPES:
        base, long = rates.micro_usd_per_mtok(token_type), long_rates.micro_usd_per_mtok(token_type)
        if long < base:
            # A longer prompt that made a token cheaper would break the estimate's worst case.
            raise layer.error(f"{long_what}: {token_type} {long:_} is below the base rate {base:_}", long_line)
    return ModelPrice(name, rates, threshold, long_rates, **bounds)


def _parse_rates(layer: PriceLayer, prices: dict[str, Any], what: str, line: int | None) -> Rates:
    for key in prices:
        if key not in TOKEN_TYPES:
            expected = f"prices for {list(TOKEN_TYPES)}, or {list(BOUND_KEYS)}"
            raise layer.error(f"{what}: unknown key {key!r} (expected {expected})", line)
    given = {t: prices.get(t, DEFAULT_PRICE_REFERENCES.get(t)) for t in TOKEN_TYPES}
    by_type = {t: _resolve_price(layer, given, t, what, line) for t in TOKEN_TYPES}
    return Rates.of(by_type)


def _resolve_price(layer: PriceLayer, given: Mapping[str, object], token_type: str, what: str, line: int | None) -> int:
    value = given[token_type]
    if value is None:
        hint = ' (or "input" if it is billed at the input rate)' if token_type != "input" else ""
        raise layer.error(f"{what}: missing price {token_type!r}: micro-USD per million tokens{hint}", line)
    if isinstance(value, str):
        target = given.get(value)
        if value == token_type or not isinstance(target, int) or isinstance(target, bool):
            raise layer.error(
                f"{what}: {token_type} = {value!r}: a reference names another token type priced with a number here",
                line,
            )
        value = target
    return _parse_int(layer, f"{what}, {token_type}", value, 0, MAX_PRICE_MICRO_USD_PER_MTOK, line)


def _parse_aliases(layer: PriceLayer, aliases: dict[str, Any]) -> None:
    if len(aliases) > MAX_ALIASES:
        raise layer.error(f"{len(aliases):_} aliases, over the limit of {MAX_ALIASES:_}")
    for alias, target in aliases.items():
        line = layer.key_line(alias)
        try:
            check_model_name(alias)
            check_model_name(target)
        except PriceError as error:
            raise layer.error(f"aliases: {error}", line) from error
        layer.aliases[alias] = target


def merge_layers(layers: list[PriceLayer]) -> PriceTable:
    """Later layers override earlier ones: whole models, single aliases, single settings."""
    settings: dict[str, Any] = {}
    models: dict[str, ModelPrice] = {}
    model_layer: dict[str, int] = {}
    aliases: dict[str, tuple[str, int]] = {}
    for index, layer in enumerate(layers):
        settings.update(layer.settings)
        models.update(layer.models)
        model_layer.update({name: index for name in layer.models})
        aliases.update({alias: (target, index) for alias, target in layer.aliases.items()})
    last = layers[-1]
    if "as_of" not in settings:
        raise last.error("no as_of: say when the prices were read, as a TOML date (as_of = 2026-11-18)")
    if len(models) > MAX_MODELS:
        raise last.error(f"{len(models):_} models after merging, over the limit of {MAX_MODELS:_}")
    checked: dict[str, str] = {}
    for alias, (target, index) in aliases.items():
        layer, line = layers[index], layers[index].key_line(alias)
        if alias in models:
            if model_layer[alias] > index:
                continue  # a later file priced a name an earlier file aliased: its model wins
            raise layer.error(f"aliases: {alias!r} is also a model key; an id must mean one price", line)
        if target not in models:
            raise layer.error(f"aliases: {alias!r} points to {target!r}, which is not a model in the table", line)
        checked[alias] = target
    return PriceTable(
        as_of=settings["as_of"],
        models=models,
        aliases=checked,
        markup_basis_points=settings.get("markup_basis_points", 0),
        micro_usd_per_credit=settings.get("micro_usd_per_credit"),
        unknown_model=settings.get("unknown_model"),
        sources=tuple(layer.source for layer in layers),
    )
