//! The outbox that settlement drains: written with the ledger entry, claimed before the first send, acknowledged
//! only after Stripe accepted, dead-lettered with a reason when Stripe refuses for good.

use std::time::Duration;

use spendgate::{DenyReason, Engine, EngineConfig, ErrorKind};

const WAIT: Duration = Duration::from_secs(10);

fn open(path: &std::path::Path, max_outbox_entries: u64) -> Engine {
    let mut config = EngineConfig::new(path);
    config.map_size_mb = 64;
    config.max_outbox_entries = max_outbox_entries;
    Engine::open(config).unwrap()
}

fn commit(engine: &Engine, customer: &str, amount: i64) -> String {
    let r = engine.reserve(customer, amount.max(1), "", 0).unwrap();
    assert!(r.granted);
    let c = engine.commit(&r.reservation_id, amount).unwrap();
    engine.wait_durable(c.ticket, WAIT).unwrap();
    r.reservation_id
}

fn setup(engine: &Engine) {
    engine.wait_durable(engine.set_budget("cus", 1_000_000, "cus_Stripe").unwrap().ticket, WAIT).unwrap();
}

#[test]
fn every_commit_lands_in_the_outbox_with_a_stable_identifier_and_its_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), 1_000);
    setup(&engine);
    let id = commit(&engine, "cus", 42);
    let pending = engine.outbox_pending(10).unwrap();
    assert_eq!(pending.len(), 1);
    let entry = &pending[0];
    assert_eq!(
        (entry.amount, entry.customer_id.as_str(), entry.stripe_customer_id.as_str()),
        (42, "cus", "cus_Stripe")
    );
    assert_eq!(entry.identifier, format!("sg-{id}"));
    assert!(entry.ts_ms > 1_600_000_000_000);
    assert_eq!((entry.sent_as.as_deref(), entry.attempts), (None, 0));
    assert_eq!(engine.stats().outbox_depth, 1);
}

#[test]
fn a_claim_fixes_the_identifier_once_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let seq = {
        let engine = open(dir.path(), 1_000);
        setup(&engine);
        commit(&engine, "cus", 5);
        let seq = engine.outbox_pending(1).unwrap()[0].seq;
        engine.wait_durable(engine.outbox_claim(&[seq], "agg-1").unwrap(), WAIT).unwrap();
        engine.wait_durable(engine.outbox_claim(&[seq], "agg-2").unwrap(), WAIT).unwrap();
        seq
    };
    let engine = open(dir.path(), 1_000);
    let entry = engine.outbox_pending(1).unwrap().remove(0);
    assert_eq!(entry.seq, seq);
    assert_eq!(entry.sent_as.as_deref(), Some("agg-1"), "the first claim wins: a resend repeats the same event");
    assert_eq!(entry.attempts, 2);
    assert!(entry.first_attempt_ms.is_some());
}

#[test]
fn an_ack_removes_the_entry_and_marks_the_ledger_settled_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), 1_000);
    setup(&engine);
    commit(&engine, "cus", 5);
    commit(&engine, "cus", 7);
    let seqs: Vec<u64> = engine.outbox_pending(10).unwrap().iter().map(|e| e.seq).collect();
    engine.wait_durable(engine.outbox_ack(&seqs[..1]).unwrap(), WAIT).unwrap();
    engine.wait_durable(engine.outbox_ack(&seqs[..1]).unwrap(), WAIT).unwrap();
    let left = engine.outbox_pending(10).unwrap();
    assert_eq!(left.iter().map(|e| e.amount).collect::<Vec<_>>(), vec![7]);
    let stats = engine.outbox_stats().unwrap();
    assert_eq!((stats.depth, stats.dead_letters), (1, 0));
    assert_eq!(engine.stats().outbox_depth, 1);
}

#[test]
fn dead_letters_keep_the_reason_and_a_requeue_gets_a_fresh_identifier() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), 1_000);
    setup(&engine);
    commit(&engine, "cus", 9);
    let entry = engine.outbox_pending(1).unwrap().remove(0);
    engine
        .wait_durable(engine.outbox_dead_letter(&[entry.seq], "No such customer: 'cus_Stripe'", false).unwrap(), WAIT)
        .unwrap();
    assert!(engine.outbox_pending(10).unwrap().is_empty());
    let letters = engine.dead_letters(10).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "No such customer: 'cus_Stripe'");
    assert_eq!(letters[0].entry.amount, 9);
    engine.wait_durable(engine.dead_letter_requeue(entry.seq, false).unwrap(), WAIT).unwrap();
    let requeued = engine.outbox_pending(1).unwrap().remove(0);
    assert_eq!(requeued.identifier, format!("{}-requeue1", entry.identifier));
    assert_eq!(requeued.amount, 9);
    assert!(engine.dead_letters(10).unwrap().is_empty());
    assert_eq!(engine.dead_letter_requeue(entry.seq, false).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(engine.outbox_dead_letter(&[entry.seq], "", false).unwrap_err().kind, ErrorKind::InvalidArgument);
}

#[test]
fn every_requeue_gets_an_identifier_never_used_before_also_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open(dir.path(), 1_000);
    setup(&engine);
    commit(&engine, "cus", 9);
    let first = engine.outbox_pending(1).unwrap().remove(0);
    let mut seen = std::collections::BTreeSet::from([first.identifier.clone()]);
    for round in 1..=4u32 {
        engine.wait_durable(engine.outbox_dead_letter(&[first.seq], "refused", false).unwrap(), WAIT).unwrap();
        assert_eq!(engine.dead_letters(1).unwrap()[0].requeues, round - 1);
        engine.wait_durable(engine.dead_letter_requeue(first.seq, false).unwrap(), WAIT).unwrap();
        let requeued = engine.outbox_pending(1).unwrap().remove(0);
        assert_eq!(requeued.identifier, format!("{}-requeue{round}", first.identifier));
        assert!(seen.insert(requeued.identifier.clone()), "identifier {} reused", requeued.identifier);
        assert_eq!(requeued.requeues, round);
        engine.close();
        drop(engine);
        engine = open(dir.path(), 1_000);
    }
}

#[test]
fn a_dead_letter_that_may_be_at_stripe_is_requeued_only_when_confirmed_missing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), 1_000);
    setup(&engine);
    commit(&engine, "cus", 9);
    let entry = engine.outbox_pending(1).unwrap().remove(0);
    engine.wait_durable(engine.outbox_dead_letter(&[entry.seq], "sent, never answered", true).unwrap(), WAIT).unwrap();
    assert!(engine.dead_letters(1).unwrap()[0].fate_unknown);
    let refused = engine.dead_letter_requeue(entry.seq, false).unwrap_err();
    assert_eq!(refused.kind, ErrorKind::FailedPrecondition);
    assert!(refused.message.contains("spendgate reconcile"), "{}", refused.message);
    assert_eq!(engine.dead_letters(1).unwrap().len(), 1, "a refused requeue changes nothing");
    engine.wait_durable(engine.dead_letter_requeue(entry.seq, true).unwrap(), WAIT).unwrap();
    assert_eq!(engine.outbox_pending(1).unwrap()[0].identifier, format!("{}-requeue1", entry.identifier));
}

#[test]
fn a_full_outbox_refuses_new_reservations_but_existing_holds_still_commit() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), 2);
    setup(&engine);
    let open_hold = engine.reserve("cus", 5, "", 0).unwrap();
    commit(&engine, "cus", 1);
    commit(&engine, "cus", 1);
    let err = engine.reserve("cus", 1, "", 0).unwrap_err();
    assert_eq!(err.kind, ErrorKind::ResourceExhausted);
    assert!(err.message.contains("max_outbox_entries"), "{err}");
    let c = engine.commit(&open_hold.reservation_id, 5).unwrap();
    engine.wait_durable(c.ticket, WAIT).unwrap();
    assert_eq!(engine.outbox_stats().unwrap().depth, 3, "billing data is never refused");
    let seqs: Vec<u64> = engine.outbox_pending(10).unwrap().iter().map(|e| e.seq).collect();
    engine.wait_durable(engine.outbox_ack(&seqs).unwrap(), WAIT).unwrap();
    assert!(engine.reserve("cus", 1, "", 0).unwrap().granted);
}

#[test]
fn a_frozen_budget_denies_reserves_until_unfrozen_and_stays_frozen_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = open(dir.path(), 1_000);
        setup(&engine);
        let hold = engine.reserve("cus", 5, "", 0).unwrap();
        let frozen = engine.set_frozen("cus", true).unwrap();
        engine.wait_durable(frozen.ticket, WAIT).unwrap();
        assert!(frozen.balance.frozen);
        assert_eq!(engine.reserve("cus", 1, "", 0).unwrap().reason, DenyReason::Frozen);
        assert_eq!(engine.commit(&hold.reservation_id, 5).unwrap().charged, 5, "existing holds still commit");
    }
    let engine = open(dir.path(), 1_000);
    assert!(engine.balance("cus").unwrap().frozen);
    assert_eq!(engine.reserve("cus", 1, "", 0).unwrap().reason, DenyReason::Frozen);
    engine.wait_durable(engine.set_frozen("cus", false).unwrap().ticket, WAIT).unwrap();
    assert!(engine.reserve("cus", 1, "", 0).unwrap().granted);
    assert_eq!(engine.outbox_stats().unwrap().depth, 1, "the outbox depth is rebuilt on start");
}
