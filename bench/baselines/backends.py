"""The three baseline backends: Postgres (a guarded UPDATE), Redis (a Lua script), naive (check, then write).

Every method returns plain tuples/dicts; the gRPC servicer in server.py converts them. A bad request raises
BackendError with the gRPC status name that spendgate would answer with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

RESERVATION_PREFIX = "rsv_"

HOLD_ACTIVE, HOLD_COMMITTED, HOLD_RELEASED = 1, 2, 3  # spendgate.v1.HoldState numbers


class BackendError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code  # a grpc.StatusCode name: NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION
        self.message = message


@dataclass
class Balance:
    customer_id: str
    limit: int
    spent: int
    reserved: int
    active_holds: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.spent - self.reserved)


@dataclass
class Reserved:
    granted: bool
    reservation_id: str
    remaining: int


@dataclass
class Committed:
    charged: int
    remaining: int
    over_reserved: bool
    excess: int
    replayed: bool


@dataclass
class Released:
    released: bool
    remaining: int
    replayed: bool


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def set_budget(self, customer_id: str, limit: int) -> tuple[Balance, bool]: ...
    async def reserve(self, customer_id: str, amount: int) -> Reserved: ...
    async def commit(self, reservation_id: str, amount: int) -> Committed: ...
    async def release(self, reservation_id: str) -> Released: ...
    async def balance(self, customer_id: str) -> Balance: ...
    async def list_budgets(self, prefix: str, limit: int) -> list[Balance]: ...


def _check_amount(name: str, amount: int) -> None:
    if amount < 0 or amount > 2**53:
        raise BackendError("INVALID_ARGUMENT", f"{name} is {amount}; it must be in 0..=2^53")


def _check_id(name: str, value: str) -> None:
    if not value or len(value.encode()) > 128:
        raise BackendError("INVALID_ARGUMENT", f"{name} must be 1..128 bytes")


def parse_reservation_id(reservation_id: str) -> int:
    if not reservation_id.startswith(RESERVATION_PREFIX) or not reservation_id[len(RESERVATION_PREFIX) :].isdigit():
        raise BackendError("INVALID_ARGUMENT", f"reservation_id {reservation_id!r} is not one this server issued")
    return int(reservation_id[len(RESERVATION_PREFIX) :])


# ---------------------------------------------------------------------------------------------------------------------
# Postgres

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    customer_id  text   PRIMARY KEY,
    lim          bigint NOT NULL,
    spent        bigint NOT NULL DEFAULT 0,
    reserved     bigint NOT NULL DEFAULT 0,
    active_holds bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS holds (
    id          bigserial PRIMARY KEY,
    customer_id text     NOT NULL,
    amount      bigint   NOT NULL,
    state       smallint NOT NULL DEFAULT 1,
    committed   bigint
);
"""

# The reservation: one statement. The UPDATE's WHERE re-checks the guard on the locked, current row version, so two
# concurrent reservations can never both pass on the same units.
PG_RESERVE = """
WITH b AS (
    UPDATE budgets SET reserved = reserved + $2, active_holds = active_holds + 1
    WHERE customer_id = $1 AND lim - spent - reserved >= $2
    RETURNING customer_id, lim - spent - reserved AS remaining
)
INSERT INTO holds (customer_id, amount) SELECT customer_id, $2 FROM b
RETURNING id, (SELECT remaining FROM b)
"""

PG_COMMIT = """
WITH h AS (
    UPDATE holds SET state = 2, committed = $2 WHERE id = $1 AND state = 1
    RETURNING customer_id, amount
)
UPDATE budgets b SET reserved = b.reserved - h.amount, spent = b.spent + $2, active_holds = b.active_holds - 1
FROM h WHERE b.customer_id = h.customer_id
RETURNING b.lim - b.spent - b.reserved AS remaining, h.amount
"""

PG_RELEASE = """
WITH h AS (
    UPDATE holds SET state = 3 WHERE id = $1 AND state = 1 RETURNING customer_id, amount
)
UPDATE budgets b SET reserved = b.reserved - h.amount, active_holds = b.active_holds - 1
FROM h WHERE b.customer_id = h.customer_id
RETURNING b.lim - b.spent - b.reserved AS remaining
"""

PG_SET_BUDGET = """
INSERT INTO budgets (customer_id, lim) VALUES ($1, $2)
ON CONFLICT (customer_id) DO UPDATE SET lim = EXCLUDED.lim
RETURNING customer_id, lim, spent, reserved, active_holds, (xmax = 0) AS created
"""

PG_BALANCE = "SELECT customer_id, lim, spent, reserved, active_holds FROM budgets WHERE customer_id = $1"


def _balance(row: Any) -> Balance:
    return Balance(row["customer_id"], row["lim"], row["spent"], row["reserved"], row["active_holds"])


class PostgresBackend:
    """Guarded UPDATE, as the issue describes: `UPDATE ... WHERE limit - spent - reserved >= $1`."""

    name = "postgres"

    def __init__(self, dsn: str, pool_size: int) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._pool: Any = None

    async def start(self) -> None:
        import asyncpg  # noqa: PLC0415

        self._pool = await asyncpg.create_pool(self._dsn, min_size=self._pool_size, max_size=self._pool_size)
        async with self._pool.acquire() as conn:
            await conn.execute(SCHEMA)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def set_budget(self, customer_id: str, limit: int) -> tuple[Balance, bool]:
        _check_id("customer_id", customer_id)
        _check_amount("limit", limit)
        row = await self._pool.fetchrow(PG_SET_BUDGET, customer_id, limit)
        return _balance(row), bool(row["created"])

    async def balance(self, customer_id: str) -> Balance:
        _check_id("customer_id", customer_id)
        row = await self._pool.fetchrow(PG_BALANCE, customer_id)
        if row is None:
            raise BackendError("NOT_FOUND", f"no budget for customer {customer_id!r}")
        return _balance(row)

    async def list_budgets(self, prefix: str, limit: int) -> list[Balance]:
        rows = await self._pool.fetch(
            "SELECT customer_id, lim, spent, reserved, active_holds FROM budgets WHERE starts_with(customer_id, $1) "
            "ORDER BY customer_id LIMIT $2",
            prefix,
            limit,
        )
        return [_balance(r) for r in rows]

    async def reserve(self, customer_id: str, amount: int) -> Reserved:
        _check_id("customer_id", customer_id)
        _check_amount("amount", amount)
        row = await self._pool.fetchrow(PG_RESERVE, customer_id, amount)
        if row is not None:
            return Reserved(True, f"{RESERVATION_PREFIX}{row[0]}", max(0, row[1]))
        return Reserved(False, "", (await self.balance(customer_id)).remaining)  # denied (or NOT_FOUND)

    async def commit(self, reservation_id: str, amount: int) -> Committed:
        hold_id = parse_reservation_id(reservation_id)
        _check_amount("amount", amount)
        row = await self._pool.fetchrow(PG_COMMIT, hold_id, amount)
        if row is not None:
            remaining, held = row[0], row[1]
            return Committed(amount, max(0, remaining), amount > held, max(0, -remaining), False)
        return await self._not_active_commit(hold_id, amount)

    async def _not_active_commit(self, hold_id: int, amount: int) -> Committed:
        hold = await self._pool.fetchrow("SELECT customer_id, state, committed FROM holds WHERE id = $1", hold_id)
        if hold is None:
            raise BackendError("NOT_FOUND", f"no reservation {RESERVATION_PREFIX}{hold_id}")
        if hold["state"] == HOLD_COMMITTED and hold["committed"] == amount:
            balance = await self.balance(hold["customer_id"])
            return Committed(amount, balance.remaining, False, 0, True)
        raise BackendError("FAILED_PRECONDITION", f"reservation {RESERVATION_PREFIX}{hold_id} is already settled")

    async def release(self, reservation_id: str) -> Released:
        hold_id = parse_reservation_id(reservation_id)
        row = await self._pool.fetchrow(PG_RELEASE, hold_id)
        if row is not None:
            return Released(True, max(0, row[0]), False)
        hold = await self._pool.fetchrow("SELECT customer_id, state FROM holds WHERE id = $1", hold_id)
        if hold is None:
            raise BackendError("NOT_FOUND", f"no reservation {reservation_id}")
        if hold["state"] == HOLD_RELEASED:
            return Released(True, (await self.balance(hold["customer_id"])).remaining, True)
        raise BackendError("FAILED_PRECONDITION", f"reservation {reservation_id} is already committed")


class NaiveBackend(PostgresBackend):
    """Check, then write: SELECT the remaining units, compare in Python, then UPDATE + INSERT. The transaction (READ
    COMMITTED, Postgres's default) does not make this safe: the SELECT takes no lock, so concurrent requests pass the
    same check before any of them writes."""

    name = "naive"

    async def reserve(self, customer_id: str, amount: int) -> Reserved:
        _check_id("customer_id", customer_id)
        _check_amount("amount", amount)
        async with self._pool.acquire() as conn, conn.transaction():
            remaining = await conn.fetchval(
                "SELECT lim - spent - reserved FROM budgets WHERE customer_id = $1", customer_id
            )
            if remaining is None:
                raise BackendError("NOT_FOUND", f"no budget for customer {customer_id!r}")
            if remaining < amount:
                return Reserved(False, "", max(0, remaining))
            await conn.execute(
                "UPDATE budgets SET reserved = reserved + $2, active_holds = active_holds + 1 WHERE customer_id = $1",
                customer_id,
                amount,
            )
            hold_id = await conn.fetchval(
                "INSERT INTO holds (customer_id, amount) VALUES ($1, $2) RETURNING id", customer_id, amount
            )
        return Reserved(True, f"{RESERVATION_PREFIX}{hold_id}", max(0, remaining - amount))


# ---------------------------------------------------------------------------------------------------------------------
# Redis

# KEYS[1] budget hash, KEYS[2] hold id sequence; ARGV[1] amount, ARGV[2] customer_id.
# Returns {-1} unknown budget, {0, remaining} denied, {1, remaining, hold_id} granted.
LUA_RESERVE = """
local v = redis.call('HMGET', KEYS[1], 'limit', 'spent', 'reserved')
if not v[1] then return {-1} end
local amount = tonumber(ARGV[1])
local remaining = tonumber(v[1]) - tonumber(v[2]) - tonumber(v[3])
if remaining < amount then return {0, remaining} end
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('HINCRBY', KEYS[1], 'active_holds', 1)
local id = redis.call('INCR', KEYS[2])
redis.call('HSET', 'hold:' .. id, 'customer', ARGV[2], 'amount', amount, 'state', 1)
return {1, remaining - amount, id}
"""

# KEYS[1] hold hash; ARGV[1] amount. Returns {-1} unknown, {-2, state, committed} not active,
# {1, remaining, held} committed.
LUA_COMMIT = """
local h = redis.call('HMGET', KEYS[1], 'customer', 'amount', 'state', 'committed')
if not h[1] then return {-1} end
if tonumber(h[3]) ~= 1 then return {-2, tonumber(h[3]), tonumber(h[4] or -1)} end
local amount = tonumber(ARGV[1])
local held = tonumber(h[2])
redis.call('HSET', KEYS[1], 'state', 2, 'committed', amount)
local b = 'budget:' .. h[1]
redis.call('HINCRBY', b, 'reserved', -held)
redis.call('HINCRBY', b, 'active_holds', -1)
local spent = redis.call('HINCRBY', b, 'spent', amount)
local v = redis.call('HMGET', b, 'limit', 'reserved')
return {1, tonumber(v[1]) - spent - tonumber(v[2]), held}
"""

# KEYS[1] hold hash. Returns {-1} unknown, {-2, state} not active, {1, remaining} released.
LUA_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'customer', 'amount', 'state')
if not h[1] then return {-1} end
if tonumber(h[3]) ~= 1 then return {-2, tonumber(h[3])} end
redis.call('HSET', KEYS[1], 'state', 3)
local b = 'budget:' .. h[1]
local reserved = redis.call('HINCRBY', b, 'reserved', -tonumber(h[2]))
redis.call('HINCRBY', b, 'active_holds', -1)
local v = redis.call('HMGET', b, 'limit', 'spent')
return {1, tonumber(v[1]) - tonumber(v[2]) - reserved}
"""

# KEYS[1] budget hash; ARGV[1] limit. Returns 1 when created.
LUA_SET_BUDGET = """
local created = redis.call('HSETNX', KEYS[1], 'spent', 0)
if created == 1 then redis.call('HSET', KEYS[1], 'reserved', 0, 'active_holds', 0) end
redis.call('HSET', KEYS[1], 'limit', ARGV[1])
return created
"""


class RedisBackend:
    """One Lua script per Reserve (EVALSHA through redis-py's Script, which loads it on first use)."""

    name = "redis"

    def __init__(self, url: str, pool_size: int) -> None:
        self._url = url
        self._pool_size = pool_size
        self._redis: Any = None

    async def start(self) -> None:
        import redis.asyncio as aredis  # noqa: PLC0415

        pool = aredis.BlockingConnectionPool.from_url(self._url, max_connections=self._pool_size, timeout=30)
        self._redis = aredis.Redis(connection_pool=pool)
        await self._redis.ping()
        self._reserve = self._redis.register_script(LUA_RESERVE)
        self._commit = self._redis.register_script(LUA_COMMIT)
        self._release = self._redis.register_script(LUA_RELEASE)
        self._set_budget = self._redis.register_script(LUA_SET_BUDGET)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    @staticmethod
    def _key(customer_id: str) -> str:
        return f"budget:{customer_id}"

    async def set_budget(self, customer_id: str, limit: int) -> tuple[Balance, bool]:
        _check_id("customer_id", customer_id)
        _check_amount("limit", limit)
        created = await self._set_budget(keys=[self._key(customer_id)], args=[limit])
        return await self.balance(customer_id), bool(created)

    async def balance(self, customer_id: str) -> Balance:
        _check_id("customer_id", customer_id)
        v = await self._redis.hmget(self._key(customer_id), "limit", "spent", "reserved", "active_holds")
        if v[0] is None:
            raise BackendError("NOT_FOUND", f"no budget for customer {customer_id!r}")
        return Balance(customer_id, *(int(x) for x in v))

    async def list_budgets(self, prefix: str, limit: int) -> list[Balance]:
        names = sorted([k.decode()[len("budget:") :] async for k in self._redis.scan_iter(match=f"budget:{prefix}*")])
        return [await self.balance(name) for name in names[:limit]]

    async def reserve(self, customer_id: str, amount: int) -> Reserved:
        _check_id("customer_id", customer_id)
        _check_amount("amount", amount)
        r = await self._reserve(keys=[self._key(customer_id), "hold:seq"], args=[amount, customer_id])
        if r[0] == -1:
            raise BackendError("NOT_FOUND", f"no budget for customer {customer_id!r}")
        if r[0] == 0:
            return Reserved(False, "", max(0, r[1]))
        return Reserved(True, f"{RESERVATION_PREFIX}{r[2]}", max(0, r[1]))

    async def commit(self, reservation_id: str, amount: int) -> Committed:
        hold_id = parse_reservation_id(reservation_id)
        _check_amount("amount", amount)
        r = await self._commit(keys=[f"hold:{hold_id}"], args=[amount])
        if r[0] == -1:
            raise BackendError("NOT_FOUND", f"no reservation {reservation_id}")
        if r[0] == -2:
            if r[1] == HOLD_COMMITTED and r[2] == amount:
                return Committed(amount, 0, False, 0, True)
            raise BackendError("FAILED_PRECONDITION", f"reservation {reservation_id} is already settled")
        remaining, held = r[1], r[2]
        return Committed(amount, max(0, remaining), amount > held, max(0, -remaining), False)

    async def release(self, reservation_id: str) -> Released:
        hold_id = parse_reservation_id(reservation_id)
        r = await self._release(keys=[f"hold:{hold_id}"])
        if r[0] == -1:
            raise BackendError("NOT_FOUND", f"no reservation {reservation_id}")
        if r[0] == -2:
            if r[1] == HOLD_RELEASED:
                return Released(True, 0, True)
            raise BackendError("FAILED_PRECONDITION", f"reservation {reservation_id} is already committed")
        return Released(True, max(0, r[1]), False)


def make_backend(name: str, *, dsn: str | None, redis_url: str | None, pool_size: int) -> Backend:
    if name in ("postgres", "naive"):
        if not dsn:
            raise SystemExit(f"--backend {name} needs --dsn")
        return PostgresBackend(dsn, pool_size) if name == "postgres" else NaiveBackend(dsn, pool_size)
    if name == "redis":
        if not redis_url:
            raise SystemExit("--backend redis needs --redis-url")
        return RedisBackend(redis_url, pool_size)
    raise SystemExit(f"unknown backend {name!r}")
