"""spendgate.webhooks.handlers in-process, on a real engine: the cases a sidecar process makes awkward to set up
(dead letters to link, several budgets for one customer, a closed engine, a damaged state file)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from spendgate import _core
from spendgate.testing.fake_stripe import FakeStripe, build_event, invoice_object, subscription_object
from spendgate.webhooks.handlers import (
    MAX_PROCESSED_EVENTS,
    STATE_FILE_NAME,
    TransientError,
    WebhookHandlers,
    WebhookState,
)

T = TypeVar("T")
LONG_TTL_MS = 600_000


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[_core.Engine]:
    opened = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    yield opened
    opened.close()


def handlers_for(engine: _core.Engine, tmp_path: Path, *, action: str = "freeze",
                 fetch: Any = None) -> WebhookHandlers:
    async def wait(ticket: int) -> None:
        await asyncio.to_thread(engine.wait_durable, ticket)

    return WebhookHandlers(engine, wait, plan_limits={"price_basic": 1_000}, payment_failed_action=action,
                           state_path=tmp_path / "data" / STATE_FILE_NAME, fetch_event=fetch)


def budget(engine: _core.Engine, customer: str, stripe_customer: str = "", limit: int = 100) -> None:
    engine.wait_durable(engine.set_budget(customer, limit, stripe_customer).ticket)


def test_a_payment_failure_for_an_invoice_already_paid_does_not_freeze(engine: _core.Engine, tmp_path: Path) -> None:
    budget(engine, "cus_order")
    hooks = handlers_for(engine, tmp_path)
    # Stripe does not promise order: the paid event arrives before the failure it resolves.
    run(hooks.handle_event(build_event("invoice.paid", invoice_object("cus_order", invoice_id="in_1"))))
    outcome = run(hooks.handle_event(build_event("invoice.payment_failed",
                                                 invoice_object("cus_order", status="open", invoice_id="in_1"))))
    assert "already paid" in outcome.action
    assert not engine.balance("cus_order").frozen


def test_a_budget_frozen_by_two_failed_invoices_needs_both_paid(engine: _core.Engine, tmp_path: Path) -> None:
    budget(engine, "cus_two")
    hooks = handlers_for(engine, tmp_path)
    for invoice in ("in_1", "in_2"):
        run(hooks.handle_event(build_event("invoice.payment_failed",
                                           invoice_object("cus_two", status="open", invoice_id=invoice))))
    outcome = run(hooks.handle_event(build_event("invoice.paid", invoice_object("cus_two", invoice_id="in_1"))))
    assert "stays frozen (in_2 unpaid)" in outcome.action and engine.balance("cus_two").frozen
    run(hooks.handle_event(build_event("invoice.paid", invoice_object("cus_two", invoice_id="in_2"))))
    assert not engine.balance("cus_two").frozen


def test_several_budgets_for_one_customer(engine: _core.Engine, tmp_path: Path) -> None:
    budget(engine, "proj-a", "cus_many")
    budget(engine, "proj-b", "cus_many")
    hooks = handlers_for(engine, tmp_path)
    outcome = run(hooks.handle_event(build_event("customer.subscription.updated",
                                                 subscription_object("cus_many", price_id="price_basic"))))
    assert "several budgets bill cus_many" in outcome.action
    assert {engine.balance(b).limit for b in ("proj-a", "proj-b")} == {100}
    assert hooks.stats.counts["customer_ambiguous"] == 1
    # Freezing is safe for all of them.
    run(hooks.handle_event(build_event("customer.subscription.deleted", customer="cus_many")))
    assert engine.balance("proj-a").frozen and engine.balance("proj-b").frozen


def test_the_engine_unavailable_is_a_retry_and_the_event_is_not_remembered(engine: _core.Engine,
                                                                           tmp_path: Path) -> None:
    budget(engine, "cus_down")
    hooks = handlers_for(engine, tmp_path)
    event = build_event("customer.subscription.deleted", customer="cus_down")
    hooks._engine = _ClosedEngine(engine)  # noqa: SLF001 - the engine failing after the budget was found
    with pytest.raises(TransientError, match="unavailable"):
        run(hooks.handle_event(event))
    hooks._engine = engine  # noqa: SLF001
    outcome = run(hooks.handle_event(event))  # Stripe's resend is handled, not taken for a replay
    assert outcome.action == "froze cus_down" and engine.balance("cus_down").frozen


class _ClosedEngine:
    def __init__(self, engine: _core.Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        if name in ("set_budget", "set_frozen"):
            def unavailable(*args: Any) -> Any:
                raise _core.EngineError("unavailable", "the sidecar is shutting down")
            return unavailable
        return getattr(self._engine, name)


def test_the_meter_error_report_links_samples_to_dead_letters(engine: _core.Engine, tmp_path: Path) -> None:
    budget(engine, "acct-1", "cus_1", limit=10_000)
    reserved = engine.reserve("acct-1", 10, "", LONG_TTL_MS)
    engine.wait_durable(engine.commit(reserved.reservation_id, 10).ticket)
    (entry,) = engine.outbox_pending(10)
    engine.wait_durable(engine.outbox_dead_letter([entry["seq"]], "refused: no such customer"))

    with FakeStripe(same_host=True) as fake:
        client = fake.client()
        for identifier, payload in ((entry["identifier"], {"stripe_customer_id": "cus_1", "value": "10"}),
                                    ("other-1", {"value": "3"})):
            client.v1.billing.meter_events.create({"event_name": "spendgate_usage", "identifier": identifier,
                                                   "payload": payload})
        thin = fake.error_report_event()

        def fetch(event_id: str) -> Mapping[str, Any]:
            body: Mapping[str, Any] = client.v2.core.events.retrieve(event_id).to_dict()
            return body

        hooks = handlers_for(engine, tmp_path, fetch=fetch)
        outcome = run(hooks.handle_thin(thin))
        replay = run(hooks.handle_thin(thin))

    assert outcome.action == "meter error report: 2 refused events"
    assert replay.action == "replay: already processed"
    assert hooks.stats.counts["meter_errors.meter_event_customer_not_found"] == 1
    assert hooks.stats.counts["meter_errors.meter_event_no_customer_defined"] == 1
    assert hooks.stats.counts["meter_error_reports"] == 1
    (report,) = hooks.stats.recent_error_reports
    by_identifier = {sample["identifier"]: sample for sample in report["samples"]}
    linked = by_identifier[entry["identifier"]]
    assert (linked["dead_letter_seq"], linked["customer_id"]) == (entry["seq"], "acct-1")
    assert linked["reservation_id"] == reserved.reservation_id
    assert "dead_letter_seq" not in by_identifier["other-1"] and "reservation_id" not in by_identifier["other-1"]


def test_the_state_survives_a_reload_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE_NAME
    state = WebhookState()
    for n in range(MAX_PROCESSED_EVENTS + 5):
        state.mark_processed(f"evt_{n}")
    state.payment_failed["acct"] = ["in_1"]
    state.frozen_by_deletion["acct-2"] = "sub_1"
    state.save(path)
    loaded = WebhookState.load(path)
    assert len(loaded.processed) == MAX_PROCESSED_EVENTS
    assert "evt_0" not in loaded.processed and f"evt_{MAX_PROCESSED_EVENTS + 4}" in loaded.processed
    assert loaded.payment_failed == {"acct": ["in_1"]} and loaded.frozen_by_deletion == {"acct-2": "sub_1"}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_damaged_state_file_stops_the_start_with_a_clear_message(engine: _core.Engine, tmp_path: Path) -> None:
    (tmp_path / "data" / STATE_FILE_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="move it away to start afresh"):
        handlers_for(engine, tmp_path)


def test_events_without_id_or_customer(engine: _core.Engine, tmp_path: Path) -> None:
    hooks = handlers_for(engine, tmp_path)
    assert run(hooks.handle_event({"type": "invoice.paid"})).status == 400
    no_customer = build_event("invoice.paid", invoice_object(""))
    outcome = run(hooks.handle_event(no_customer))
    assert (outcome.status, outcome.action) == (200, "no customer: nothing to do")


def test_webhooks_never_undo_an_operators_freeze(engine: _core.Engine, tmp_path: Path) -> None:
    budget(engine, "cus_ops")
    engine.wait_durable(engine.set_frozen("cus_ops", True).ticket)  # Admin.FreezeBudget
    hooks = handlers_for(engine, tmp_path)
    run(hooks.handle_event(build_event("invoice.payment_failed",
                                       invoice_object("cus_ops", status="open", invoice_id="in_1"))))
    run(hooks.handle_event(build_event("invoice.paid", invoice_object("cus_ops", invoice_id="in_1"))))
    assert engine.balance("cus_ops").frozen
    run(hooks.handle_event(build_event("customer.subscription.deleted", customer="cus_ops")))
    run(hooks.handle_event(build_event("customer.subscription.created",
                                       subscription_object("cus_ops", price_id="price_basic"))))
    assert engine.balance("cus_ops").frozen


def test_a_budget_named_like_the_customer_but_billing_another_is_left_alone(engine: _core.Engine,
                                                                            tmp_path: Path) -> None:
    budget(engine, "cus_named", "cus_elsewhere")
    hooks = handlers_for(engine, tmp_path)
    outcome = run(hooks.handle_event(build_event("customer.subscription.created",
                                                 subscription_object("cus_named", price_id="price_basic"))))
    assert "bills another Stripe customer" in outcome.action
    view = engine.balance("cus_named")
    assert (view.limit, view.stripe_customer_id) == (100, "cus_elsewhere")
