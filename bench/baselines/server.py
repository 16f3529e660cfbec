"""A grpc.aio server of spendgate.v1.Budget and spendgate.v1.Admin over one baseline backend (see __init__.py).

    python -m bench.baselines.server --backend postgres|redis|naive --listen 127.0.0.1:PORT \
        [--dsn postgresql://...] [--redis-url redis://...] [--pool-size N]

The server is built like spendgate's (spendgate.server.app): grpc.aio, the same channel options and concurrency
limit, health (SERVING once the backend is connected), the same Ping handler. It stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.baselines.backends import Backend, BackendError, Balance, make_backend
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

log = logging.getLogger("bench.baselines")

DEFAULT_POOL_SIZE = 32


def _errors(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[type-arg]
        try:
            return await handler(self, request, context)
        except BackendError as error:
            await context.abort(getattr(grpc.StatusCode, error.code), error.message)
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("unexpected error in %s", handler.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the baseline server")

    return wrapper


def balance_message(b: Balance) -> pb.Balance:
    return pb.Balance(
        customer_id=b.customer_id,
        limit=b.limit,
        spent=b.spent,
        reserved=b.reserved,
        remaining=b.remaining,
        active_holds=b.active_holds,
        stripe_customer_id=b.customer_id,
    )


class BudgetServicer(pb_grpc.BudgetServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @_errors
    async def Reserve(self, request: pb.ReserveRequest, context: Any) -> pb.ReserveResponse:
        r = await self._backend.reserve(request.customer_id, request.amount)
        if r.granted:
            return pb.ReserveResponse(
                granted=True,
                reservation_id=r.reservation_id,
                remaining=r.remaining,
                amount=request.amount,
                state=pb.HOLD_STATE_ACTIVE,
            )
        return pb.ReserveResponse(
            granted=False,
            remaining=r.remaining,
            amount=request.amount,
            reason=pb.DENY_REASON_INSUFFICIENT_BUDGET,
            message=f"budget {request.customer_id!r} has {r.remaining} units left",
        )

    @_errors
    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        c = await self._backend.commit(request.reservation_id, request.amount)
        return pb.CommitResponse(
            charged=c.charged,
            remaining=c.remaining,
            over_reserved=c.over_reserved,
            excess=c.excess,
            replayed=c.replayed,
        )

    @_errors
    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        r = await self._backend.release(request.reservation_id)
        return pb.ReleaseResponse(
            released=r.released, remaining=r.remaining, state=pb.HOLD_STATE_RELEASED, replayed=r.replayed
        )

    @_errors
    async def GetBalance(self, request: pb.GetBalanceRequest, context: Any) -> pb.Balance:
        return balance_message(await self._backend.balance(request.customer_id))

    async def Ping(self, request: pb.PingRequest, context: Any) -> pb.PingResponse:
        return pb.PingResponse()


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @_errors
    async def SetBudget(self, request: pb.SetBudgetRequest, context: Any) -> pb.SetBudgetResponse:
        balance, created = await self._backend.set_budget(request.customer_id, request.limit)
        return pb.SetBudgetResponse(balance=balance_message(balance), created=created)

    @_errors
    async def ListBudgets(self, request: pb.ListBudgetsRequest, context: Any) -> pb.ListBudgetsResponse:
        budgets = await self._backend.list_budgets(request.prefix, request.limit or 100)
        return pb.ListBudgetsResponse(budgets=[balance_message(b) for b in budgets])


async def serve(args: argparse.Namespace) -> int:
    backend = make_backend(args.backend, dsn=args.dsn, redis_url=args.redis_url, pool_size=args.pool_size)
    await backend.start()
    # The same options as spendgate.server.app.Sidecar._build_server, so that only the budget check differs.
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=10_000,
    )
    pb_grpc.add_BudgetServicer_to_server(BudgetServicer(backend), server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(backend), server)
    health = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(args.listen)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("baseline %s listening on %s", backend.name, args.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(2)
        await backend.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", required=True, choices=("postgres", "redis", "naive"))
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    ap.add_argument("--dsn", help="Postgres DSN (postgres, naive)")
    ap.add_argument("--redis-url", help="Redis URL (redis)")
    ap.add_argument(
        "--pool-size", type=int, default=DEFAULT_POOL_SIZE, help=f"database connections (default {DEFAULT_POOL_SIZE})"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
