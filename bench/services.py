"""Local Postgres and Redis for the baselines: each on a free loopback port, in its own temp dir, always stopped.

    with postgres() as pg:      # pg.dsn  -> "postgresql://bench@127.0.0.1:PORT/postgres"
        ...
    with redis() as rd:         # rd.url  -> "redis://127.0.0.1:PORT/0"
        ...

Both come from Debian's packages (`bench/setup.sh` installs them). Both are configured to acknowledge a write only
once it is on disk, as spendgate does: Postgres with its defaults (fsync on, synchronous_commit on: a commit waits
for its WAL flush, and concurrent commits share flushes), Redis with `appendonly yes` and `appendfsync always` (the
AOF is fsync'd before replies leave, once per event-loop turn, so concurrent writes share an fsync too).

Postgres refuses to run as root: as root, the cluster belongs to the `postgres` user the Debian package creates.
Every server started here is also stopped at interpreter exit (atexit), in case a caller forgot or was interrupted.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60.0
_running: dict[int, subprocess.Popen[bytes] | None] = {}  # pid -> process, for the atexit sweep
_pg_data_dirs: dict[str, tuple[str, str | None]] = {}  # data dir -> (pg_ctl, user), for the atexit sweep


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout_s: float, alive: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None and alive.poll() is not None:
            raise ServiceError(f"the server exited with code {alive.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise ServiceError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------------
# Postgres


def postgres_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb, or one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass(frozen=True)
class Postgres:
    port: int
    dsn: str
    data_dir: str
    log_path: str
    version: str


def _run_as(user: str | None, argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, user=user, check=False, capture_output=True, **kw)  # type: ignore[call-overload]


@contextlib.contextmanager
def postgres(max_connections: int = 200) -> Iterator[Postgres]:
    """initdb + pg_ctl start on a temp dir (trust auth, loopback only); pg_ctl stop -m immediate at the end."""
    bindir = postgres_bindir()
    if bindir is None:
        raise ServiceError("Postgres is not installed: run `bash bench/setup.sh` (apt-get install postgresql)")
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ServiceError(
                "running as root needs the `postgres` user (the Debian package creates it): run `bash bench/setup.sh`"
            ) from exc
        user = "postgres"
    root = tempfile.mkdtemp(prefix="spendgate-bench-pg-")
    data_dir = os.path.join(root, "data")
    log_path = os.path.join(root, "postgres.log")
    if user is not None:
        shutil.chown(root, user=user)
    pg_ctl = str(bindir / "pg_ctl")
    try:
        done = _run_as(
            user,
            [str(bindir / "initdb"), "-D", data_dir, "-U", "bench", "--auth=trust", "-E", "UTF8", "--no-instructions"],
            cwd=root,
        )
        if done.returncode != 0:
            raise ServiceError(f"initdb failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        port = free_port()
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c max_connections={max_connections} "
            "-c fsync=on -c synchronous_commit=on -c shared_buffers=128MB"
        )
        _pg_data_dirs[data_dir] = (pg_ctl, user)
        done = _run_as(
            user,
            [pg_ctl, "start", "-w", "-t", str(int(START_TIMEOUT_S)), "-D", data_dir, "-l", log_path, "-o", options],
            cwd=root,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            log = Path(log_path).read_text(errors="replace")[-2000:] if os.path.exists(log_path) else ""
            raise ServiceError(
                f"pg_ctl start failed ({done.returncode}): {done.stderr.decode(errors='replace')}\n{log}"
            )
        _wait_port(port, START_TIMEOUT_S)
        version = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        yield Postgres(
            port=port,
            dsn=f"postgresql://bench@127.0.0.1:{port}/postgres",
            data_dir=data_dir,
            log_path=log_path,
            version=version,
        )
    finally:
        _stop_postgres(data_dir)
        shutil.rmtree(root, ignore_errors=True)


def create_database(pg: Postgres, name: str) -> str:
    """CREATE DATABASE name (each backend gets fresh tables); returns its DSN."""
    import asyncio  # noqa: PLC0415

    import asyncpg  # noqa: PLC0415

    async def create() -> None:
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"postgresql://bench@127.0.0.1:{pg.port}/{name}"


def postmaster_pid(data_dir: str) -> int:
    """The running postmaster's pid: the first line of postmaster.pid."""
    return int(Path(data_dir, "postmaster.pid").read_text().split()[0])


def _stop_postgres(data_dir: str) -> None:
    entry = _pg_data_dirs.pop(data_dir, None)
    if entry is None or not os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        return
    pg_ctl, user = entry
    # immediate: the data dir is thrown away next, there is nothing to checkpoint for.
    done = _run_as(
        user, [pg_ctl, "stop", "-w", "-t", "30", "-m", "immediate", "-D", data_dir], stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:  # last resort: the postmaster's pid is the first line of postmaster.pid
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(data_dir, "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)


# ---------------------------------------------------------------------------------------------------------------------
# Redis


@dataclass(frozen=True)
class Redis:
    port: int
    url: str
    pid: int
    log_path: str
    version: str


@contextlib.contextmanager
def redis(appendfsync: str = "always") -> Iterator[Redis]:
    """redis-server on a temp dir, AOF on with `appendfsync` (default always: durable like the others), no RDB."""
    binary = redis_server_binary()
    if binary is None:
        raise ServiceError("redis-server is not installed: run `bash bench/setup.sh` (apt-get install redis-server)")
    root = tempfile.mkdtemp(prefix="spendgate-bench-redis-")
    log_path = os.path.join(root, "redis.log")
    port = free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        root,
        "--appendonly",
        "yes",
        "--appendfsync",
        appendfsync,
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        log_path,
        "--protected-mode",
        "yes",
        "--maxclients",
        "1000",
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=root
    )
    _running[proc.pid] = proc
    try:
        _wait_port(port, START_TIMEOUT_S, alive=proc)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        yield Redis(port=port, url=f"redis://127.0.0.1:{port}/0", pid=proc.pid, log_path=log_path, version=version)
    finally:
        _stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)


def _stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    _running.pop(proc.pid, None)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def track(proc: subprocess.Popen[bytes]) -> None:
    """Stop this process at interpreter exit if nobody did before (for the baseline gRPC servers)."""
    _running[proc.pid] = proc


def untrack(proc: subprocess.Popen[bytes]) -> None:
    _running.pop(proc.pid, None)


@atexit.register
def _sweep() -> None:
    for proc in list(_running.values()):
        if proc is not None:
            with contextlib.suppress(Exception):
                _stop_process(proc, timeout_s=5)
    for data_dir in list(_pg_data_dirs):
        with contextlib.suppress(Exception):
            _stop_postgres(data_dir)
