"""spendgate.testing.Sidecar: real server processes, crashed and restarted on the same data dir."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from spendgate.client import Client
from spendgate.testing import Sidecar, SidecarError

SidecarFactory = Callable[..., Sidecar]

# Long enough that no hold expires while a test restarts the server, however slow the machine.
LONG_TTL_MS = 3_600_000


def test_kill9_then_restart_keeps_budgets_spend_and_open_holds(sidecar: Sidecar, unique_customer: str) -> None:
    with Client(sidecar.target) as client:
        client.set_budget(unique_customer, 1_000)
        committed = client.reserve(unique_customer, amount=300)
        committed.commit(200)
        open_hold = client.reserve(unique_customer, amount=100, ttl_ms=LONG_TTL_MS)
        before = client.balance(unique_customer)
    old_pid, target = sidecar.pid, sidecar.target

    assert sidecar.kill9() == -9
    sidecar.restart()

    assert sidecar.pid != old_pid and sidecar.target == target
    with Client(sidecar.target) as client:
        after = client.balance(unique_customer)
        assert after == before
        assert (after.limit, after.spent, after.reserved, after.active_holds) == (1_000, 200, 100, 1)
        client.commit(open_hold.reservation_id, 100)  # the hold survived the crash
        assert client.balance(unique_customer).spent == 300
        # Commit and Release retries are keyed by reservation_id, so ids must never be handed out twice.
        fresh = client.reserve(unique_customer, amount=1)
        assert fresh.reservation_id not in {committed.reservation_id, open_hold.reservation_id}
        fresh.release()


def test_a_client_reconnects_to_a_restarted_sidecar(sidecar: Sidecar, unique_customer: str) -> None:
    with Client(sidecar.target) as client:
        client.set_budget(unique_customer, 1_000)
        hold = client.reserve(unique_customer, amount=100, ttl_ms=LONG_TTL_MS)
        sidecar.kill9()
        sidecar.restart()
        hold.commit(100)  # Commit is retried on UNAVAILABLE while the channel reconnects
        assert client.balance(unique_customer).spent == 100


def test_terminate_drains_and_exits_zero(sidecar: Sidecar) -> None:
    pid = sidecar.pid
    assert sidecar.terminate() == 0
    assert not sidecar.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


def test_context_manager_always_stops_the_process(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with Sidecar(tmp_path / "data") as sidecar:
            pid = sidecar.pid
            with Client(sidecar.target) as client:
                client.ping()
            raise KeyError("the test body failed")
    assert not sidecar.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_start_failure_raises_with_the_log_tail(sidecar_factory: SidecarFactory) -> None:
    broken = sidecar_factory("broken", start=False, extra_args=["--no-such-flag"])
    with pytest.raises(SidecarError) as err:
        broken.start()
    assert "--no-such-flag" in str(err.value)  # the CLI's complaint, read from the log
    assert not broken.running


def test_log_is_next_to_the_data_dir_and_kept_across_restarts(sidecar_factory: SidecarFactory, tmp_path: Path) -> None:
    sidecar = sidecar_factory("logged")
    sidecar.restart()
    assert sidecar.log_path == tmp_path / "logged.log"
    assert "sidecar start #1" in sidecar.log_tail(1_000)
    assert "sidecar start #2" in sidecar.log_tail(1_000)
