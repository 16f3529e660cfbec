"""Logs: one JSON object a line, request ids from the caller or made up, and no secret ever written."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from spendgate import logs
from spendgate.client import Client, Unauthenticated
from spendgate.config import Settings
from spendgate.server.app import Sidecar
from spendgate.testing.fake_stripe import FakeStripe
from spendgate.v1 import spendgate_pb2 as pb
from spendgate.v1 import spendgate_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory

from .server.test_app import create_budget, settings_for, with_sidecar

STRIPE_KEY = "sk_test_51HvQqJ2eZvKYlo2C0123456789abcdef"
WEBHOOK_SECRET = "whsec_0123456789abcdefABCDEF"
ADMIN_TOKEN = "admin-0123456789abcdef0123456789"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A JSON handler on the root logger, with the redaction filter, as configure_logging installs it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RedactingFilter([STRIPE_KEY, ADMIN_TOKEN]))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_log_line_is_one_json_object_with_the_fields_and_the_extras(captured: io.StringIO) -> None:
    token = logs.request_id.set("req-42")
    try:
        logging.getLogger("spendgate.test").info("reserved %d units", 5, extra={"customer_id": "cus_1"})
    finally:
        logs.request_id.reset(token)
    logging.getLogger("spendgate.test").warning("outside a call")
    inside, outside = lines(captured)
    assert set(inside) == {"ts", "level", "logger", "msg", "request_id", "customer_id"}
    assert inside["msg"] == "reserved 5 units" and inside["level"] == "info" and inside["logger"] == "spendgate.test"
    assert inside["request_id"] == "req-42" and inside["customer_id"] == "cus_1"
    assert str(inside["ts"]).endswith("Z") and "T" in str(inside["ts"])
    assert "request_id" not in outside and outside["level"] == "warning"


def test_secrets_never_reach_the_log_in_messages_arguments_extras_or_tracebacks(captured: io.StringIO) -> None:
    log = logging.getLogger("spendgate.test")
    log.info("key %s and header %s", STRIPE_KEY, "Bearer some-other-token-value")
    log.info("a live key sk_live_abcdef123456 and a restricted rk_test_abcdef123456 and %s", WEBHOOK_SECRET)
    log.info("the admin token is %s", ADMIN_TOKEN, extra={"token": ADMIN_TOKEN})
    try:
        raise RuntimeError(f"Stripe said no to {STRIPE_KEY}")
    except RuntimeError:
        log.exception("failed")
    text = captured.getvalue()
    for secret in (
        STRIPE_KEY,
        "some-other-token-value",
        "sk_live_abcdef123456",
        "rk_test_abcdef123456",
        WEBHOOK_SECRET,
        ADMIN_TOKEN,
    ):
        assert secret not in text, secret
    assert text.count(logs.REDACTED) >= 7
    assert "Stripe said no to" in text  # the rest of the message stays readable
    assert "task_12345678 and cus_1" in logs.redact("task_12345678 and cus_1")  # ordinary ids are left alone


def test_secret_values_are_the_settings_marked_secret_split_at_commas() -> None:
    settings = Settings(
        stripe_api_key=STRIPE_KEY, webhook_secret=WEBHOOK_SECRET, admin_tokens=f"{ADMIN_TOKEN}, other-admin-0123456789"
    )
    assert sorted(logs.secret_values(settings)) == sorted(
        [STRIPE_KEY, WEBHOOK_SECRET, ADMIN_TOKEN, "other-admin-0123456789"]
    )


def test_the_request_id_is_the_callers_or_a_fresh_one_echoed_in_trailing_metadata_and_logged(
    tmp_path: Path, captured: io.StringIO
) -> None:
    async def body(_: Sidecar, channel: grpc.aio.Channel) -> tuple[str, str, str]:
        await create_budget(channel, "cus_a", 100)
        budget = pb_grpc.BudgetStub(channel)
        given = budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=1), metadata=(("x-request-id", "r-1"),))
        fresh = budget.Reserve(pb.ReserveRequest(customer_id="cus_a", amount=1))
        failed = budget.GetBalance(pb.GetBalanceRequest(customer_id="nobody"), metadata=(("x-request-id", "r-2"),))
        await given, await fresh
        with pytest.raises(grpc.aio.AioRpcError):
            await failed
        return (
            dict(await given.trailing_metadata())["x-request-id"],
            dict(await fresh.trailing_metadata())["x-request-id"],
            dict(await failed.trailing_metadata())["x-request-id"],
        )

    given, fresh, failed = with_sidecar(settings_for(tmp_path), body)
    assert given == "r-1" and failed == "r-2"
    assert len(fresh) == 32 and fresh != given
    rpc_lines = [line for line in lines(captured) if line["logger"] == "spendgate.rpc"]
    assert {line["request_id"] for line in rpc_lines} >= {"r-1", "r-2", fresh}
    assert any(line["request_id"] == "r-2" and "not_found" in str(line["msg"]) for line in rpc_lines)


def test_a_sidecar_process_logs_json_lines_without_its_secrets(sidecar_factory: SidecarFactory) -> None:
    with FakeStripe(customers=["cus_a"], same_host=True, api_keys=[STRIPE_KEY]) as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}
        env.update(
            {
                "STRIPE_API_KEY": STRIPE_KEY,
                "STRIPE_API_BASE": fake.url,
                "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "SPENDGATE_ADMIN_TOKENS": ADMIN_TOKEN,
                "SPENDGATE_LOG_LEVEL": "debug",
            }
        )
        sidecar = sidecar_factory("logs", env=env)
        with Client(sidecar.target, token="wrong-token-0123456789abcdef") as wrong, pytest.raises(Unauthenticated):
            wrong.set_budget("cus_a", 10)
        with Client(sidecar.target, token=ADMIN_TOKEN) as admin:
            admin.set_budget("cus_a", 10)
        sidecar.stop()
    text = sidecar.log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(records) >= 3 and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any("refused /spendgate.v1.Admin/SetBudget" in str(r["msg"]) for r in records)
    for secret in (STRIPE_KEY, WEBHOOK_SECRET, ADMIN_TOKEN, "wrong-token-0123456789abcdef"):
        assert secret not in text, secret
