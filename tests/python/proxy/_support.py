"""A real sidecar with its proxy in front of a fake LLM upstream, and the official SDKs pointed at it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai

from spendgate.client import Client
from spendgate.policy import load_price_table, usage_from_anthropic, usage_from_openai, usage_from_openai_responses
from spendgate.store_reader import StoreReader
from spendgate.testing import Sidecar
from spendgate.testing.fake_llm import SCRIPT_HEADER, FakeCall, FakeLLM

OPENAI_UPSTREAM_KEY = "sk-upstream-openai-key"
ANTHROPIC_UPSTREAM_KEY = "sk-ant-upstream-key"
OPENAI_MODEL = "gpt-6-sol"
ANTHROPIC_MODEL = "claude-opus-5-5"
CONVERTERS = {"chat": usage_from_openai, "responses": usage_from_openai_responses, "messages": usage_from_anthropic}
POLL_DEADLINE_S = 15.0
TABLE = load_price_table(None)


@dataclass
class Rig:
    fake: FakeLLM
    sidecar: Sidecar
    client: Client
    data_dir: Path

    def openai(self, customer: str | None, **kwargs: Any) -> openai.OpenAI:
        headers = {"x-spendgate-customer-id": customer} if customer else {}
        return openai.OpenAI(
            base_url=self.sidecar.proxy_url + "/v1",
            api_key=kwargs.pop("api_key", "sk-client"),
            default_headers=headers,
            **kwargs,
        )

    def async_openai(self, customer: str, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.sidecar.proxy_url + "/v1",
            api_key="sk-client",
            default_headers={"x-spendgate-customer-id": customer},
            **kwargs,
        )

    def anthropic(self, customer: str | None, **kwargs: Any) -> anthropic.Anthropic:
        headers = {"x-spendgate-customer-id": customer} if customer else {}
        return anthropic.Anthropic(
            base_url=self.sidecar.proxy_url,
            api_key=kwargs.pop("api_key", "sk-ant-client"),
            default_headers=headers,
            **kwargs,
        )

    def ledger_entry(self, reservation_id: str) -> dict[str, Any]:
        """The ledger entry of a reservation, waiting for it (a drained stream commits after its client left)."""
        deadline = time.monotonic() + POLL_DEADLINE_S
        while True:
            with StoreReader(self.data_dir) as store:
                for entry in store.ledger():
                    if entry["reservation_id"] == reservation_id:
                        return entry
            assert time.monotonic() < deadline, f"no ledger entry for {reservation_id}"
            time.sleep(0.05)

    def hold_state(self, reservation_id: str) -> dict[str, Any]:
        with StoreReader(self.data_dir) as store:
            return dict(store.holds()).get(reservation_id, {})

    def key_create(self, customer: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "spendgate", "key", "create", customer, "--target", self.sidecar.target],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()


def script(**fields: Any) -> dict[str, str]:
    """extra_headers that script the fake upstream's answer to one call."""
    return {SCRIPT_HEADER: json.dumps(fields)}


def priced(call: FakeCall) -> int:
    """What the fake upstream's reported usage costs by the bundled table: what the commit must be."""
    assert call.usage is not None
    return TABLE.charge(CONVERTERS[call.route](call.usage, model=call.model)).units


def start_rig(tmp: Path) -> Iterator[Rig]:
    (tmp / "openai.key").write_text(OPENAI_UPSTREAM_KEY + "\n")
    (tmp / "anthropic.key").write_text(ANTHROPIC_UPSTREAM_KEY + "\n")
    with FakeLLM() as fake:
        sidecar = Sidecar(
            tmp / "data",
            proxy=True,
            http=True,
            extra_args=[
                "--proxy-openai-base-url",
                fake.openai_base_url,
                "--proxy-anthropic-base-url",
                fake.anthropic_base_url,
                "--proxy-openai-api-key-file",
                str(tmp / "openai.key"),
                "--proxy-anthropic-api-key-file",
                str(tmp / "anthropic.key"),
                "--proxy-max-drains",
                "4",
                "--log-format",
                "text",
            ],
        )
        with sidecar:
            client = Client(sidecar.target)
            try:
                yield Rig(fake, sidecar, client, tmp / "data")
            finally:
                client.close()
