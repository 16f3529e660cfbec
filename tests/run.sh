#!/usr/bin/env bash
# The whole test suite, lint gates first (the README's second command ends here; .ci/run runs that command).
# A gate fails fast with the tool's own report: fix what it names, or run the formatter it names. The tools run as
# `python3 -m` so that they need not be on PATH (pip's script directory is not, for a user install).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "tests/run.sh: $*" >&2; }

step "cargo fmt --check (fix: cargo fmt)"
cargo fmt --check
step "ruff check (fix: ruff check --fix python tests bench)"
python3 -m ruff check python tests bench
step "ruff format --check (fix: ruff format python tests bench)"
python3 -m ruff format --check python tests bench
step "mypy, strict on the package (pyproject.toml [tool.mypy])"
python3 -m mypy
step "stubtest: python/spendgate/_core.pyi against the compiled core"
python3 -m mypy.stubtest spendgate._core --allowlist tests/stubtest-allowlist.txt
step "cargo test"
cargo test
step "pytest"
python3 -m pytest
