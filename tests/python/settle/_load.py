"""Commit load against a sidecar that may be killed with kill -9 at any moment, with exact bookkeeping.

Each thread reserves, then commits. A Commit whose reply does not come (the sidecar died) is retried with the same
reservation id until it is acknowledged (Commit is idempotent per reservation), so when the load has stopped,
`acked` is exactly what the sidecar has committed: the ledger, by customer.

With `token_share`, that share of the calls reserve a token estimate and commit token usage instead (priced by the
sidecar's bundled table for TOKEN_MODEL): `acked` still has their units, `acked_plain` only the plain ones (what the
units meter must sum to), and `acked_tokens` the tokens per (customer, token_type) the token meter must sum to.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from typing import Final

import grpc

from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc

RPC_TIMEOUT_S: Final[float] = 5.0
LONG_TTL_MS: Final[int] = 600_000
RETRY_PAUSE_S: Final[float] = 0.05
TOKEN_MODEL: Final[str] = "gpt-6-sol"
# The codes a dying or restarting sidecar produces; anything else is a bug and fails the test.
TRANSIENT: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
)
CHANNEL_OPTIONS: Final = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
)


def stubs(target: str) -> tuple[grpc.Channel, pb_grpc.BudgetStub, pb_grpc.AdminStub]:
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    return channel, pb_grpc.BudgetStub(channel), pb_grpc.AdminStub(channel)


def call_until_ok(fn, request, deadline_s: float = 60.0):  # type: ignore[no-untyped-def]
    """fn(request), retried through a restart until it answers (bounded by deadline_s)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return fn(request, timeout=RPC_TIMEOUT_S, wait_for_ready=True)
        except grpc.RpcError as error:
            if error.code() not in TRANSIENT or time.monotonic() > deadline:
                raise
            time.sleep(RETRY_PAUSE_S)


class CommitLoad:
    def __init__(
        self,
        target: str,
        customers: Sequence[str],
        *,
        threads: int = 4,
        pause_s: float = 0.01,
        seed: int = 0,
        token_share: float = 0.0,
    ) -> None:
        self.target = target
        self.customers = list(customers)
        self.acked: dict[str, int] = {c: 0 for c in customers}
        self.acked_plain: dict[str, int] = {c: 0 for c in customers}
        self.acked_tokens: dict[tuple[str, str], int] = {}
        self._token_share = token_share
        self.acked_reservations: list[str] = []  # in the order their commits were acknowledged
        self.commits = 0
        self.errors: list[BaseException] = []
        self._pause_s = pause_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(seed * 1000 + i,), name=f"load-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> CommitLoad:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop and wait: every thread finishes (acknowledges) the commit it is in."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), f"{thread.name} did not finish its commit within {timeout_s} s"
        if self.errors:
            raise AssertionError(f"the load saw unexpected errors: {self.errors[:3]}")

    @staticmethod
    def _reserve(
        budget: pb_grpc.BudgetStub, customer: str, rng: random.Random, tokens: bool
    ) -> pb.ReserveResponse | None:
        """A Reserve, or None when the sidecar died under it (the hold may exist: never committed, never billed)."""
        if tokens:
            estimate = pb.TokenEstimate(model=TOKEN_MODEL, input_tokens=1_000, max_output_tokens=200)
            request = pb.ReserveRequest(customer_id=customer, estimate=estimate, ttl_ms=LONG_TTL_MS)
        else:
            request = pb.ReserveRequest(customer_id=customer, amount=rng.randint(1, 50), ttl_ms=LONG_TTL_MS)
        try:
            return budget.Reserve(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as error:
            if error.code() not in TRANSIENT:
                raise
            time.sleep(RETRY_PAUSE_S)
            return None

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        channel, budget, _ = stubs(self.target)
        try:
            while not self._stop.is_set():
                customer = rng.choice(self.customers)
                tokens = rng.random() < self._token_share
                reply = self._reserve(budget, customer, rng, tokens)
                if reply is None or not reply.granted:
                    continue
                if tokens:
                    usage = pb.TokenUsage(
                        input_tokens=rng.randint(0, 900),
                        cached_input_tokens=rng.randint(0, 100),
                        output_tokens=rng.randint(0, 180),
                        reasoning_tokens=rng.randint(0, 20),
                    )
                    request = pb.CommitRequest(reservation_id=reply.reservation_id, usage=usage)
                else:
                    request = pb.CommitRequest(reservation_id=reply.reservation_id, amount=rng.randint(0, reply.amount))
                committed = call_until_ok(budget.Commit, request)
                with self._lock:
                    self.acked[customer] += committed.charged
                    if tokens:
                        for token_type, count in (
                            ("input", usage.input_tokens),
                            ("cached_input", usage.cached_input_tokens),
                            ("output", usage.output_tokens + usage.reasoning_tokens),
                        ):
                            key = (customer, token_type)
                            self.acked_tokens[key] = self.acked_tokens.get(key, 0) + count
                    else:
                        self.acked_plain[customer] += committed.charged
                    self.acked_reservations.append(reply.reservation_id)
                    self.commits += 1
                time.sleep(self._pause_s)
        except BaseException as error:  # noqa: BLE001 - reported by stop()
            self.errors.append(error)
        finally:
            channel.close()
