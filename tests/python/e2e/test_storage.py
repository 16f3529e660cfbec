"""Storage over months of traffic, through real `spendgate serve` processes: the data never fills the map, the writer
never dies for one request's sake, and settled history moves to the archive without losing an entry.

- 200,000 Reserve+Commit pairs through a sidecar started with `--map-size-mb 16`, settling to the fake Stripe: no
  refusal, no restart, the pages holding data stay bounded once settled entries are archived, and the archive plus
  LMDB's ledger hold every committed entry exactly once (and Stripe every unit).
- Open holds fill a small `map_max_mb` until Reserve is refused; then every one of them still commits or releases,
  and settlement acknowledges them all.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from spendgate.ledger_archive import archived_entries, committed_lengths
from spendgate.store_reader import StoreReader
from spendgate.testing.fake_stripe import FakeStripe
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.python.settle._sidecar import create_budgets, wait_drained
from tests.python.settle._support import sidecar_env

MIB = 1 << 20
PAIRS = 200_000
CUSTOMERS = [f"tenant-{n}" for n in range(8)]
CONCURRENCY = 48
# Periods short enough that most of the run's entries are in closed periods before it ends.
PERIOD_MS = 5_000
# What LMDB would hold without the archive: the issue measured about 769 bytes a pair before settlement, more after.
UNARCHIVED_BYTES = PAIRS * 769
# Hang guards, not timing assertions.
ARCHIVE_DEADLINE_S = 240.0
PRUNE_DEADLINE_S = 150.0
RPC_TIMEOUT_S = 30.0


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(customers=[f"cus_{c}" for c in CUSTOMERS] + ["cus_fill"], same_host=True) as running:
        yield running


def metric(http_url: str, name: str) -> float:
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def fixed_periods(target: str) -> None:
    now_ms = time.time_ns() // 1_000_000
    channel = grpc.insecure_channel(target)
    with channel:
        admin = pb_grpc.AdminStub(channel)
        for customer in CUSTOMERS:
            period = pb.Period(kind=pb.PERIOD_KIND_FIXED, start_ms=now_ms, end_ms=now_ms + PERIOD_MS)
            admin.SetBudget(
                pb.SetBudgetRequest(
                    customer_id=customer, limit=10**15, stripe_customer_id=f"cus_{customer}", period=period
                ),
                timeout=RPC_TIMEOUT_S,
            )


async def serve_pairs(target: str, pairs: int) -> tuple[int, list[str]]:
    """`pairs` Reserve+Commit pairs from CONCURRENCY tasks; (units committed, problems seen)."""
    problems: list[str] = []
    committed = 0
    next_pair = iter(range(pairs))
    async with grpc.aio.insecure_channel(target) as channel:
        budget = pb_grpc.BudgetStub(channel)

        async def worker() -> None:
            nonlocal committed
            for n in next_pair:
                amount = 1 + n % 7
                customer = CUSTOMERS[n % len(CUSTOMERS)]
                reply = await budget.Reserve(
                    pb.ReserveRequest(customer_id=customer, amount=amount), timeout=RPC_TIMEOUT_S
                )
                if not reply.granted:
                    problems.append(f"pair {n}: denied {reply}")
                    continue
                await budget.Commit(
                    pb.CommitRequest(reservation_id=reply.reservation_id, amount=amount), timeout=RPC_TIMEOUT_S
                )
                committed += amount

        results = await asyncio.gather(*(worker() for _ in range(CONCURRENCY)), return_exceptions=True)
    problems += [repr(result) for result in results if isinstance(result, BaseException)]
    return committed, problems


def books(data_dir: Path) -> tuple[list[dict], list[dict]]:
    """(LMDB's ledger, the archive's committed entries), read in the order that misses nothing (ledger_archive)."""
    with StoreReader(data_dir) as store:
        ledger = list(store.ledger())
        lengths = committed_lengths(store.meta())
    return ledger, list(archived_entries(data_dir, lengths))


def test_200k_pairs_on_a_16_mib_map_settle_archive_and_stay_bounded(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    env = sidecar_env(fake, ledger_retention_days=0, resolved_retention_ms=1_000)
    sidecar = sidecar_factory("months", env=env, http=True, extra_args=("--map-size-mb", "16"))
    fixed_periods(sidecar.target)
    pid = sidecar.pid

    committed, problems = asyncio.run(serve_pairs(sidecar.target, PAIRS))
    assert problems == [], problems[:5]
    assert sidecar.running and sidecar.pid == pid, "the sidecar restarted"

    time.sleep(PERIOD_MS / 1000)  # the run's last periods close
    wait_drained(sidecar.target, deadline_s=ARCHIVE_DEADLINE_S)
    deadline = time.monotonic() + ARCHIVE_DEADLINE_S
    while True:  # the reaper archives a closed, settled period's entries on its next prune pass
        ledger, archived = books(sidecar.data_dir)
        if len(ledger) == 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    seqs = [entry["seq"] for entry in ledger + archived]
    assert len(seqs) == PAIRS and len(set(seqs)) == PAIRS, (len(seqs), len(set(seqs)))
    assert len({entry["reservation_id"] for entry in ledger + archived}) == PAIRS
    assert sum(entry["amount"] for entry in ledger + archived) == committed
    assert len(ledger) == 0, f"{len(ledger)} settled entries of closed periods still in LMDB"
    assert sum(fake.totals_by_customer().values()) == committed

    # Resolved holds go on their retention's next prune sweep (one every prune interval, 60 s): wait for it.
    deadline = time.monotonic() + PRUNE_DEADLINE_S
    while (used_bytes := metric(sidecar.http_url, "spendgate_lmdb_map_used_bytes")) >= 16 * MIB:
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    size_bytes = metric(sidecar.http_url, "spendgate_lmdb_map_size_bytes")
    assert used_bytes < 16 * MIB < UNARCHIVED_BYTES, f"{used_bytes / MIB:.1f} MiB of pages hold data"
    assert size_bytes < UNARCHIVED_BYTES, f"the map grew to {size_bytes / MIB:.0f} MiB"
    assert sidecar.running and sidecar.pid == pid, "the sidecar restarted"


def widest_dimensions(n: int) -> dict[str, str]:
    return {f"k{k:02d}-{'x' * 58}": f"{n:012d}-{k:02d}-{'v' * 111}" for k in range(16)}


def test_open_holds_fill_map_max_mb_and_every_one_still_commits_or_releases(
    sidecar_factory: SidecarFactory, fake: FakeStripe
) -> None:
    sidecar = sidecar_factory("fill", env=sidecar_env(fake), extra_args=("--map-size-mb", "8", "--map-max-mb", "48"))
    create_budgets(sidecar.target, {"fill": "cus_fill"}, limit=10**15)
    holds: list[str] = []
    refusal = None
    channel = grpc.insecure_channel(sidecar.target)
    with channel:
        budget = pb_grpc.BudgetStub(channel)
        for n in range(20_000):  # a hang guard: the refusal comes far earlier
            try:
                reply = budget.Reserve(
                    pb.ReserveRequest(
                        customer_id="fill", amount=1 + n % 5, ttl_ms=3_600_000, dimensions=widest_dimensions(n)
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
            except grpc.RpcError as error:
                refusal = error
                break
            assert reply.granted, reply
            holds.append(reply.reservation_id)
        assert refusal is not None, "20,000 widest holds fitted in 48 MiB"
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
        assert "map_max_mb" in (refusal.details() or ""), refusal.details()
        assert len(holds) > 500, len(holds)  # (48 MiB - 16 MiB slack) / 40 KiB a hold is about 800
        committed = 0
        for n, reservation_id in enumerate(holds):
            if n % 2:
                budget.Release(pb.ReleaseRequest(reservation_id=reservation_id), timeout=RPC_TIMEOUT_S)
                continue
            amount = 1 + n % 5
            budget.Commit(
                pb.CommitRequest(reservation_id=reservation_id, amount=amount, dimensions=widest_dimensions(n)),
                timeout=RPC_TIMEOUT_S,
            )
            committed += amount
        balance = budget.GetBalance(pb.GetBalanceRequest(customer_id="fill"), timeout=RPC_TIMEOUT_S)
    assert (balance.spent, balance.reserved) == (committed, 0), balance
    wait_drained(sidecar.target)
    assert fake.totals_by_customer() == {"cus_fill": committed}
    assert sidecar.running, "the writer died"
