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


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = "cargo test && python3 -m pytest"
    assert test_command in README
    assert test_command in CI_RUN.splitlines()


def test_the_readme_install_command_is_the_one_ci_uses() -> None:
    assert "python3 -m pip install -e '.[test]' && bash bench/setup.sh && python3 -m spendgate serve" in README
    assert "python3 -m pip install --quiet -e '.[test]'" in CI_RUN
    assert "bash bench/setup.sh" in CI_RUN.splitlines()
