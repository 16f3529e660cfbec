"""The settler's thread pool: bounded, and a stop never waits for a call stuck on the network."""

from __future__ import annotations

import threading

import pytest

from spendgate.settle.pool import DaemonThreadPool


def test_at_most_max_workers_threads_run_the_calls() -> None:
    pool = DaemonThreadPool(2, name="test-pool")
    release = threading.Event()
    names: set[str] = set()

    def work() -> str:
        names.add(threading.current_thread().name)
        release.wait(10)
        return threading.current_thread().name

    futures = [pool.submit(work) for _ in range(6)]
    release.set()
    assert {f.result(10) for f in futures} <= {"test-pool-0", "test-pool-1"}
    assert all(thread.daemon for thread in threading.enumerate() if thread.name.startswith("test-pool-"))
    pool.shutdown(wait=True)


def test_shutdown_cancels_queued_calls_and_does_not_wait_for_a_running_one() -> None:
    pool = DaemonThreadPool(1, name="stuck-pool")
    started, stuck = threading.Event(), threading.Event()

    def blocked() -> bool:
        started.set()
        return stuck.wait(30)

    running = pool.submit(blocked)
    assert started.wait(10)
    queued = pool.submit(lambda: "never")
    pool.shutdown()  # returns at once although a call is blocked
    assert queued.cancelled() and not running.done()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    stuck.set()
    assert running.result(10) is True
