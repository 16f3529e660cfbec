"""Streams whose client left: drained to their usage within the named caps, else billed their whole hold.

A separate sidecar with tight caps (proxy_max_drains 2, proxy_drain_timeout_ms 2000) in front of the fake upstream.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spendgate.client import Client
from spendgate.testing import Sidecar
from spendgate.testing.fake_llm import FakeCall, FakeLLM
from tests.python.proxy._support import OPENAI_MODEL, Rig, priced, script

DRAIN_TIMEOUT_MS = 2_000
MAX_DRAINS = 2


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp: Path = tmp_path_factory.mktemp("drains")
    with (
        FakeLLM() as fake,
        Sidecar(
            tmp / "data",
            proxy=True,
            extra_args=[
                "--proxy-openai-base-url",
                fake.openai_base_url,
                "--proxy-max-drains",
                str(MAX_DRAINS),
                "--proxy-drain-timeout-ms",
                str(DRAIN_TIMEOUT_MS),
            ],
        ) as sidecar,
    ):
        client = Client(sidecar.target)
        yield Rig(fake, sidecar, client, tmp / "data")
        client.close()


def leave_after_two_lines(rig: Rig, who: str, marker: str, **fields: object) -> str:
    """Start a stream, read two lines, close the connection; returns the reservation id."""
    with rig.openai(who).chat.completions.with_streaming_response.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": marker}], stream=True, extra_headers=script(**fields)
    ) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index == 2:
                break
        return str(response.headers["x-spendgate-reservation-id"])


def call_of(rig: Rig, marker: str) -> FakeCall:
    (call,) = [c for c in rig.fake.calls if marker in json.dumps(c.body)]
    return call


def test_a_drain_past_its_time_is_cut_and_bills_the_whole_hold(rig: Rig) -> None:
    rig.client.set_budget("slow", limit=10**12)
    started = time.monotonic()
    reservation = leave_after_two_lines(rig, "slow", "slow-drain", chunks=100, delay_ms=100)  # 10 s upstream
    entry = rig.ledger_entry(reservation)
    assert entry["amount"] == entry["reserved"]
    assert time.monotonic() - started < 10.0 - 2 * DRAIN_TIMEOUT_MS / 1000  # cut, not read to its end
    call = call_of(rig, "slow-drain")
    deadline = time.monotonic() + 5
    while not call.client_gone and time.monotonic() < deadline:  # the proxy hung up on the upstream
        time.sleep(0.05)
    assert call.client_gone and not call.finished


def test_past_proxy_max_drains_a_stream_whose_client_left_bills_its_whole_hold(rig: Rig) -> None:
    rig.client.set_budget("crowd", limit=10**12)
    markers = [f"drain-{i}" for i in range(MAX_DRAINS + 2)]
    # Each upstream stream lasts about 1.2 s after the clients leave at about the same time: the first MAX_DRAINS to
    # notice take the drain slots and finish within the timeout; the others find none.
    with ThreadPoolExecutor(len(markers)) as pool:
        reservations = list(
            pool.map(lambda m: leave_after_two_lines(rig, "crowd", m, chunks=20, delay_ms=70, output_tokens=5), markers)
        )
    exact = whole = 0
    for marker, reservation in zip(markers, reservations, strict=True):
        entry = rig.ledger_entry(reservation)
        call = call_of(rig, marker)
        if call.finished and entry["amount"] == priced(call):
            exact += 1
        else:
            assert entry["amount"] == entry["reserved"], marker
            whole += 1
    assert (exact, whole) == (MAX_DRAINS, 2)


def test_virtual_keys_are_durable_and_managed_by_the_cli(rig: Rig) -> None:
    rig.client.set_budget("durable-key", limit=10**6)
    key = rig.key_create("durable-key")
    rig.sidecar.kill9()
    rig.sidecar.start()
    listed = subprocess.run(
        [sys.executable, "-m", "spendgate", "key", "list", "--target", rig.sidecar.target],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "durable-key" in listed and key not in listed
    key_id = listed.split()[0]
    revoked = subprocess.run(
        [sys.executable, "-m", "spendgate", "key", "revoke", key_id, "--target", rig.sidecar.target],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"revoked {key_id}" in revoked
    again = subprocess.run(
        [sys.executable, "-m", "spendgate", "key", "revoke", key_id, "--target", rig.sidecar.target],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode != 0 and "NOT_FOUND" in again.stderr


def test_a_stream_cut_by_a_shutdown_is_committed_before_the_sidecar_exits(rig: Rig) -> None:
    rig.client.set_budget("shutdown", limit=10**12)
    with rig.openai("shutdown", max_retries=0).chat.completions.with_streaming_response.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "shutdown-cut"}],
        stream=True,
        extra_headers=script(chunks=200, delay_ms=100),
    ) as response:  # 20 s upstream
        reservation = response.headers["x-spendgate-reservation-id"]
        next(response.iter_lines())
        assert rig.sidecar.terminate() == 0  # SIGTERM: the proxy's grace (shutdown_grace_ms), then it cuts the call
    rig.sidecar.start()
    entry = rig.ledger_entry(reservation)
    assert entry["amount"] == entry["reserved"]  # committed in full before the engine closed, not left to expire
