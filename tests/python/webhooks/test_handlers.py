"""spendgate.webhooks.handlers in-process, on a real engine: the cases a sidecar process makes awkward to set up
(dead letters to link, several budgets for one customer, a closed engine, a damaged state file)."""

from __future__ import annotations

import asyncio
import time
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


def handlers_for(engine: _core.Engine, tmp_path: Path, *, action: str = "freeze", fetch: Any = None) -> WebhookHandlers:
    async def wait(ticket: int) -> None:
        await asyncio.to_thread(engine.wait_durable, ticket)

    return WebhookHandlers(
        engine,
        wait,
        plan_limits={"price_basic": 1_000},
        payment_failed_action=action,
        legacy_state_path=tmp_path / "data" / STATE_FILE_NAME,
        fetch_event=fetch,
    )


def budget(engine: _core.Engine, customer: str, stripe_customer: str = "", limit: int = 100) -> None:
    engine.wait_durable(engine.set_budget(customer, limit, stripe_customer).ticket)


def test_a_payment_failure_for_an_invoice_already_paid_does_not_freeze(engine: _core.Engine, tmp_path: Path) -> None:
    budget(engine, "cus_order")
    hooks = handlers_for(engine, tmp_path)
    # Stripe does not promise order: the paid event arrives before the failure it resolves.
    run(hooks.handle_event(build_event("invoice.paid", invoice_object("cus_order", invoice_id="in_1"))))
    outcome = run(
        hooks.handle_event(
            build_event("invoice.payment_failed", invoice_object("cus_order", status="open", invoice_id="in_1"))
        )
    )
    assert "already paid" in outcome.action
    assert not engine.balance("cus_order").frozen


def test_a_budget_frozen_by_two_failed_invoices_needs_both_paid(engine: _core.Engine, tmp_path: Path) -> None:
    budget(engine, "cus_two")
    hooks = handlers_for(engine, tmp_path)
    for invoice in ("in_1", "in_2"):
        run(
            hooks.handle_event(
                build_event("invoice.payment_failed", invoice_object("cus_two", status="open", invoice_id=invoice))
            )
        )
    outcome = run(hooks.handle_event(build_event("invoice.paid", invoice_object("cus_two", invoice_id="in_1"))))
    assert "stays frozen (in_2 unpaid)" in outcome.action and engine.balance("cus_two").frozen
    run(hooks.handle_event(build_event("invoice.paid", invoice_object("cus_two", invoice_id="in_2"))))
    assert not engine.balance("cus_two").frozen


def test_several_budgets_for_one_customer(engine: _core.Engine, tmp_path: Path) -> None:
    budget(engine, "proj-a", "cus_many")
    budget(engine, "proj-b", "cus_many")
    hooks = handlers_for(engine, tmp_path)
    outcome = run(
        hooks.handle_event(
            build_event("customer.subscription.updated", subscription_object("cus_many", price_id="price_basic"))
        )
    )
    assert "several budgets bill cus_many" in outcome.action
    assert {engine.balance(b).limit for b in ("proj-a", "proj-b")} == {100}
    assert hooks.stats.counts["customer_ambiguous"] == 1
    # Freezing is safe for all of them.
    run(hooks.handle_event(build_event("customer.subscription.deleted", customer="cus_many")))
    assert engine.balance("proj-a").frozen and engine.balance("proj-b").frozen


def test_the_engine_unavailable_is_a_retry_and_the_event_is_not_remembered(
    engine: _core.Engine, tmp_path: Path
) -> None:
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
        if name in ("set_budget", "set_frozen", "update_budget", "freeze"):

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
        for identifier, payload in (
            (entry["identifier"], {"stripe_customer_id": "cus_1", "value": "10"}),
            ("other-1", {"value": "3"}),
        ):
            client.v1.billing.meter_events.create(
                {"event_name": "spendgate_usage", "identifier": identifier, "payload": payload}
            )
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


def test_the_state_lives_in_lmdb_survives_a_reopen_and_stays_bounded(tmp_path: Path) -> None:
    engine = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    state = WebhookState()
    for n in range(MAX_PROCESSED_EVENTS + 5):
        state.mark_processed(f"evt_{n}")
    state.payment_failed["acct"] = ["in_1"]
    state.frozen_by_deletion["acct-2"] = "sub_1"
    engine.wait_durable(state.save(engine))
    engine.close()
    reopened = _core.Engine(str(tmp_path / "data"), durability="relaxed")
    loaded = WebhookState.load(reopened)
    reopened.close()
    assert len(loaded.processed) == MAX_PROCESSED_EVENTS
    assert "evt_0" not in loaded.processed and f"evt_{MAX_PROCESSED_EVENTS + 4}" in loaded.processed
    assert loaded.payment_failed == {"acct": ["in_1"]} and loaded.frozen_by_deletion == {"acct-2": "sub_1"}
    assert not (tmp_path / "data" / STATE_FILE_NAME).exists(), "nothing outside LMDB"


def test_the_file_of_older_releases_is_imported_once(engine: _core.Engine, tmp_path: Path) -> None:
    legacy = tmp_path / "data" / STATE_FILE_NAME
    old = WebhookState()
    old.payment_failed["acct"] = ["in_old"]
    legacy.write_text(old.to_json())
    hooks = handlers_for(engine, tmp_path)
    budget(engine, "acct", "cus_acct")
    event = build_event("invoice.paid", invoice_object("cus_acct"))
    run(hooks.handle_event(event))
    assert not legacy.exists() and legacy.with_name(STATE_FILE_NAME + ".imported").exists()
    in_lmdb = WebhookState.load(engine)
    assert in_lmdb.payment_failed == {"acct": ["in_old"]} and event["id"] in in_lmdb.processed


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
    run(
        hooks.handle_event(
            build_event("invoice.payment_failed", invoice_object("cus_ops", status="open", invoice_id="in_1"))
        )
    )
    run(hooks.handle_event(build_event("invoice.paid", invoice_object("cus_ops", invoice_id="in_1"))))
    assert engine.balance("cus_ops").frozen
    run(hooks.handle_event(build_event("customer.subscription.deleted", customer="cus_ops")))
    run(
        hooks.handle_event(
            build_event("customer.subscription.created", subscription_object("cus_ops", price_id="price_basic"))
        )
    )
    assert engine.balance("cus_ops").frozen


def test_a_budget_named_like_the_customer_but_billing_another_is_left_alone(
    engine: _core.Engine, tmp_path: Path
) -> None:
    budget(engine, "cus_named", "cus_elsewhere")
    hooks = handlers_for(engine, tmp_path)
    outcome = run(
        hooks.handle_event(
            build_event("customer.subscription.created", subscription_object("cus_named", price_id="price_basic"))
        )
    )
    assert "bills another Stripe customer" in outcome.action
    view = engine.balance("cus_named")
    assert (view.limit, view.stripe_customer_id) == (100, "cus_elsewhere")


# -- periods ----------------------------------------------------------------------------------------------------------

DAY_S = 86_400


def period_of(engine: _core.Engine, customer: str) -> tuple[int, int]:
    view = engine.balance(customer)
    return view.period_start_ms, view.period_end_ms


def spend(engine: _core.Engine, customer: str, amount: int) -> None:
    reserved = engine.reserve(customer, amount, "", LONG_TTL_MS)
    assert reserved.granted
    engine.wait_durable(engine.commit(reserved.reservation_id, amount).ticket)


def test_a_subscription_from_before_basil_has_its_period_on_the_subscription(
    engine: _core.Engine, tmp_path: Path
) -> None:
    now = int(time.time())
    sub = subscription_object("cus_old_api", price_id="price_basic")
    for item in sub["items"]["data"]:  # API versions before 2025-03-31.basil: the period is the subscription's
        del item["current_period_start"], item["current_period_end"]
    sub.update(current_period_start=now - 5, current_period_end=now - 5 + 7 * DAY_S)
    outcome = run(handlers_for(engine, tmp_path).handle_event(build_event("customer.subscription.created", sub)))
    assert "aligned with period" in outcome.action
    assert period_of(engine, "cus_old_api") == ((now - 5) * 1000, (now - 5 + 7 * DAY_S) * 1000)
    assert engine.balance("cus_old_api").period == {
        "kind": "fixed",
        "anchor_ms": (now - 5) * 1000,
        "length_ms": 7 * DAY_S * 1000,
    }


def test_a_period_that_began_before_the_budgets_keeps_the_spend_and_takes_the_end(
    engine: _core.Engine, tmp_path: Path
) -> None:
    budget(engine, "cus_month", limit=10_000)  # the calendar month, begun at its first day
    spend(engine, "cus_month", 70)
    month_start, _ = period_of(engine, "cus_month")
    start_s, end_s = month_start // 1000 - 3 * DAY_S, int(time.time()) + 9 * DAY_S
    sub = subscription_object("cus_month", period_start=start_s, period_end=end_s)
    run(handlers_for(engine, tmp_path).handle_event(build_event("customer.subscription.updated", sub)))
    assert period_of(engine, "cus_month") == (month_start, end_s * 1000)
    assert engine.balance("cus_month").spent == 70


def test_invoice_paid_rolls_over_by_the_subscription_line_not_by_the_invoices_own_period(
    engine: _core.Engine, tmp_path: Path
) -> None:
    now = int(time.time())
    hooks = handlers_for(engine, tmp_path)
    run(
        hooks.handle_event(
            build_event(
                "customer.subscription.created",
                subscription_object(
                    "cus_lines",
                    subscription_id="sub_l",
                    price_id="price_basic",
                    period_start=now - 20 * DAY_S,
                    period_end=now + 10 * DAY_S,
                ),
            )
        )
    )
    spend(engine, "cus_lines", 40)
    aligned = period_of(engine, "cus_lines")

    # Not a subscription invoice, and one whose invoice-level period is later but whose subscription line is not.
    one_off = invoice_object("cus_lines", period_start=now - 60, period_end=now + DAY_S)
    ahead = invoice_object(
        "cus_lines", subscription_id="sub_l", period_start=now - 20 * DAY_S, period_end=now + 10 * DAY_S
    )
    ahead.update(period_start=now - 60, period_end=now + 30 * DAY_S)
    # A metered price's line is billed in arrears: the period that just ended.
    arrears = invoice_object(
        "cus_lines", subscription_id="sub_l", period_start=now - 50 * DAY_S, period_end=now - 20 * DAY_S
    )
    for invoice in (one_off, ahead, arrears):
        outcome = run(hooks.handle_event(build_event("invoice.paid", invoice)))
        assert "rolled" not in outcome.action, outcome.action
    assert period_of(engine, "cus_lines") == aligned and engine.balance("cus_lines").spent == 40

    renewal = invoice_object("cus_lines", subscription_id="sub_l", period_start=now - 1, period_end=now + 29 * DAY_S)
    renewal["lines"]["data"].append({**arrears["lines"]["data"][0], "id": "il_metered"})  # both kinds of line
    outcome = run(hooks.handle_event(build_event("invoice.paid", renewal)))
    assert "cus_lines rolled over to period" in outcome.action
    assert period_of(engine, "cus_lines") == ((now - 1) * 1000, (now + 29 * DAY_S) * 1000)
    assert engine.balance("cus_lines").spent == 0
    assert [p["spent"] for p in engine.closed_periods("cus_lines")] == [40]  # the old period is kept, with its spend


def test_a_period_that_has_ended_or_that_the_engine_cannot_take_leaves_the_period_and_sets_the_limit(
    engine: _core.Engine, tmp_path: Path
) -> None:
    now = int(time.time())
    hooks = handlers_for(engine, tmp_path)
    run(
        hooks.handle_event(
            build_event(
                "customer.subscription.created",
                subscription_object(
                    "cus_ended", price_id="price_basic", period_start=now - 40 * DAY_S, period_end=now - 10 * DAY_S
                ),
            )
        )
    )
    run(
        hooks.handle_event(
            build_event(
                "customer.subscription.created",
                subscription_object("cus_zero", price_id="price_basic", period_start=now, period_end=now),
            )
        )
    )
    for customer in ("cus_ended", "cus_zero"):
        view = engine.balance(customer)
        assert (view.limit, view.period["kind"]) == (1_000, "monthly"), customer  # created on the default period
