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

/// A data dir made before instance ids: its open holds keep their old 16-digit ids, its outbox entries never sent are
/// renamed to carry the new instance id, and an entry already sent keeps its identifier (a resend must dedupe).
#[test]
fn a_data_dir_from_before_instance_ids_is_upgraded_without_losing_a_hold_or_a_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), 1_000);
    setup(&engine);
    commit(&engine, "cus", 5);
    commit(&engine, "cus", 6);
    let open_hold = engine.reserve("cus", 7, "", 0).unwrap();
    engine.wait_durable(open_hold.ticket, WAIT).unwrap();
    let entries = engine.outbox_pending(10).unwrap();
    engine.wait_durable(engine.outbox_claim(&[entries[0].seq], &entries[0].identifier).unwrap(), WAIT).unwrap();
    let instance = engine.instance_id();
    engine.close();
    drop(engine);
    // Rewrite it as the old release left it: no instance id, identifiers and reservation ids of 16 digits.
    let store = spendgate::store::Store::open(dir.path(), 64, true).unwrap();
    let legacy = |id: &str| id.replacen(&format!("{instance:016x}"), "", 1);
    {
        let mut wtxn = store.env.write_txn().unwrap();
        store.meta.delete(&mut wtxn, "instance_id").unwrap();
        store.meta.delete(&mut wtxn, "legacy_holds_below").unwrap();
        for entry in &entries {
            let mut old = store.outbox.get(&wtxn, &entry.seq).unwrap().unwrap();
            old.identifier = legacy(&old.identifier);
            store.outbox.put(&mut wtxn, &entry.seq, &old).unwrap();
        }
        wtxn.commit().unwrap();
    }
    drop(store);
    let engine = open(dir.path(), 1_000);
    assert_ne!(engine.instance_id(), instance);
    let upgraded = engine.outbox_pending(10).unwrap();
    assert_eq!(upgraded[0].identifier, legacy(&entries[0].identifier), "sent before: it keeps its identifier");
    assert_eq!(
        upgraded[1].identifier,
        format!("sg-rsv_{:016x}{}", engine.instance_id(), &legacy(&entries[1].identifier)["sg-rsv_".len()..]),
        "never sent: renamed"
    );
    let outcome = engine.commit(&legacy(&open_hold.reservation_id), 7).unwrap();
    assert_eq!(outcome.charged, 7, "the open hold's old id still commits");
    let fresh = engine.reserve("cus", 1, "", 0).unwrap();
    assert_eq!(fresh.reservation_id.len(), 36);
}
