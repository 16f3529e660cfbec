"""Outbox entries that came back with a restored backup: the data dir the backup came from may have sent them after the
backup was taken, so they are resent only in ways Stripe deduplicates, and otherwise held for an operator."""

from __future__ import annotations

from pathlib import Path

import pytest

from spendgate import _core
from spendgate.settle import rules
from spendgate.testing.fake_stripe import FakeStripe

from ._support import commit, engine_with_budgets, rounds, wall_ms

HOUR = rules.HOUR_MS


@pytest.fixture
def fake() -> FakeStripe:
    with FakeStripe(customers=["cus_acme"]) as running:
        yield running


def restored_copy(tmp_path: Path, amounts: list[int]) -> Path:
    """A data dir restored (renewed) from a backup whose outbox holds one entry per amount, never sent."""
    with engine_with_budgets(tmp_path / "live", ["cus_acme"]) as engine:
        for amount in amounts:
            commit(engine, "acme", amount)
        engine.backup(str(tmp_path / "copy"))
    _core.renew_identity(str(tmp_path / "copy"), map_size_mb=64, now_ms=wall_ms())
    return tmp_path / "copy"


def test_a_restored_entry_is_resent_alone_under_its_own_identifier_and_stripe_dedupes_it(
    tmp_path: Path, fake: FakeStripe
) -> None:
    copy = restored_copy(tmp_path, [5, 7])
    engine = _core.Engine(str(copy), durability="relaxed")
    try:
        identifiers = [e["identifier"] for e in engine.outbox_pending(10)]
        assert all(e["restored_ms"] is not None for e in engine.outbox_pending(10))
        # The old data dir sent the first one after the backup was taken: Stripe has it.
        fake.client().v1.billing.meter_events.create(
            {  # type: ignore[arg-type]
                "event_name": "spendgate_usage",
                "identifier": identifiers[0],
                "payload": {"stripe_customer_id": "cus_acme", "value": "5"},
            }
        )
        # One event per commit, always (settle_auto_aggregate off): the old data dir sent it under its own identifier.
        rounds(engine, fake, 2, aggregate_window_ms=0, auto_aggregate=False)
        assert engine.outbox_stats()["depth"] == 0 and engine.outbox_stats()["dead_letters"] == 0
        assert fake.totals_by_customer() == {"cus_acme": 12}, "the duplicate was not billed twice"
        assert fake.duplicates_rejected == 1
    finally:
        engine.close()


def test_a_restored_entry_past_stripes_dedup_window_waits_for_reconcile(tmp_path: Path, fake: FakeStripe) -> None:
    copy = restored_copy(tmp_path, [5])
    engine = _core.Engine(str(copy), durability="relaxed")
    try:
        rounds(engine, fake, 1, clock_ms=lambda: wall_ms() + 24 * HOUR)
        (letter,) = engine.dead_letters()
        assert letter["fate_unknown"] and "restored from a backup" in letter["reason"]
        assert "spendgate reconcile" in letter["reason"] and fake.totals_by_customer() == {}
        with pytest.raises(_core.EngineError) as refused:
            engine.dead_letter_requeue(letter["seq"])
        assert refused.value.kind == "failed_precondition"
        engine.wait_durable(engine.dead_letter_requeue(letter["seq"], confirmed_missing=True))
        (requeued,) = engine.outbox_pending(10)
        assert requeued["identifier"].endswith("-requeue1") and requeued["restored_ms"] is None
    finally:
        engine.close()


def test_with_pre_aggregation_on_a_restored_unclaimed_entry_is_held_back(tmp_path: Path, fake: FakeStripe) -> None:
    """It may have left in an aggregate whose identifier the backup does not know: no resend could be deduplicated."""
    copy = restored_copy(tmp_path, [5, 7])
    engine = _core.Engine(str(copy), durability="relaxed")
    try:
        rounds(engine, fake, 1, aggregate_window_ms=1_000, clock_ms=lambda: wall_ms() + 60_000)
        letters = engine.dead_letters()
        assert len(letters) == 2 and all(letter["fate_unknown"] for letter in letters)
        assert "pre-aggregation" in letters[0]["reason"] and fake.totals_by_customer() == {}
    finally:
        engine.close()


def test_with_automatic_pre_aggregation_possible_a_restored_unclaimed_entry_is_held_back(
    tmp_path: Path, fake: FakeStripe
) -> None:
    """The defaults (settle_auto_aggregate on): the old data dir may have built a backlog after the backup and sent the
    entry in a per-second aggregate, so a resend under its own identifier might count it twice."""
    copy = restored_copy(tmp_path, [5, 7])
    engine = _core.Engine(str(copy), durability="relaxed")
    try:
        rounds(engine, fake, 1)
        letters = engine.dead_letters()
        assert len(letters) == 2 and all(letter["fate_unknown"] for letter in letters)
        assert "spendgate reconcile" in letters[0]["reason"] and fake.totals_by_customer() == {}
    finally:
        engine.close()


def test_a_copied_data_dir_sees_stripes_duplicate_answer_as_a_refusal_not_a_delivery(
    tmp_path: Path, fake: FakeStripe
) -> None:
    """A data dir copied (not restored) keeps its instance id: its first send of an identifier the original already
    sent is answered "already exists". That is not this sidecar's delivery: it goes to the dead letters."""
    import shutil

    with engine_with_budgets(tmp_path / "original", ["cus_acme"]) as original:
        commit(original, "acme", 5)
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    (tmp_path / "copy" / "spendgate.lock").unlink()
    for name in ("original", "copy"):
        engine = _core.Engine(str(tmp_path / name), durability="relaxed")
        try:
            rounds(engine, fake, 1)
            letters = engine.dead_letters()
        finally:
            engine.close()
    assert fake.totals_by_customer() == {"cus_acme": 5}, "the original's event, once"
    (letter,) = letters
    assert letter["fate_unknown"]
    assert "was sending for the first time" in letter["reason"] and "spendgate reconcile" in letter["reason"]


def test_usage_of_a_customer_deleted_in_stripe_is_held_back_by_the_preflight(tmp_path: Path, fake: FakeStripe) -> None:
    """The preflight's guard against a deleted customer, now that the fake can delete one."""
    with engine_with_budgets(tmp_path / "data", ["cus_acme"]) as engine:
        fake.delete_customer("cus_acme")
        commit(engine, "acme", 5)
        rounds(engine, fake, 1)
        (letter,) = engine.dead_letters()
        assert "deleted" in letter["reason"] and not letter["fate_unknown"], letter
        assert fake.totals_by_customer() == {}
