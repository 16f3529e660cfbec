//! The footprint on disk: the map grows by itself, refuses new work only while granted work still fits, and settled
//! history moves to the archive. Runs without Python: `cargo test --test storage`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spendgate::archive::{archive_dir, read};
use spendgate::clock::ManualClock;
use spendgate::period::PeriodRule;
use spendgate::records::{Dimensions, UsageDetail, UsagePart};
use spendgate::usage::{MAX_DIMENSIONS, MAX_DIMENSION_KEY_BYTES, MAX_DIMENSION_VALUE_BYTES, MAX_USAGE_PARTS};
use spendgate::{BudgetUpdate, CommitArgs, Engine, EngineConfig, ErrorKind, ReserveArgs};

const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1024 * 1024;
const START_MS: i64 = 1_700_000_000_000;

fn open(path: &std::path::Path, clock: &Arc<ManualClock>, tweak: impl Fn(&mut EngineConfig)) -> Engine {
    let mut config = EngineConfig::new(path);
    config.map_size_mb = 8;
    config.relaxed = true; // thousands of small transactions; fsync would only slow the test
    config.max_holds_per_budget = 1_000_000;
    tweak(&mut config);
    Engine::open_with_clock(config, clock.clone()).unwrap()
}

/// The largest labels a call may carry, fresh for each `n`: the most one hold and its commit can write.
fn widest_dimensions(n: usize) -> Dimensions {
    (0..MAX_DIMENSIONS)
        .map(|key| {
            let key_text = format!("{key:0width$}", width = MAX_DIMENSION_KEY_BYTES);
            let value =
                format!("{n}-{key}-").repeat(MAX_DIMENSION_VALUE_BYTES)[..MAX_DIMENSION_VALUE_BYTES].to_string();
            (key_text, value)
        })
        .collect()
}

fn widest_usage(amount: i64) -> UsageDetail {
    let parts = (0..MAX_USAGE_PARTS)
        .map(|n| UsagePart {
            token_type: format!("type-{n:026}"),
            tokens: 1_000_000,
            units: if n == 0 { amount } else { 0 },
        })
        .collect();
    UsageDetail { model: "m".repeat(128), parts, cache_hit: false, fallback: false }
}

#[test]
fn holds_fill_the_room_the_disk_allows_and_every_one_still_commits_or_releases() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let engine = open(dir.path(), &clock, |c| c.map_max_mb = 40);
    let outcome = engine.set_budget("cus", 1 << 50, "").unwrap();
    engine.wait_durable(outcome.ticket, WAIT).unwrap();
    let mut ids = Vec::new();
    let refusal = loop {
        let args = ReserveArgs {
            customer_id: "cus",
            amount: 7,
            dimensions: widest_dimensions(ids.len()),
            ..Default::default()
        };
        match engine.reserve_with(&args) {
            Ok(o) => {
                assert!(o.granted, "{o:?}");
                engine.wait_durable(o.ticket, WAIT).unwrap();
                ids.push(o.reservation_id);
            }
            Err(err) => break err,
        }
        assert!(ids.len() < 100_000, "the map never filled");
    };
    assert_eq!(refusal.kind, ErrorKind::ResourceExhausted);
    assert!(refusal.message.contains("map_max_mb"), "{refusal}");
    assert!(ids.len() > 100, "only {} holds fit in 40 MiB", ids.len());
    let stats = engine.stats();
    assert!(stats.map_size_bytes <= 40 * MIB, "the map grew past map_max_mb: {stats:?}");
    for (n, id) in ids.iter().enumerate() {
        let ticket = if n % 2 == 0 {
            let usage = Some(widest_usage(9));
            let args =
                CommitArgs { reservation_id: id, amount: 9, usage, dimensions: widest_dimensions(n + 1_000_000) };
            engine.commit_with(args).unwrap().ticket
        } else {
            engine.release(id).unwrap().ticket
        };
        engine.wait_durable(ticket, WAIT).unwrap();
    }
    // The settler can still acknowledge every commit.
    let pending = engine.outbox_pending(10_000).unwrap();
    assert_eq!(pending.len(), ids.len().div_ceil(2));
    let seqs: Vec<u64> = pending.iter().map(|entry| entry.seq).collect();
    for chunk in seqs.chunks(64) {
        let ticket = engine.outbox_ack(chunk).unwrap();
        engine.wait_durable(ticket, WAIT).unwrap();
    }
    assert!(engine.failure().is_none(), "{:?}", engine.failure());
    engine.check_invariants().unwrap();
    let balance = engine.balance("cus").unwrap();
    assert_eq!((balance.spent, balance.reserved), (9 * ids.len().div_ceil(2) as i64, 0));
    engine.close();
}

#[test]
fn settled_entries_of_closed_periods_move_to_the_archive_and_seqs_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let tweak = |c: &mut EngineConfig| {
        c.ledger_retention_days = 0;
        c.prune_interval_ms = 50;
        c.reap_interval_ms = 5;
    };
    let engine = open(dir.path(), &clock, tweak);
    let period = PeriodRule::Fixed { anchor_ms: START_MS, length_ms: 1_000 };
    let update = BudgetUpdate { limit: Some(1 << 40), period: Some(period), ..Default::default() };
    engine.wait_durable(engine.update_budget("cus", &update).unwrap().ticket, WAIT).unwrap();
    let commit_n = |engine: &Engine, n: usize| {
        for _ in 0..n {
            let o = engine.reserve("cus", 3, "", 0).unwrap();
            let c = engine.commit(&o.reservation_id, 2).unwrap();
            engine.wait_durable(c.ticket, WAIT).unwrap();
        }
    };
    commit_n(&engine, 9_000);
    let seqs: Vec<u64> = engine.outbox_pending(10_000).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), 9_000);
    // Only settled entries of a closed period go: acknowledge all but the last, then close the period.
    for chunk in seqs[..seqs.len() - 1].chunks(1_000) {
        engine.wait_durable(engine.outbox_ack(chunk).unwrap(), WAIT).unwrap();
    }
    clock.advance_ms(1_000);
    engine.roll_due();
    let archive_file = archive_dir(dir.path()).join(spendgate::archive::file_name(START_MS));
    let deadline = Instant::now() + WAIT;
    let archived = loop {
        let len = std::fs::metadata(&archive_file).map(|m| m.len()).unwrap_or(0);
        let found = if len > 0 { read(&archive_file, len).unwrap() } else { Vec::new() };
        if found.len() >= seqs.len() - 1 || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let archived_seqs: BTreeSet<u64> = archived.iter().map(|e| e.seq).collect();
    assert_eq!(archived.len(), archived_seqs.len(), "an entry was archived twice");
    assert_eq!(archived_seqs, seqs[..seqs.len() - 1].iter().copied().collect(), "not every settled entry moved");
    assert!(archived.iter().all(|e| e.settled_ms.is_some() && e.amount == 2));
    engine.close();
    // The unsettled entry stayed; a new commit after a restart takes a new seq.
    let engine = open(dir.path(), &clock, tweak);
    assert_eq!(engine.outbox_pending(10).unwrap().len(), 1);
    commit_n(&engine, 1);
    let newest = engine.outbox_pending(10).unwrap().last().unwrap().seq;
    assert!(newest > *seqs.last().unwrap(), "seq {newest} reused");
    engine.close();
}

#[test]
fn a_restart_keeps_the_grown_map_and_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let engine = open(dir.path(), &clock, |_| {});
    engine.wait_durable(engine.set_budget("cus", 1 << 50, "").unwrap().ticket, WAIT).unwrap();
    for n in 0..3_000 {
        let args =
            ReserveArgs { customer_id: "cus", amount: 1, dimensions: widest_dimensions(n), ..Default::default() };
        let o = engine.reserve_with(&args).unwrap();
        engine.wait_durable(engine.commit(&o.reservation_id, 1).unwrap().ticket, WAIT).unwrap();
    }
    let before = engine.stats();
    assert!(before.map_size_bytes > 8 * MIB, "{before:?}");
    assert!(before.map_used_bytes <= before.map_high_water_bytes, "{before:?}");
    engine.close();
    let engine = open(dir.path(), &clock, |_| {});
    assert_eq!(engine.balance("cus").unwrap().spent, 3_000);
    let o = engine.reserve("cus", 1, "", 0).unwrap();
    engine.wait_durable(engine.commit(&o.reservation_id, 1).unwrap().ticket, WAIT).unwrap();
    assert!(engine.failure().is_none());
    engine.close();
}
