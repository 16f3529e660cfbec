"""Metering: turning a Reserve's token estimate and a Commit's token usage into budget units, with the price table in
force, and into the usage detail the engine keeps beside the ledger entry.

    meter = Meter(PriceBook(path))
    estimate = meter.estimate("gpt-6-sol", input_tokens=12_000, max_output_tokens=2_000)  # raises UnknownModelError
    units, detail = meter.charge(TokenUsage(model=estimate.model, input_tokens=11_800, output_tokens=950))

A cache hit costs nothing and records no tokens: the settler sends no token event for it, so it never reaches an
invoice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from spendgate.policy.price_book import PriceBook
from spendgate.policy.prices import Estimate, PriceError, TokenUsage

if TYPE_CHECKING:
    from spendgate._core import UsageDetail

# An idempotent retry of an estimate must name the same call; the units may differ if the prices were reloaded.
FINGERPRINT_SEPARATOR: Final[str] = "|"


class Meter:
    """Prices calls with `book.table`, read once per call (a reload swaps whole tables)."""

    def __init__(self, book: PriceBook) -> None:
        self.book = book

    def estimate(self, model: str, input_tokens: int, max_output_tokens: int) -> Estimate:
        """The worst case of a call. Raises UnknownModelError (deny: fail closed) or PriceError (bad input)."""
        estimate = self.book.table.estimate(model, input_tokens, max_output_tokens)
        if estimate.units < 1:
            raise PriceError(
                f"the estimate for {model!r} prices to 0 units; pass input_tokens or max_output_tokens > 0 (or an"
                " amount)"
            )
        return estimate

    def charge(self, usage: TokenUsage) -> tuple[int, UsageDetail]:
        """The exact units of a call and its detail (parts sum to the units). Raises PriceError or
        UnknownModelError."""
        charge = self.book.table.charge(usage)
        parts = (
            []
            if charge.cache_hit
            else [(line.token_type, line.tokens, line.units) for line in charge.breakdown if line.tokens or line.units]
        )
        assert sum(units for _, _, units in parts) == charge.units, (parts, charge.units)
        detail: UsageDetail = {
            # A fallback price keeps the model's own name in the books, not the fallback's key.
            "model": charge.requested_model if charge.fallback else charge.model,
            "parts": parts,
            "cache_hit": charge.cache_hit,
            "fallback": charge.fallback,
        }
        return charge.units, detail


def fingerprint(model: str, input_tokens: int, max_output_tokens: int) -> str:
    return FINGERPRINT_SEPARATOR.join((model, str(input_tokens), str(max_output_tokens)))
