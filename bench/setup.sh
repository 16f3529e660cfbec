#!/usr/bin/env bash
# Everything `python bench/run.py` and the test suite need beyond the spendgate package itself, in one place:
#   - Debian packages: postgresql and redis-server (the baselines), nghttp2-client (h2load), linux-perf (the profile),
#     chromium and chromium-driver (the operator page's browser test, tests/python/e2e/test_operator_page_browser.py),
#     libfaketime (the stepped wall clock of tests/python/e2e/test_clock.py)
#   - Python packages: the `bench` extra of pyproject.toml (asyncpg, redis, matplotlib, pytest-benchmark, py-spy)
# run.py calls this by itself when something is missing and it runs as root; otherwise run it yourself:
#   sudo bash bench/setup.sh        (or as root: bash bench/setup.sh)
# Nothing is started or enabled as a service: the bench starts its own Postgres and Redis on temp dirs and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(postgresql redis-server nghttp2-client linux-perf chromium chromium-driver libfaketime)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo);
  else
    echo "bench/setup.sh: missing Debian packages: ${missing[*]}; run as root:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "bench/setup.sh: apt-get install ${missing[*]}" >&2
  "${SUDO[@]}" apt-get update -q >/dev/null
  # policy-rc.d 101: the packages' post-install scripts must not start system-wide servers (the bench runs its own).
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d
    trap '"${SUDO[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # linux-perf is only for the profile section: a machine without it still runs everything else.
  required=()
  for pkg in "${missing[@]}"; do [[ $pkg == linux-perf ]] || required+=("$pkg"); done
  if ((${#required[@]})); then
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${required[@]}" >/dev/null
  fi
  if [[ " ${missing[*]} " == *" linux-perf "* ]]; then
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends linux-perf >/dev/null \
      || echo "bench/setup.sh: linux-perf not installed; the profile will have py-spy only" >&2
  fi
fi

# The bench extra. If spendgate is already installed (with its native module), only the extra's packages are added,
# so that the Rust core is not rebuilt; otherwise install the checkout with it.
if python3 -c "import spendgate._core" 2>/dev/null; then
  mapfile -t extra < <(python3 -c '
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))')
  python3 -m pip install --quiet "${extra[@]}"
else
  python3 -m pip install --quiet -e '.[test,bench]'
fi
echo "bench/setup.sh: ready" >&2
