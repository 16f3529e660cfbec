"""`spendgate check-config FILE`: offline, exit 0 or 2, every problem pointing at its line; and the CLI's --token."""

from __future__ import annotations

from pathlib import Path

import pytest

from spendgate.client import Client
from spendgate.testing import Sidecar
from tests.conftest import SidecarFactory

from .test_cli import child_env, spendgate_cli

ADMIN_TOKEN = "admin-0123456789abcdef0123456789"


def check(tmp_path: Path, text: str) -> tuple[int, list[str], str]:
    path = tmp_path / "spendgate.toml"
    path.write_text(text)
    result = spendgate_cli("check-config", str(path))
    return result.returncode, result.stderr.splitlines(), result.stdout


def test_a_good_file_exits_0(tmp_path: Path) -> None:
    code, problems, out = check(
        tmp_path, 'listen = "127.0.0.1:7000"\nlog_format = "text"\n[webhook_plan_limits]\nprice_basic = 1_000\n'
    )
    assert (code, problems) == (0, []) and "OK (3 settings" in out


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    code, problems, _ = check(
        tmp_path,
        "\n".join(
            [
                'listen = "127.0.0.1:7000"',  # 1
                "map_size_mb = -3",  # 2: below the minimum
                'durabilty = "fsync"',  # 3: a typo
                'log_format = "yaml"',  # 4: not a choice
                "[webhook_plan_limits]",  # 5
                "price_basic = 100",  # 6
                'price_pro = "lots"',  # 7: not an integer
            ]
        )
        + "\n",
    )
    assert code == 2
    assert len(problems) == 4
    assert "line 2: setting 'map_size_mb': expected an integer >= 8, got -3" in problems[0]
    assert "line 3: unknown setting 'durabilty'" in problems[1] and "durability" in problems[1]
    assert "line 4: setting 'log_format': expected one of json, text" in problems[2]
    assert "line 7: setting 'webhook_plan_limits': expected an integer >= 0 for 'price_pro'" in problems[3]


def test_settings_that_only_work_together_point_at_the_one_given(tmp_path: Path) -> None:
    code, problems, _ = check(tmp_path, 'listen = "127.0.0.1:7000"\ntls_cert_file = "/etc/spendgate/cert.pem"\n')
    assert code == 2 and len(problems) == 1
    assert "line 2: setting 'tls_cert_file': TLS needs both tls_cert_file and tls_key_file" in problems[0]


def test_what_serve_would_refuse_at_start_is_a_problem_too(tmp_path: Path) -> None:
    code, problems, _ = check(tmp_path, f'listen = "0.0.0.0:7000"\nadmin_tokens_file = "{tmp_path / "absent"}"\n')
    assert code == 2
    assert any("'admin_tokens_file': cannot read" in p for p in problems)
    assert any("0.0.0.0:7000 is not a loopback address" in p and "--allow-insecure-non-loopback" in p for p in problems)


def test_an_unusable_usage_link_key_is_a_problem(tmp_path: Path) -> None:
    short = tmp_path / "link.key"
    short.write_text("short\n")
    code, problems, _ = check(tmp_path, f'http_listen = "9100"\nusage_link_secret_file = "{short}"\n')
    assert code == 2 and any("'usage_link_secret_file'" in p and "at least 32" in p for p in problems)


@pytest.mark.parametrize(("text", "expected"), [("listen = \n", "not valid TOML"), (None, "cannot read it")])
def test_a_file_that_is_not_toml_or_not_there_exits_2(tmp_path: Path, text: str | None, expected: str) -> None:
    if text is None:
        result = spendgate_cli("check-config", str(tmp_path / "absent.toml"))
        code, stderr = result.returncode, result.stderr
    else:
        code, lines, _ = check(tmp_path, text)
        stderr = "\n".join(lines)
    assert code == 2 and expected in stderr


def test_check_config_judges_the_file_not_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "spendgate.toml"
    path.write_text('listen = "127.0.0.1:7000"\n')
    result = spendgate_cli("check-config", str(path), env=child_env(SPENDGATE_NOT_A_SETTING="1"))
    assert result.returncode == 0, result.stderr


def test_client_commands_send_the_token_from_the_flag_a_file_or_the_environment(
    sidecar_factory: SidecarFactory, tmp_path: Path
) -> None:
    sidecar: Sidecar = sidecar_factory("tokens", extra_args=["--admin-tokens", ADMIN_TOKEN])
    refused = spendgate_cli("budget", "set", "cus_a", "--limit", "5", "--target", sidecar.target)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "--token" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    by_flag = spendgate_cli(
        "budget", "set", "cus_a", "--limit", "5", "--target", sidecar.target, "--token", ADMIN_TOKEN
    )
    by_file = spendgate_cli("budget", "show", "cus_a", "--target", sidecar.target, "--token-file", str(token_file))
    by_env = spendgate_cli("budget", "list", "--target", sidecar.target, env=child_env(SPENDGATE_TOKEN=ADMIN_TOKEN))
    assert [r.returncode for r in (by_flag, by_file, by_env)] == [0, 0, 0], [by_flag.stderr, by_file.stderr]
    assert "cus_a" in by_env.stdout
    with Client(sidecar.target, token=ADMIN_TOKEN) as client:
        assert client.balance("cus_a").limit == 5
