"""The README is the newcomer's entry point: its commands and its settings table must match the code."""

from __future__ import annotations

from pathlib import Path

from spendgate import config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI_RUN = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_documents_every_setting_with_its_flag_and_env_var() -> None:
    for name in config.FIELDS:
        assert f"`{name}`" in README, name
        assert config.flag(name) in README, name
        assert config.env_var(name) in README, name


TEST_COMMAND = "python3 -m pip install -e '.[test]' && bash bench/setup.sh && bash tests/run.sh"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    assert TEST_COMMAND in README
    assert TEST_COMMAND in CI_RUN.splitlines()


def test_the_readme_start_command_installs_only_the_sidecar() -> None:
    """The first command needs no test extra, no Debian package, no other service."""
    assert "python3 -m pip install -e . && python3 -m spendgate serve" in README


def test_the_test_script_runs_every_lint_gate_before_the_tests() -> None:
    script = (ROOT / "tests" / "run.sh").read_text(encoding="utf-8").splitlines()
    gates = ["cargo fmt --check", "python3 -m ruff check python tests bench", "python3 -m mypy"]
    gates += ["python3 -m ruff format --check python tests bench"]
    gates += ["python3 -m mypy.stubtest spendgate._core --allowlist tests/stubtest-allowlist.txt"]
    for gate in gates:
        assert gate in script, gate
    assert script.index(gates[-1]) < script.index("cargo test") < script.index("python3 -m pytest")
