"""Run a real spendgate sidecar in a child process, for tests (yours and ours).

    with Sidecar(tmp_path / "data") as sidecar:          # starts, waits for health SERVING, always stops
        client = Client(sidecar.target)
        ...
        sidecar.kill9(); sidecar.restart()               # crash and recover on the same data dir and port

The child runs `python -m spendgate serve --data-dir DIR --listen 127.0.0.1:PORT`, with stdout and stderr appended to
`<data_dir>.log` next to the data dir (kept across restarts, so a failure can show what happened: `log_tail()`).
Every child is killed when its Sidecar is stopped, garbage-collected, or when the interpreter exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["Sidecar", "SidecarError"]

DEFAULT_START_TIMEOUT_S: Final[float] = 30.0
DEFAULT_STOP_TIMEOUT_S: Final[float] = 15.0
_HEALTH_POLL_INTERVAL_S: Final[float] = 0.05
_HEALTH_CALL_TIMEOUT_S: Final[float] = 1.0
_LOG_TAIL_LINES: Final[int] = 40

# The directory that holds the spendgate package this process imported. The child gets it first on PYTHONPATH so it
# runs the same code even when spendgate is not installed (e.g. a checkout with only `python/` on sys.path).
_PACKAGE_ROOT: Final[Path] = Path(__file__).resolve().parents[2]

# Ports handed out by this process and not yet released: the kernel may hand a just-closed port 0 to the next
# bind(0), and two sidecars must never race for one port.
_claimed_ports: set[int] = set()
_claimed_ports_lock = threading.Lock()


class SidecarError(RuntimeError):
    """The sidecar failed to start or stop; the message ends with the tail of its log."""


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        with _claimed_ports_lock:
            if port not in _claimed_ports:
                _claimed_ports.add(port)
                return port


def _release_port(port: int) -> None:
    with _claimed_ports_lock:
        _claimed_ports.discard(port)


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup (also run by weakref.finalize at GC and interpreter exit): SIGKILL and reap."""
    if process.poll() is None:
        process.kill()
        process.wait()


STRIPE_ENV_PREFIX: Final[str] = "STRIPE_"


class Sidecar:
    """One spendgate server process on `data_dir`, listening on 127.0.0.1 at a port fixed for this object's life."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        http: bool = False,
        proxy: bool = False,
    ) -> None:
        """http: also serve the HTTP port (/metrics, the operator page) on a port of its own, at `http_url`.
        proxy: also serve the OpenAI- and Anthropic-compatible proxy on a port of its own, at `proxy_url`."""
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.port = _free_port()
        self.http_port = _free_port() if http else None
        self.proxy_port = _free_port() if proxy else None
        self._extra_args = tuple(extra_args)
        self._env = dict(env) if env is not None else None
        self._python = python
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], Sidecar] | None = None
        self._starts = 0
        # Give the port back to the pool when this object goes away (the finalizer runs at most once).
        weakref.finalize(self, _release_port, self.port)
        if self.http_port is not None:
            weakref.finalize(self, _release_port, self.http_port)
        if self.proxy_port is not None:
            weakref.finalize(self, _release_port, self.proxy_port)

    # -- what tests read ------------------------------------------------------------------------------------------

    @property
    def target(self) -> str:
        """The gRPC target to dial: "127.0.0.1:PORT"."""
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """The HTTP port's base address, "http://127.0.0.1:PORT" (Sidecar(..., http=True) only)."""
        if self.http_port is None:
            raise SidecarError("this sidecar has no HTTP port: create it with Sidecar(..., http=True)")
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def proxy_url(self) -> str:
        """The proxy's base address, "http://127.0.0.1:PORT" (Sidecar(..., proxy=True) only): Anthropic's base_url;
        OpenAI's is this + "/v1"."""
        if self.proxy_port is None:
            raise SidecarError("this sidecar has no proxy: create it with Sidecar(..., proxy=True)")
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def pid(self) -> int:
        """The pid of the current (or last) child process."""
        if self._process is None:
            raise SidecarError("the sidecar was never started")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, n: int = _LOG_TAIL_LINES) -> str:
        """The last `n` lines of the log ("" if there is none yet)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> Sidecar:
        """Start the child and wait until its health check says SERVING. On failure the child is killed and
        SidecarError carries the log tail."""
        if self.running:
            raise SidecarError(f"already running (pid {self.pid})")
        self._starts += 1
        self._process = self._spawn()
        self._finalizer = weakref.finalize(self, _kill, self._process)
        try:
            self._wait_serving(timeout_s)
        except BaseException:
            self.kill9()
            raise
        return self

    def kill9(self) -> int:
        """SIGKILL the child (a crash: no drain, no flush) and wait for it. Returns its exit code (-9 if it was
        still running)."""
        process = self._require_process()
        _kill(process)
        self._detach_finalizer()
        return process.returncode

    def terminate(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> int:
        """SIGTERM the child (graceful drain) and wait up to `timeout_s` for it to exit. Returns its exit code.
        If it does not exit in time it is killed and SidecarError is raised: a drain that hangs is a bug."""
        process = self._require_process()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill9()
                raise self._error(f"did not exit within {timeout_s} s of SIGTERM; killed") from None
        self._detach_finalizer()
        return process.returncode

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """Stop the child however it takes: SIGTERM, then SIGKILL after `timeout_s`. Never raises for a slow drain.
        Returns the exit code, or None if it was never started."""
        if self._process is None:
            return None
        try:
            return self.terminate(timeout_s)
        except SidecarError:
            return self._process.returncode

    def restart(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> Sidecar:
        """Start again on the same data dir and port. A running child is stopped first (SIGTERM)."""
        if self.running:
            self.stop()
        return self.start(timeout_s)

    def __enter__(self) -> Sidecar:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        http = ["--http-listen", f"127.0.0.1:{self.http_port}"] if self.http_port is not None else []
        proxy = ["--proxy-listen", f"127.0.0.1:{self.proxy_port}"] if self.proxy_port is not None else []
        return [
            self._python,
            "-m",
            "spendgate",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.target,
            *http,
            *proxy,
            *self._extra_args,
        ]

    def _child_env(self) -> dict[str, str]:
        # A developer's real Stripe credentials must never reach a test sidecar: without an explicit env, the child
        # inherits this process's environment minus every STRIPE_* variable (pass them in `env` on purpose).
        if self._env is None:
            env = {name: value for name, value in os.environ.items() if not name.startswith(STRIPE_ENV_PREFIX)}
        else:
            env = dict(self._env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")  # so the log has everything up to a kill -9
        return env

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor; ours can close
            self._write_banner(log)
            return subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._child_env()
            )

    def _write_banner(self, log: IO[bytes]) -> None:
        log.write(f"--- sidecar start #{self._starts}: {' '.join(self._command())}\n".encode())
        log.flush()

    def _wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        # Retry the connection every <= 200 ms: gRPC's default reconnect backoff would add seconds to every start.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 200),
        ]
        with grpc.insecure_channel(self.target, options) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self._require_process().poll()
                if code is not None:
                    raise self._error(f"exited with code {code} before serving")
                if self._is_serving(health):
                    return
                if time.monotonic() >= deadline:
                    raise self._error(f"not SERVING within {timeout_s} s")
                time.sleep(_HEALTH_POLL_INTERVAL_S)

    @staticmethod
    def _is_serving(health: health_pb2_grpc.HealthStub) -> bool:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=_HEALTH_CALL_TIMEOUT_S)
        except grpc.RpcError:
            return False  # not listening yet, or health not registered yet
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise SidecarError("the sidecar was never started")
        return self._process

    def _detach_finalizer(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def _error(self, what: str) -> SidecarError:
        pid = self._process.pid if self._process else None
        return SidecarError(
            f"spendgate sidecar (pid {pid}, {self.target}, data {self.data_dir}) {what}\n"
            f"--- last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def __repr__(self) -> str:
        state = f"pid {self._process.pid}" if self.running and self._process else "stopped"
        return f"Sidecar({str(self.data_dir)!r}, target={self.target!r}, {state})"
