"""Transport-free services: what a Reserve, Commit or Release decides, for every front (gRPC, the HTTP proxy).

- budgets.py: BudgetService prices a token estimate or usage (spendgate.policy.metering), asks the engine, waits until
  the change is durable, and words the reply. It imports neither grpc nor aiohttp; errors are the engine's
  EngineError, which each front maps to its own status codes in one place.
"""

from spendgate.service.budgets import (
    BudgetEngine,
    BudgetService,
    CommitResult,
    QuoteResult,
    ReleaseResult,
    ReserveResult,
    TokenEstimate,
    Usage,
    deny_message,
    grant_credits,
    reason_name,
)

__all__ = [
    "BudgetEngine",
    "BudgetService",
    "CommitResult",
    "QuoteResult",
    "ReleaseResult",
    "ReserveResult",
    "TokenEstimate",
    "Usage",
    "deny_message",
    "grant_credits",
    "reason_name",
]
