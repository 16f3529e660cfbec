//! The audit trail (Engine::list_ledger): LMDB's ledger and the archive's, paged by seq, with settlement states, while
//! entries move to the archive between pages; and the per-page work bounds. `cargo test --test ledger`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spendgate::clock::ManualClock;
use spendgate::limits::{MAX_LEDGER_PAGE, MAX_LEDGER_SCAN_PER_PAGE};
use spendgate::period::PeriodRule;
use spendgate::{BudgetUpdate, Engine, EngineConfig, ErrorKind, LedgerRow, SettlementState};

const WAIT: Duration = Duration::from_secs(60);
const START_MS: i64 = 1_700_000_000_000;

fn open(path: &std::path::Path, clock: &Arc<ManualClock>) -> Engine {
    let mut config = EngineConfig::new(path);
    config.map_size_mb = 64;
    config.relaxed = true; // thousands of small transactions; fsync would only slow the test
    config.max_holds_per_budget = 1_000_000;
    config.ledger_retention_days = 0;
    config.prune_interval_ms = 20;
    config.reap_interval_ms = 5;
    Engine::open_with_clock(config, clock.clone()).unwrap()
}

fn budget(engine: &Engine, customer_id: &str, period: PeriodRule) {
    let update = BudgetUpdate { limit: Some(1 << 40), period: Some(period), ..Default::default() };
    engine.wait_durable(engine.update_budget(customer_id, &update).unwrap().ticket, WAIT).unwrap();
}

fn commit(engine: &Engine, customer_id: &str, amount: i64) {
    let o = engine.reserve(customer_id, amount, "", 0).unwrap();
    assert!(o.granted, "{o:?}");
    engine.wait_durable(engine.commit(&o.reservation_id, amount).unwrap().ticket, WAIT).unwrap();
}

/// Every page from `after` on, until no more.
fn page_all(engine: &Engine, customer_id: &str, at_ms: Option<i64>, mut after: u64, limit: usize) -> Vec<LedgerRow> {
    let mut rows = Vec::new();
    loop {
        let page = engine.list_ledger(customer_id, at_ms, after, limit).unwrap();
        assert!(page.rows.len() <= limit);
        assert!(page.rows.iter().all(|row| row.entry.seq > after && row.entry.seq <= page.next_after));
        rows.extend(page.rows);
        if !page.more {
            return rows;
        }
        assert!(page.next_after > after, "the cursor did not advance from {after}");
        after = page.next_after;
    }
}

#[test]
fn pages_merge_lmdb_and_the_archive_in_seq_order_while_entries_move_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let engine = open(dir.path(), &clock);
    budget(&engine, "cus", PeriodRule::Fixed { anchor_ms: START_MS, length_ms: 1_000 });
    budget(&engine, "other", PeriodRule::Lifetime);
    for n in 0..7_500 {
        commit(&engine, "cus", 2);
        if n % 3 == 0 {
            commit(&engine, "other", 1);
        }
    }
    let outbox = engine.outbox_pending(10_000).unwrap();
    assert_eq!(outbox.len(), 10_000);
    let seqs_of =
        |customer: &str| -> Vec<u64> { outbox.iter().filter(|e| e.customer_id == customer).map(|e| e.seq).collect() };
    let (cus_seqs, other_seqs) = (seqs_of("cus"), seqs_of("other"));
    assert_eq!(cus_seqs.len(), 7_500);
    // Settle every entry but: every 1000th of cus dead-lettered, the newest left pending. Claims are kept.
    let dead: Vec<u64> = cus_seqs.iter().copied().step_by(1_000).collect();
    let newest = *cus_seqs.last().unwrap();
    engine.wait_durable(engine.outbox_dead_letter(&dead, "Stripe has no such customer", false).unwrap(), WAIT).unwrap();
    let settle: Vec<u64> = cus_seqs.iter().copied().filter(|s| !dead.contains(s) && *s != newest).collect();
    for chunk in settle.chunks(500).chain(other_seqs.chunks(500)) {
        let claim = format!("sg-claim-{}-agg{}x{}@{}", chunk[0], chunk.len(), 2 * chunk.len(), START_MS);
        engine.wait_durable(engine.outbox_claim(chunk, &claim).unwrap(), WAIT).unwrap();
        engine.wait_durable(engine.outbox_ack(chunk).unwrap(), WAIT).unwrap();
    }

    // Two pages before the period closes: everything is in LMDB.
    let first = engine.list_ledger("cus", None, 0, 997).unwrap();
    assert!(first.more && first.rows.len() == 997 && first.rows.iter().all(|r| !r.archived));
    let second = engine.list_ledger("cus", None, first.next_after, 997).unwrap();
    let mut rows: Vec<LedgerRow> = first.rows.into_iter().chain(second.rows).collect();
    let cursor = second.next_after;

    // Close the period; the archiving passes move the settled entries out of LMDB meanwhile.
    clock.advance_ms(1_000);
    engine.roll_due();
    let at = Some(START_MS);
    let deadline = Instant::now() + WAIT;
    while engine.closed_periods("cus", 1).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the period did not close");
        std::thread::sleep(Duration::from_millis(5)); // the roll is on its way to LMDB
    }
    while page_all(&engine, "cus", at, 0, MAX_LEDGER_PAGE).iter().filter(|r| r.archived).count() < settle.len() {
        assert!(Instant::now() < deadline, "the settled entries were not archived");
        std::thread::sleep(Duration::from_millis(20));
    }
    rows.extend(page_all(&engine, "cus", at, cursor, 997));
    let seqs: Vec<u64> = rows.iter().map(|r| r.entry.seq).collect();
    assert_eq!(seqs, cus_seqs, "pages across the archiving skipped or repeated an entry");

    let by_seq: BTreeMap<u64, &LedgerRow> = rows.iter().map(|r| (r.entry.seq, r)).collect();
    for seq in &dead {
        let row = by_seq[seq];
        assert_eq!((row.state, row.archived), (SettlementState::DeadLetter, false));
        assert_eq!(row.dead_letter_reason, "Stripe has no such customer");
    }
    assert_eq!(by_seq[&newest].state, SettlementState::Pending);
    assert_eq!(by_seq[&newest].identifier, format!("sg-{}", by_seq[&newest].entry.reservation_id));
    let full = page_all(&engine, "cus", at, 0, MAX_LEDGER_PAGE);
    let sent: Vec<&LedgerRow> = full.iter().filter(|r| r.state == SettlementState::Sent).collect();
    assert_eq!(sent.len(), settle.len());
    assert!(settle.len() > spendgate::limits::MAX_ARCHIVE_PER_TXN, "the archive has one member only");
    assert!(sent.iter().all(|r| r.archived && r.entry.settled_ms.is_some()));
    let claimed = sent.iter().find(|r| r.entry.seq == settle[1]).unwrap();
    assert_eq!(claimed.claim.as_deref(), Some(format!("sg-claim-{}-agg500x1000@{START_MS}", settle[0]).as_str()));
    // The listing adds up to the period's usage record, and another customer's entries never show.
    let total: i64 = full.iter().map(|r| r.entry.amount).sum();
    let usage = engine.usage("cus", at).unwrap();
    assert_eq!((full.len() as u64, total), (usage.record.commits, usage.record.units));
    assert!(full.iter().all(|r| r.entry.customer_id == "cus"));
    // The current period is empty so far.
    let now = engine.list_ledger("cus", None, 0, 10).unwrap();
    assert!(now.rows.is_empty() && !now.more);
    engine.close();
}

#[test]
fn a_page_stops_at_the_scan_bound_with_a_cursor_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let engine = open(dir.path(), &clock);
    budget(&engine, "quiet", PeriodRule::Lifetime);
    budget(&engine, "busy", PeriodRule::Lifetime);
    commit(&engine, "quiet", 5);
    for _ in 0..MAX_LEDGER_SCAN_PER_PAGE + 10 {
        commit(&engine, "busy", 1);
    }
    commit(&engine, "quiet", 6);
    let first = engine.list_ledger("quiet", None, 0, 10).unwrap();
    assert_eq!(first.rows.iter().map(|r| r.entry.amount).collect::<Vec<_>>(), [5]);
    assert!(first.more && first.scanned as usize == MAX_LEDGER_SCAN_PER_PAGE);
    assert_eq!(first.next_after, MAX_LEDGER_SCAN_PER_PAGE as u64);
    let second = engine.list_ledger("quiet", None, first.next_after, 10).unwrap();
    assert_eq!(second.rows.iter().map(|r| r.entry.amount).collect::<Vec<_>>(), [6]);
    assert!(!second.more && second.next_after == MAX_LEDGER_SCAN_PER_PAGE as u64 + 12);

    let refused =
        |customer: &str, after: u64, limit: usize| engine.list_ledger(customer, None, after, limit).unwrap_err();
    let too_many = refused("quiet", 0, MAX_LEDGER_PAGE + 1);
    assert_eq!(too_many.kind, ErrorKind::InvalidArgument);
    assert!(too_many.message.contains("1..=1000"), "{too_many}");
    assert_eq!(refused("quiet", 0, 0).kind, ErrorKind::InvalidArgument);
    let past_end = refused("quiet", MAX_LEDGER_SCAN_PER_PAGE as u64 + 13, 10);
    assert_eq!(past_end.kind, ErrorKind::InvalidArgument);
    assert!(past_end.message.contains("last seq is 20012"), "{past_end}");
    assert_eq!(refused("nobody", 0, 10).kind, ErrorKind::NotFound);
    budget(&engine, "fixed", PeriodRule::Fixed { anchor_ms: START_MS, length_ms: 1_000 });
    let old = engine.list_ledger("fixed", Some(START_MS - 10_000), 0, 10).unwrap_err();
    assert_eq!(old.kind, ErrorKind::NotFound);
    engine.close();
}
