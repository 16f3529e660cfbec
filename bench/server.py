"""Start the real sidecar (a separate process, on a temp data dir) and create the budgets the load runs against."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

# The largest limit the contract allows (2**53): the load must never be denied for lack of budget.
HUGE_LIMIT_UNITS = 2**53


REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RunningServer:
    target: str
    pid: int
    how: str  # "spendgate.testing.sidecar.Sidecar" or "subprocess"
    log_path: str


@contextlib.contextmanager
def sidecar(data_dir: Path, extra_args: Sequence[str] = ()) -> Iterator[RunningServer]:
    """`python -m spendgate serve` on `data_dir`, on a free loopback port, stopped (SIGTERM) on exit.

    Uses spendgate.testing.sidecar.Sidecar (health-checked start, log next to the data dir); falls back to a plain
    subprocess when that helper is not there."""
    try:
        from spendgate.testing import sidecar as helper  # noqa: PLC0415
    except ImportError:
        with _plain_subprocess(data_dir, extra_args) as running:
            yield running
        return
    with helper.Sidecar(data_dir, extra_args=list(extra_args)) as sc:
        yield RunningServer(sc.target, sc.pid, "spendgate.testing.sidecar.Sidecar", str(sc.log_path))


@contextlib.contextmanager
def _plain_subprocess(data_dir: Path, extra_args: Sequence[str]) -> Iterator[RunningServer]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = f"127.0.0.1:{port}"
    log_path = data_dir.parent / f"{data_dir.name}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spendgate", "serve", "--data-dir", str(data_dir), "--listen", target, *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_serving(target, timeout_s=30, proc=proc)
        yield RunningServer(target, proc.pid, "subprocess", str(log_path))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def baseline(
    backend: str, log_path: Path, *, dsn: str | None = None, redis_url: str | None = None, pool_size: int | None = None
) -> Iterator[RunningServer]:
    """`python -m bench.baselines.server --backend BACKEND` on a free loopback port, stopped (SIGTERM) on exit."""
    from bench import services  # noqa: PLC0415

    target = f"127.0.0.1:{services.free_port()}"
    argv = [sys.executable, "-m", "bench.baselines.server", "--backend", backend, "--listen", target]
    if dsn:
        argv += ["--dsn", dsn]
    if redis_url:
        argv += ["--redis-url", redis_url]
    if pool_size:
        argv += ["--pool-size", str(pool_size)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    services.track(proc)
    try:
        wait_serving(target, timeout_s=60, proc=proc)
        yield RunningServer(target, proc.pid, f"bench.baselines.server --backend {backend}", str(log_path))
    finally:
        services.untrack(proc)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_serving(target: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"spendgate serve exited with code {proc.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"spendgate at {target} not SERVING within {timeout_s} s")
            time.sleep(0.05)


def customer_ids(count: int) -> list[str]:
    return [f"bench-{i:05d}" for i in range(count)]


# SetBudget calls in flight at once while creating the bench budgets.
CREATE_WINDOW = 200


def create_budgets(target: str, customers: Sequence[str], limit: int = HUGE_LIMIT_UNITS) -> None:
    """SetBudget(limit) for every customer, through the Admin service (the same path an operator uses)."""
    with grpc.insecure_channel(target) as channel:
        admin = pb_grpc.AdminStub(channel)
        # Issue a window of them, then wait: each SetBudget waits for its own fsync, and the writer batches concurrent
        # ones. The window stays under the server's per-connection stream limit (max_concurrent_streams).
        for start in range(0, len(customers), CREATE_WINDOW):
            futures = [
                admin.SetBudget.future(pb.SetBudgetRequest(customer_id=c, limit=limit), timeout=30)
                for c in customers[start : start + CREATE_WINDOW]
            ]
            for future in futures:
                future.result()


def total_spent_and_reserved(target: str, customers: Sequence[str]) -> tuple[int, int]:
    """Sum of spent and of reserved over the bench budgets (a consistency check after the load)."""
    with grpc.insecure_channel(target) as channel:
        budget = pb_grpc.BudgetStub(channel)
        balances = []
        for start in range(0, len(customers), CREATE_WINDOW):
            futures = [
                budget.GetBalance.future(pb.GetBalanceRequest(customer_id=c), timeout=30)
                for c in customers[start : start + CREATE_WINDOW]
            ]
            balances += [f.result() for f in futures]
    return sum(b.spent for b in balances), sum(b.reserved for b in balances)
