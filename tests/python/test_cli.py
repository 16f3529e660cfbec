"""The `spendgate` command: help, setting errors, and `budget set/show` against a real sidecar process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import spendgate
from spendgate import cli, config

# The folder holding the spendgate package under test, first on the children's PYTHONPATH so that they run this code.
PACKAGE_ROOT = Path(spendgate.__file__).resolve().parents[1]
# Guards against a hang, not timing assertions: a healthy start or drain takes well under a second.
START_GUARD_S = 60.0
STOP_GUARD_S = 60.0
LISTENING = re.compile(r"listening on (\S+?),")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def spendgate_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate", *args],
        env=dict(env) if env is not None else child_env(),
        capture_output=True,
        text=True,
        timeout=START_GUARD_S,
    )


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp_path: Path, *flags: str) -> Server:
    """`spendgate serve` on 127.0.0.1 port 0 (the kernel picks a free port); its address is read from its log."""
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "spendgate", "serve", "--listen", "127.0.0.1:0",
             "--data-dir", str(tmp_path / "data"), *flags],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
        )  # fmt: skip
    deadline = time.monotonic() + START_GUARD_S
    while True:
        match = LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            return Server(process, log_path, match.group(1))
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise AssertionError(f"spendgate serve did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.02)


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if it does not drain: whatever happens, the process is gone afterwards."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_GUARD_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = start_server(tmp_path)
    try:
        yield running
    finally:
        stop(running.process)


# -- help and bad settings ---------------------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    result = spendgate_cli("--help")
    assert result.returncode == 0
    for command in ("spendgate serve", "spendgate budget set", "spendgate budget show", "spendgate budget grant"):
        assert command in result.stdout


def test_serve_help_has_a_flag_for_every_setting() -> None:
    result = spendgate_cli("serve", "--help")
    assert result.returncode == 0
    for name in config.FIELDS:
        assert config.flag(name) in result.stdout, name


def test_budget_help_lists_set_and_show() -> None:
    result = spendgate_cli("budget", "--help")
    assert result.returncode == 0
    assert "set" in result.stdout and "show" in result.stdout


def test_bad_flag_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["serve", "--map-size-mb", "lots"])
    assert caught.value.code == 2
    assert "--map-size-mb: expected an integer, got 'lots'" in capsys.readouterr().err


def test_unknown_spendgate_env_var_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPENDGATE_LISTN", "127.0.0.1:1")
    # `budget show` loads the settings as `serve` does, and cannot hang serving if the check ever lets this through.
    assert cli.main(["budget", "show", "cus_a", "--target", "127.0.0.1:1"]) == 2
    assert "SPENDGATE_LISTN: unknown setting" in capsys.readouterr().err


def test_bad_config_file_exits_2_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("map_size_mb = -5\n")
    assert cli.main(["budget", "show", "cus_a", "--target", "127.0.0.1:1", "--config", str(path)]) == 2
    assert f"config file {path} line 1" in capsys.readouterr().err


def test_an_engine_setting_the_engine_refuses_exits_1_with_its_message(tmp_path: Path) -> None:
    result = spendgate_cli(
        "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--max-ttl-ms", str(2**62)
    )
    assert result.returncode == 1
    assert "cannot open the engine" in result.stderr and "max_ttl_ms" in result.stderr


# -- budget set / show against a running sidecar -----------------------------------------------------------------------


def test_budget_set_creates_then_updates_and_show_prints_the_counters(server: Server) -> None:
    created = spendgate_cli("budget", "set", "cus_acme", "--limit", "5000", "--target", server.address)
    assert created.returncode == 0, created.stderr
    assert "created budget cus_acme" in created.stdout

    updated = spendgate_cli(
        "budget",
        "set",
        "cus_acme",
        "--limit",
        "7000",
        "--stripe-customer-id",
        "cus_Stripe1",
        "--target",
        server.address,
    )
    assert updated.returncode == 0, updated.stderr
    assert "updated budget cus_acme" in updated.stdout

    shown = spendgate_cli("budget", "show", "cus_acme", "--target", server.address)
    assert shown.returncode == 0, shown.stderr
    rows = dict(line.split(None, 1) for line in shown.stdout.strip().splitlines())
    assert rows["customer_id"].strip() == "cus_acme"
    assert rows["stripe_customer_id"].strip() == "cus_Stripe1"
    assert rows["limit"].strip() == "7000"
    assert rows["remaining"].strip() == "7000"
    assert rows["spent"].strip() == rows["reserved"].strip() == "0"


def test_budget_list_prints_a_table_of_budgets(server: Server) -> None:
    for customer_id, limit in (("team-b", "20"), ("team-a", "10"), ("solo", "5")):
        assert spendgate_cli("budget", "set", customer_id, "--limit", limit, "--target", server.address).returncode == 0
    listed = spendgate_cli("budget", "list", "--prefix", "team-", "--target", server.address)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split() == ["customer_id", "limit", "spent", "reserved", "remaining", "active_holds"]
    assert [line.split()[:2] for line in lines[1:]] == [["team-a", "10"], ["team-b", "20"]]


def test_budget_commands_dial_the_listen_setting_when_no_target_is_given(server: Server) -> None:
    env = child_env(SPENDGATE_LISTEN=server.address)
    assert spendgate_cli("budget", "set", "cus_env", "--limit", "10", env=env).returncode == 0
    shown = spendgate_cli("budget", "show", "cus_env", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "cus_env" in shown.stdout


def test_budget_show_of_an_unknown_customer_prints_the_server_message_and_fails(server: Server) -> None:
    result = spendgate_cli("budget", "show", "cus_nobody", "--target", server.address)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "NOT_FOUND" in result.stderr and "cus_nobody" in result.stderr


def test_budget_set_with_a_bad_limit_prints_the_server_message_and_fails(server: Server) -> None:
    result = spendgate_cli("budget", "set", "cus_acme", "--limit", "-1", "--target", server.address)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr


def test_budget_show_without_a_sidecar_says_it_cannot_reach_it() -> None:
    with socket.socket() as sock:  # a loopback port that nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
        result = spendgate_cli("budget", "show", "cus_acme", "--target", target)
    assert result.returncode == 1
    assert f"cannot reach a spendgate sidecar at {target}" in result.stderr


# -- serve lifecycle ---------------------------------------------------------------------------------------------------


def test_serve_logs_where_it_listens_and_its_data_dir(server: Server) -> None:
    log = server.log()
    assert f"listening on {server.address}" in log
    assert "data_dir" in log and "data" in log


def test_sigterm_drains_closes_the_engine_and_exits_0(tmp_path: Path) -> None:
    running = start_server(tmp_path)
    try:
        assert spendgate_cli("budget", "set", "cus_a", "--limit", "10", "--target", running.address).returncode == 0
    finally:
        code = stop(running.process)
    assert code == 0, running.log()
    assert "SIGTERM" in running.log() and "stopped" in running.log()


def test_sigint_exits_0_too(tmp_path: Path) -> None:
    running = start_server(tmp_path)
    try:
        running.process.send_signal(signal.SIGINT)
        code = running.process.wait(STOP_GUARD_S)
    finally:
        stop(running.process)
    assert code == 0, running.log()


def test_a_budget_set_before_a_restart_is_there_after_it(tmp_path: Path) -> None:
    first = start_server(tmp_path)
    try:
        assert spendgate_cli("budget", "set", "cus_a", "--limit", "42", "--target", first.address).returncode == 0
    finally:
        stop(first.process)
    second = start_server(tmp_path)
    try:
        shown = spendgate_cli("budget", "show", "cus_a", "--target", second.address)
    finally:
        stop(second.process)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"limit\s+42\b", shown.stdout)


def test_budget_set_takes_the_policy_and_show_prints_it(server: Server) -> None:
    spendgate_cli("budget", "set", "org-1", "--limit", "100000", "--target", server.address)
    made = spendgate_cli(
        "budget", "set", "seat-1", "--limit", "5000", "--included", "3000", "--soft-limit", "4000", "--mode", "soft",
        "--block-overage", "--parent", "org-1", "--period", "fixed", "--period-start", "2026-11-15T00:00Z",
        "--period-end", "2026-12-15T00:00Z", "--target", server.address,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    shown = spendgate_cli("budget", "show", "seat-1", "--target", server.address)
    rows = dict(line.split(None, 1) for line in shown.stdout.strip().splitlines())
    assert (rows["included"].strip(), rows["soft_limit"].strip(), rows["mode"].strip()) == ("3000", "4000", "soft")
    assert rows["block_overage"].strip() == "on" and rows["org"].strip() == "org-1"
    assert rows["stripe_customer_id"].strip() == "org-1", "a seat bills to its org"
    bad = spendgate_cli("budget", "set", "seat-1", "--period", "fixed", "--target", server.address)
    assert bad.returncode == 2 and "--period-start" in bad.stderr


def test_budget_freeze_and_unfreeze_say_why(server: Server) -> None:
    spendgate_cli("budget", "set", "cus_f", "--limit", "10", "--target", server.address)
    frozen = spendgate_cli("budget", "freeze", "cus_f", "--reason", "card declined", "--target", server.address)
    assert frozen.returncode == 0 and "yes: card declined" in frozen.stdout, frozen.stdout
    thawed = spendgate_cli("budget", "unfreeze", "cus_f", "--target", server.address)
    assert thawed.returncode == 0 and "frozen" in thawed.stdout and "yes:" not in thawed.stdout


def test_usage_prints_the_period_the_daily_series_and_the_breakdowns(server: Server) -> None:
    from spendgate.client import Client

    spendgate_cli("budget", "set", "cus_u", "--limit", "1000000", "--included", "500", "--target", server.address)
    with Client(server.address) as client:
        for amount, feature in ((300, "chat"), (400, "search")):
            with client.reserve("cus_u", amount, dimensions={"feature": feature}) as hold:
                hold.commit(amount)
    shown = spendgate_cli("usage", "cus_u", "--target", server.address)
    assert shown.returncode == 0, shown.stderr
    figures = dict(line.split(None, 1) for line in shown.stdout.split("daily")[0].splitlines()[2:] if line.strip())
    assert (figures["total"].strip(), figures["overage"].strip(), figures["included_remaining"].strip()) == (
        "700",
        "200",
        "0",
    )
    assert "by dimension" in shown.stdout and "search" in shown.stdout
    bad = spendgate_cli("usage", "cus_u", "--period", "last month", "--target", server.address)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "ISO date" in bad.stderr


def test_budget_grant_adds_credits_once_per_key_and_usage_shows_them(server: Server) -> None:
    spendgate_cli("budget", "set", "cus_g", "--limit", "1000", "--target", server.address)
    granted = spendgate_cli(
        "budget", "grant", "cus_g", "250", "--key", "pay_1", "--reason", "pack", "--target", server.address
    )
    assert granted.returncode == 0, granted.stderr
    assert "granted 250 credits to cus_g" in granted.stdout
    rows = dict(line.split(None, 1) for line in granted.stdout.strip().splitlines()[1:])
    assert (rows["limit"].strip(), rows["credits"].strip(), rows["remaining"].strip()) == ("1250", "250", "1250")

    again = spendgate_cli("budget", "grant", "cus_g", "250", "--key", "pay_1", "--target", server.address)
    assert again.returncode == 0, again.stderr
    assert "already granted under key pay_1: 250 credits to cus_g (nothing added)" in again.stdout
    other = spendgate_cli("budget", "grant", "cus_g", "300", "--key", "pay_1", "--target", server.address)
    assert other.returncode == 1 and "ALREADY_EXISTS" in other.stderr and "new key" in other.stderr
    keyless = spendgate_cli("budget", "grant", "cus_g", "300", "--target", server.address)
    assert keyless.returncode == 2 and "--key" in keyless.stderr

    shown = spendgate_cli("usage", "cus_g", "--target", server.address)
    figures = dict(line.split(None, 1) for line in shown.stdout.split("daily")[0].splitlines()[2:] if line.strip())
    assert (
        figures["limit"].strip(),
        figures["credits"].strip(),
        figures["credits_granted"].strip(),
        figures["grants"].strip(),
    ) == ("1,250", "250", "250", "1")


def test_health_exits_0_on_a_serving_sidecar_and_1_without_one(server: Server) -> None:
    serving = spendgate_cli("health", "--target", server.address)
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING")
    nobody = spendgate_cli("health", "--target", "127.0.0.1:1", "--timeout-s", "1")
    assert nobody.returncode == 1


def test_usage_link_prints_a_signed_link_that_opens_the_customers_page(tmp_path: Path) -> None:
    import urllib.request

    from spendgate.client import AsyncClient, Client
    from spendgate.testing import Sidecar

    with Sidecar(tmp_path / "data", http=True) as sidecar:
        with Client(sidecar.target) as client:
            client.set_budget("cus_link", 1_000)
            made = client.usage_link("cus_link", ttl_s=120, allow_limit=True, ceiling=500)
        assert made.url.startswith(f"{sidecar.http_url}/usage/cus_link?") and made.scope == "limit"

        async def async_link() -> str:
            async with AsyncClient(sidecar.target) as client:
                return (await client.usage_link("cus_link")).scope

        assert asyncio.run(async_link()) == "view"
        printed = spendgate_cli("usage-link", "cus_link", "--ttl", "30m", "--target", sidecar.target)
        assert printed.returncode == 0, printed.stderr
        url = printed.stdout.strip()
        assert "view only" in printed.stderr and "&sig=" in url
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and "cus_link" in page.read().decode()
        limited = spendgate_cli(
            "usage-link", "cus_link", "--allow-limit", "--ceiling", "900", "--target", sidecar.target
        )
        assert limited.returncode == 0 and "set the stop-at up to 900 units" in limited.stderr
        assert spendgate_cli("usage-link", "cus_link", "--allow-limit", "--target", sidecar.target).returncode == 2
        assert spendgate_cli("usage-link", "cus_link", "--ttl", "soon", "--target", sidecar.target).returncode == 2
        unknown = spendgate_cli("usage-link", "cus_nobody", "--target", sidecar.target)
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
