"""A small, bounded pool of daemon threads for the blocking Stripe SDK calls, so that they never block the event loop.

Why not concurrent.futures.ThreadPoolExecutor: its workers are joined at interpreter exit, so one HTTP request hanging
on a dead network would hold a stopping sidecar for the full request timeout. Abandoning a send is safe here (the
event's identifier is claimed before the first send, so the next start repeats it exactly), so these threads are daemons
and shutdown() never waits for them.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, Final

_STOP: Final = object()


class DaemonThreadPool(concurrent.futures.Executor):
    """At most `max_workers` threads, started with the first submissions, named `<name>-<n>`."""

    def __init__(self, max_workers: int, name: str = "spendgate-settle") -> None:
        assert max_workers >= 1, max_workers
        self._max_workers = max_workers
        self._name = name
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the settlement thread pool is shut down")
            self._work.put((future, fn, args, kwargs))
            if len(self._threads) < self._max_workers:  # simpler than tracking idle workers: at most max_workers
                thread = threading.Thread(target=self._worker, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = True) -> None:
        """Stop taking work; cancel queued work; never wait for a running call unless asked."""
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item[0].cancel()
        for _ in threads:
            self._work.put(_STOP)
        if wait:
            for thread in threads:
                thread.join()

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as error:  # noqa: BLE001 - handed to the awaiting side
                    future.set_exception(error)
                else:
                    future.set_result(result)
