"""The policy: what a call may cost and what it did cost.

- prices.py: the arithmetic (TokenUsage, PriceTable.estimate / charge, exact integers, the lookup rule)
- price_file.py: the TOML price file (bundled default_prices.toml, overridden by a user's file) -> a PriceTable
- price_book.py: the current table behind one attribute, reloaded on SIGHUP or when the file changes
- providers.py: OpenAI and Anthropic usage objects -> TokenUsage

    book = PriceBook("prices.toml")
    table = book.table                # read once per call: a reload swaps whole tables
    estimate = table.estimate("gpt-6-sol", input_tokens=12_000, max_output_tokens=2_000)   # Reserve estimate.units
    bill = table.charge(usage_from_openai(response, model=estimate.model))                 # Commit bill.units
"""

from spendgate.policy.price_book import PriceBook
from spendgate.policy.prices import (
    CACHE_WRITE,
    CACHED_INPUT,
    INPUT,
    OUTPUT,
    REASONING,
    TOKEN_TYPES,
    Charge,
    ChargeLine,
    Estimate,
    ModelPrice,
    PriceError,
    PriceTable,
    PriceTableError,
    Rates,
    TokenUsage,
    UnknownModelError,
    load_price_table,
)
from spendgate.policy.providers import usage_from_anthropic, usage_from_openai, usage_from_openai_responses

__all__ = [
    "CACHED_INPUT",
    "CACHE_WRITE",
    "INPUT",
    "OUTPUT",
    "REASONING",
    "TOKEN_TYPES",
    "Charge",
    "ChargeLine",
    "Estimate",
    "ModelPrice",
    "PriceBook",
    "PriceError",
    "PriceTable",
    "PriceTableError",
    "Rates",
    "TokenUsage",
    "UnknownModelError",
    "load_price_table",
    "usage_from_anthropic",
    "usage_from_openai",
    "usage_from_openai_responses",
]
