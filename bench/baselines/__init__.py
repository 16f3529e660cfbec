"""The do-it-yourself budget checks that spendgate is compared with, behind the same gRPC front.

Each baseline is a grpc.aio server of the same `spendgate.v1.Budget` service (Reserve, Commit, Release, GetBalance,
Ping) and `spendgate.v1.Admin` (SetBudget, ListBudgets), with the same server options as spendgate's, so that one load
generator drives all four and only the budget check differs:

    python -m bench.baselines.server --backend postgres --dsn postgresql://... --listen 127.0.0.1:PORT
    python -m bench.baselines.server --backend redis    --redis-url redis://...  --listen 127.0.0.1:PORT
    python -m bench.baselines.server --backend naive    --dsn postgresql://...   --listen 127.0.0.1:PORT

- postgres: one statement per Reserve, `UPDATE budgets ... WHERE lim - spent - reserved >= $2` (it takes the budget
  row's lock), chained with the hold's INSERT in one CTE: one round trip, one transaction, one WAL flush.
- redis:    one Lua script per Reserve (EVALSHA): read the budget hash, compare, HINCRBY, create the hold. Redis runs a
  script atomically.
- naive:    the check-then-write most teams write first, on the same Postgres tables: SELECT the remaining units,
  compare in the app, then UPDATE and INSERT, in one READ COMMITTED transaction. Between the SELECT and the UPDATE
  another request can pass the same check: under concurrency it overspends.

The backends implement the budget check and the hold's life cycle, not the whole contract: no TTL expiry, no
idempotency keys (the bench sends none), no durability tickets (each backend's own commit is its durability).
"""
