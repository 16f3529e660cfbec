"""Stripe webhooks through a real sidecar process with its webhook port on: signatures, each event's action (checked
over gRPC), replays, a restart. Events are signed and posted by the fake Stripe's webhook helpers."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from spendgate.client import Client
from spendgate.store_reader import StoreReader
from spendgate.testing import Sidecar
from spendgate.testing.fake_stripe import (
    DEFAULT_API_KEY,
    FakeStripe,
    WebhookDelivery,
    build_event,
    invoice_object,
    sign_payload,
    subscription_object,
)
from spendgate.v1 import spendgate_pb2 as pb
from tests.python.settle._support import spendgate_cli

if TYPE_CHECKING:
    from tests.conftest import SidecarFactory

SECRET = "whsec_test_spendgate"
OTHER_SECRET = "whsec_test_thin_destination"
PLAN_LIMITS = {"price_basic": 1_000, "pro_monthly": 50_000}  # a price id, and a lookup_key
WEBHOOKS_LISTENING = re.compile(r"webhooks listening on (http://[^\s\"]+)")  # text or JSON logs
LOG_GUARD_S = 30.0  # a guard against a hang, not a timing assertion
DAY_S = 86_400


@dataclass
class WebhookSidecar:
    sidecar: Sidecar
    url: str
    client: Client
    fake: FakeStripe

    def send(
        self,
        event_type: str,
        data_object: dict[str, Any] | None = None,
        *,
        customer: str = "cus_fake",
        secret: str = SECRET,
    ) -> WebhookDelivery:
        return self.fake.send_webhook(self.url, event_type, data_object, secret, customer=customer)

    def replay(self, delivery: WebhookDelivery) -> WebhookDelivery:
        """Stripe resending the same event (same id), freshly signed."""
        return self.fake.send_event(self.url, delivery.event, SECRET)

    def balance(self, customer: str) -> pb.Balance:
        return self.client.balance(customer)

    def reserve_denied_frozen(self, customer: str) -> bool:
        reply = self.client.reserve_raw(customer, 1)
        if reply.granted:
            self.client.release(reply.reservation_id)
            return False
        return reply.reason == pb.DENY_REASON_FROZEN

    def log(self) -> str:
        return self.sidecar.log_tail(400)


def sidecar_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "STRIPE_"))}
    env["STRIPE_WEBHOOK_SECRET"] = f"{SECRET}, {OTHER_SECRET}"
    env.update(extra)
    return env


def webhook_url(sidecar: Sidecar) -> str:
    deadline = time.monotonic() + LOG_GUARD_S
    while True:
        latest_start = sidecar.log_tail(400).rsplit("--- sidecar start #", 1)[-1]  # the log is kept across restarts
        match = WEBHOOKS_LISTENING.search(latest_start)
        if match:
            return match.group(1)
        assert time.monotonic() < deadline, sidecar.log_tail()
        time.sleep(0.02)


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(same_host=True, customers=["cus_known"]) as running:
        yield running


@pytest.fixture
def start(sidecar_factory: SidecarFactory, fake: FakeStripe) -> Iterator[Callable[..., WebhookSidecar]]:
    clients: list[Client] = []

    def start_sidecar(*flags: str, env: dict[str, str] | None = None, name: str = "hooks") -> WebhookSidecar:
        args = ["--webhook-listen", "127.0.0.1:0", "--webhook-plan-limits", json.dumps(PLAN_LIMITS), *flags]
        sidecar = sidecar_factory(name, extra_args=args, env=env or sidecar_env())
        client = Client(sidecar.target)
        clients.append(client)
        return WebhookSidecar(sidecar, webhook_url(sidecar), client, fake)

    yield start_sidecar
    for client in clients:
        client.close()


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=LOG_GUARD_S) as response:  # noqa: S310 - loopback
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# -- signatures -------------------------------------------------------------------------------------------------------


def test_a_bad_or_missing_signature_is_400_and_changes_nothing(start: Callable[..., WebhookSidecar]) -> None:
    hooks = start("--webhook-payment-failed-action", "freeze")
    hooks.client.set_budget("cus_sig", 500)
    deleted = build_event("customer.subscription.deleted", customer="cus_sig")
    created = build_event("customer.subscription.created", subscription_object("cus_new", price_id="price_basic"))
    payload = json.dumps(deleted)

    wrong_secret = hooks.fake.send_event(hooks.url, deleted, "whsec_not_ours")
    tampered = post(
        hooks.url,
        payload.replace("cus_sig", "cus_other").encode(),
        {"Stripe-Signature": sign_payload(payload, SECRET), "Content-Type": "application/json"},
    )
    missing = post(hooks.url, payload.encode(), {"Content-Type": "application/json"})
    too_old = hooks.fake.send_event(hooks.url, created, SECRET, timestamp=int(time.time()) - 3600)
    not_json = post(hooks.url, b"hello", {"Stripe-Signature": sign_payload("hello", SECRET)})

    assert wrong_secret.status == 400 and b"signature" in wrong_secret.body
    assert tampered[0] == 400 and missing == (400, {"error": "no Stripe-Signature header"})
    assert too_old.status == 400 and not_json[0] == 400
    balance = hooks.balance("cus_sig")
    assert (balance.frozen, balance.limit) == (False, 500)
    with pytest.raises(Exception, match="NOT_FOUND|not found"):
        hooks.balance("cus_new")  # the refused subscription.created made no budget
    # The same events, signed right, do act (so the refusals above were about the signatures).
    assert hooks.fake.send_event(hooks.url, deleted, SECRET).status == 200
    assert hooks.balance("cus_sig").frozen


def test_every_configured_secret_verifies(start: Callable[..., WebhookSidecar]) -> None:
    hooks = start()
    hooks.client.set_budget("cus_two", 10)
    delivery = hooks.send("customer.subscription.deleted", customer="cus_two", secret=OTHER_SECRET)
    assert delivery.status == 200
    assert hooks.balance("cus_two").frozen


# -- subscriptions ----------------------------------------------------------------------------------------------------


def test_a_subscription_sets_the_plan_limit_creating_the_budget_if_needed(start: Callable[..., WebhookSidecar]) -> None:
    hooks = start()
    created = hooks.send("customer.subscription.created", subscription_object("cus_plan", price_id="price_basic"))
    assert created.status == 200, created.body
    balance = hooks.balance("cus_plan")  # created with customer_id = the Stripe customer id
    assert (balance.limit, balance.stripe_customer_id, balance.frozen) == (1_000, "cus_plan", False)

    # An upgrade: the plan is found by the price's lookup_key.
    upgraded = subscription_object("cus_plan", price_id="price_9f8e7d")
    upgraded["items"]["data"][0]["price"]["lookup_key"] = "pro_monthly"
    assert hooks.send("customer.subscription.updated", upgraded).status == 200
    assert hooks.balance("cus_plan").limit == 50_000

    # A plan the map does not know leaves the limit alone (and says so).
    unknown = hooks.send("customer.subscription.updated", subscription_object("cus_plan", price_id="price_unknown"))
    assert unknown.status == 200 and b"not in webhook_plan_limits" in unknown.body
    assert hooks.balance("cus_plan").limit == 50_000
    assert "budget cus_plan aligned with Stripe's period" in hooks.log()


def test_a_subscription_finds_the_budget_billed_to_that_customer(start: Callable[..., WebhookSidecar]) -> None:
    hooks = start()
    hooks.client.set_budget("acct-7", 10, stripe_customer_id="cus_billed")
    assert (
        hooks.send("customer.subscription.created", subscription_object("cus_billed", price_id="price_basic")).status
        == 200
    )
    assert hooks.balance("acct-7").limit == 1_000
    with pytest.raises(Exception, match="NOT_FOUND|not found"):
        hooks.balance("cus_billed")  # no second budget for the same Stripe customer


def test_a_deleted_subscription_freezes_and_a_new_one_unfreezes(start: Callable[..., WebhookSidecar]) -> None:
    hooks = start()
    hooks.client.set_budget("cus_churn", 1_000)
    deleted = hooks.send("customer.subscription.deleted", customer="cus_churn")
    assert deleted.status == 200 and hooks.balance("cus_churn").frozen
    assert hooks.reserve_denied_frozen("cus_churn")
    assert hooks.replay(deleted).status == 200 and hooks.balance("cus_churn").frozen

    back = hooks.send("customer.subscription.created", subscription_object("cus_churn", price_id="price_basic"))
    assert back.status == 200
    assert not hooks.balance("cus_churn").frozen and not hooks.reserve_denied_frozen("cus_churn")


# -- invoices ---------------------------------------------------------------------------------------------------------


def test_payment_failed_is_only_flagged_by_default(start: Callable[..., WebhookSidecar]) -> None:
    hooks = start()
    hooks.client.set_budget("cus_late", 1_000)
    failed = hooks.send("invoice.payment_failed", invoice_object("cus_late", status="open", amount_due=900))
    assert failed.status == 200 and b"flagged" in failed.body
    assert not hooks.balance("cus_late").frozen
    assert "flagged only" in hooks.log()


def test_payment_failed_freezes_and_paid_unfreezes_and_replays_change_nothing(
    start: Callable[..., WebhookSidecar],
) -> None:
    hooks = start("--webhook-payment-failed-action", "freeze")
    hooks.client.set_budget("cus_pay", 1_000)

    failed_a = hooks.send("invoice.payment_failed", invoice_object("cus_pay", status="open", invoice_id="in_a"))
    assert failed_a.status == 200 and hooks.balance("cus_pay").frozen
    paid_a = hooks.send("invoice.paid", invoice_object("cus_pay", invoice_id="in_a"))
    assert paid_a.status == 200 and not hooks.balance("cus_pay").frozen

    failed_b = hooks.send("invoice.payment_failed", invoice_object("cus_pay", status="open", invoice_id="in_b"))
    assert failed_b.status == 200 and hooks.balance("cus_pay").frozen
    # Stripe resends the old invoice.paid: it must not unfreeze what the newer failure froze.
    replayed = hooks.replay(paid_a)
    assert replayed.status == 200 and b"already processed" in replayed.body
    assert hooks.balance("cus_pay").frozen and hooks.reserve_denied_frozen("cus_pay")

    # Also after a restart: processed events are remembered on disk.
    hooks.sidecar.restart()
    hooks.url = webhook_url(hooks.sidecar)  # port 0: a new port after the restart
    assert hooks.replay(paid_a).status == 200
    assert hooks.replay(failed_a).status == 200
    assert hooks.balance("cus_pay").frozen

    paid_b = hooks.send("invoice.paid", invoice_object("cus_pay", invoice_id="in_b"))
    assert paid_b.status == 200 and not hooks.balance("cus_pay").frozen


def test_an_invoice_paid_does_not_unfreeze_a_deleted_subscription(start: Callable[..., WebhookSidecar]) -> None:
    hooks = start("--webhook-payment-failed-action", "freeze")
    hooks.client.set_budget("cus_gone", 1_000)
    assert (
        hooks.send("invoice.payment_failed", invoice_object("cus_gone", status="open", invoice_id="in_g")).status == 200
    )
    assert hooks.send("customer.subscription.deleted", customer="cus_gone").status == 200
    assert hooks.send("invoice.paid", invoice_object("cus_gone", invoice_id="in_g")).status == 200
    assert hooks.balance("cus_gone").frozen


# -- periods ----------------------------------------------------------------------------------------------------------


def stored_budget(hooks: WebhookSidecar, customer: str) -> dict[str, Any]:
    """The budget as the sidecar made it durable (read from its data dir while it runs): period and freeze reason."""
    with StoreReader(hooks.sidecar.data_dir) as store:
        return next(record for name, record in store.budgets() if name == customer)


def spend(hooks: WebhookSidecar, customer: str, amount: int) -> None:
    with hooks.client.reserve(customer, amount) as hold:
        hold.commit(amount)


def test_subscription_periods_become_budget_periods_renewals_roll_them_and_old_events_never_roll_back(
    start: Callable[..., WebhookSidecar],
) -> None:
    hooks = start()
    now = int(time.time())
    first = (now - 10 * DAY_S, now + 20 * DAY_S)
    created = hooks.send(
        "customer.subscription.created",
        subscription_object(
            "cus_period",
            subscription_id="sub_period",
            price_id="price_basic",
            period_start=first[0],
            period_end=first[1],
        ),
    )
    assert created.status == 200, created.body
    record = stored_budget(hooks, "cus_period")
    assert record["period"] == {"kind": "fixed", "anchor_ms": first[0] * 1000, "length_ms": 30 * DAY_S * 1000}
    assert (record["period_start_ms"], record["period_end_ms"]) == (first[0] * 1000, first[1] * 1000)
    spend(hooks, "cus_period", 300)

    # The new period's invoice is paid: its subscription line (billed in advance) is the new period; spend starts at 0.
    second = (now - 60, now - 60 + 30 * DAY_S)
    paid = hooks.send(
        "invoice.paid",
        invoice_object(
            "cus_period", subscription_id="sub_period", amount_due=900, period_start=second[0], period_end=second[1]
        ),
    )
    assert paid.status == 200 and b"rolled over to period" in paid.body, paid.body
    record = stored_budget(hooks, "cus_period")
    assert (record["period_start_ms"], record["period_end_ms"]) == (second[0] * 1000, second[1] * 1000)
    assert hooks.balance("cus_period").spent == 0
    spend(hooks, "cus_period", 50)

    # Replays and late events change nothing: Stripe's resend, the renewal's subscription.updated arriving after the
    # invoice, and an older subscription.updated (the first period) delivered last.
    assert b"already processed" in hooks.replay(paid).body
    for period in (second, first):
        delivery = hooks.send(
            "customer.subscription.updated",
            subscription_object(
                "cus_period",
                subscription_id="sub_period",
                price_id="price_basic",
                period_start=period[0],
                period_end=period[1],
            ),
        )
        assert delivery.status == 200, delivery.body
    stale_invoice = hooks.send(
        "invoice.paid",
        invoice_object("cus_period", subscription_id="sub_period", period_start=first[0], period_end=first[1]),
    )
    assert stale_invoice.status == 200 and b"rolled" not in stale_invoice.body
    record = stored_budget(hooks, "cus_period")
    assert (record["period_start_ms"], record["period_end_ms"]) == (second[0] * 1000, second[1] * 1000)
    assert hooks.balance("cus_period").spent == 50
    assert "budget cus_period stays on its period" in hooks.log()

    assert (
        hooks.send(
            "customer.subscription.deleted",
            subscription_object("cus_period", status="canceled", subscription_id="sub_period"),
        ).status
        == 200
    )
    record = stored_budget(hooks, "cus_period")
    assert record["frozen"] and record["frozen_reason"] == "Stripe: subscription sub_period deleted"
    assert hooks.reserve_denied_frozen("cus_period")


# -- other events -----------------------------------------------------------------------------------------------------


def test_other_event_types_are_acknowledged_and_ignored(start: Callable[..., WebhookSidecar]) -> None:
    hooks = start()
    delivery = hooks.send("customer.created", {"id": "cus_x", "object": "customer"})
    assert delivery.status == 200 and b"ignored" in delivery.body


def test_a_meter_error_report_is_logged_with_its_samples(
    start: Callable[..., WebhookSidecar], fake: FakeStripe
) -> None:
    env = sidecar_env(STRIPE_API_KEY=DEFAULT_API_KEY, STRIPE_API_BASE=fake.url)
    hooks = start(env=env)
    fake.client().v1.billing.meter_events.create({
        "event_name": "spendgate_usage", "identifier": "sg-rsv_00000000000000aa",
        "payload": {"stripe_customer_id": "cus_unknown_to_stripe", "value": "5"},
    })  # fmt: skip
    thin = fake.error_report_event()
    delivery = fake.send_event(hooks.url, thin, OTHER_SECRET)
    assert delivery.status == 200, delivery.body
    assert json.loads(delivery.body)["action"] == "meter error report: 1 refused events"
    log = hooks.log()
    assert "Stripe refused 1 meter event(s)" in log and "meter_event_customer_not_found x1" in log
    assert "the event of reservation rsv_00000000000000aa" in log
    assert fake.send_event(hooks.url, thin, OTHER_SECRET).body.find(b"already processed") > 0


def test_a_meter_error_report_without_a_stripe_key_is_still_logged(
    start: Callable[..., WebhookSidecar], fake: FakeStripe
) -> None:
    hooks = start()
    fake.client().v1.billing.meter_events.create({
        "event_name": "spendgate_usage", "identifier": "x-1", "payload": {"value": "5"},
    })  # fmt: skip
    delivery = fake.send_event(hooks.url, fake.error_report_event(), SECRET)
    assert delivery.status == 200
    assert "set STRIPE_API_KEY to fetch which events Stripe refused" in hooks.log()


# -- configuration ----------------------------------------------------------------------------------------------------


def test_webhooks_without_a_secret_refuse_to_start(sidecar_factory: SidecarFactory) -> None:
    env = {k: v for k, v in sidecar_env().items() if k != "STRIPE_WEBHOOK_SECRET"}
    sidecar = sidecar_factory("nosecret", start=False, extra_args=["--webhook-listen", "127.0.0.1:0"], env=env)
    with pytest.raises(Exception, match="exited with code 2"):
        sidecar.start()
    assert "set STRIPE_WEBHOOK_SECRET" in sidecar.log_tail()


def test_webhooks_are_off_by_default(sidecar_factory: SidecarFactory) -> None:
    sidecar = sidecar_factory("plain", env=sidecar_env())
    assert "webhooks listening" not in sidecar.log_tail()


def test_the_webhook_state_is_in_every_backup_so_a_paid_invoice_unfreezes_after_a_restore(
    start: Callable[..., WebhookSidecar],
    tmp_path: Path,
) -> None:
    hooks = start("--webhook-payment-failed-action", "freeze")
    hooks.client.set_budget("cus_dr", 1_000)
    failed = hooks.send("invoice.payment_failed", invoice_object("cus_dr", status="open", invoice_id="in_dr"))
    assert failed.status == 200 and hooks.balance("cus_dr").frozen
    backup_dir = tmp_path / "webhook-backup"
    backed_up = spendgate_cli("backup", str(backup_dir), "--target", hooks.sidecar.target, env=sidecar_env())
    assert backed_up.returncode == 0, backed_up.stderr
    assert not (hooks.sidecar.data_dir / "webhook-state.json").exists(), "the state lives in LMDB"
    hooks.sidecar.stop()
    restored = spendgate_cli(
        "restore", str(backup_dir), "--data-dir", str(hooks.sidecar.data_dir), "--force", env=sidecar_env()
    )
    assert restored.returncode == 0, restored.stderr
    hooks.sidecar.start()
    hooks.url = webhook_url(hooks.sidecar)
    assert hooks.balance("cus_dr").frozen
    assert hooks.replay(failed).status == 200 and b"already processed" in hooks.replay(failed).body
    paid = hooks.send("invoice.paid", invoice_object("cus_dr", invoice_id="in_dr"))
    assert paid.status == 200 and not hooks.balance("cus_dr").frozen, paid.body
