//! Randomized concurrency: many threads reserve, commit, release and let holds expire against a few budgets while a
//! checker thread asserts `spent + held <= limit + overdraft` at every step it sees. At the end the books must equal
//! the threads' own record of what was acknowledged, and a reopened environment must hold the same books.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spendgate::clock::ManualClock;
use spendgate::{DenyReason, Engine, EngineConfig};

const WAIT: Duration = Duration::from_secs(30);
const CUSTOMERS: [&str; 3] = ["hot", "warm", "cold"];
const LIMITS: [i64; 3] = [5_000, 20_000, 1_000_000];

#[derive(Default, Clone)]
struct Acked {
    spent: HashMap<&'static str, i64>,
    overdraft: HashMap<&'static str, i64>,
}

fn open(path: &std::path::Path, clock: Arc<ManualClock>, relaxed: bool) -> Engine {
    let mut config = EngineConfig::new(path);
    config.map_size_mb = 256;
    config.relaxed = relaxed;
    config.reap_interval_ms = 1;
    config.max_holds_per_budget = 64;
    Engine::open_with_clock(config, clock).unwrap()
}

fn worker(engine: &Engine, clock: &ManualClock, seed: u64, ops: usize, over_commits: bool) -> Acked {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut open_holds: Vec<(&'static str, String, i64)> = Vec::new();
    let mut acked = Acked::default();
    for step in 0..ops {
        let roll = rng.random_range(0..100);
        if roll < 50 || open_holds.is_empty() {
            let i = rng.random_range(0..CUSTOMERS.len());
            let amount = rng.random_range(1..=400);
            let ttl_ms = rng.random_range(1..=50);
            let key = if rng.random_bool(0.2) { format!("k-{seed}-{step}") } else { String::new() };
            let outcome = engine.reserve(CUSTOMERS[i], amount, &key, ttl_ms).unwrap();
            if outcome.granted {
                engine.wait_durable(outcome.ticket, WAIT).unwrap();
                if !key.is_empty() {
                    let retry = engine.reserve(CUSTOMERS[i], amount, &key, ttl_ms).unwrap();
                    assert_eq!(retry.reservation_id, outcome.reservation_id);
                }
                open_holds.push((CUSTOMERS[i], outcome.reservation_id, amount));
            } else {
                assert_ne!(outcome.reason, DenyReason::None);
            }
        } else if roll < 85 {
            let (customer, id, amount) = open_holds.swap_remove(rng.random_range(0..open_holds.len()));
            // Mostly under the hold, sometimes over it (when this run allows it).
            let ceiling = if over_commits { amount + amount / 4 } else { amount };
            let actual = rng.random_range(0..=ceiling);
            let outcome = engine.commit(&id, actual).unwrap();
            engine.wait_durable(outcome.ticket, WAIT).unwrap();
            assert_eq!(outcome.charged, actual);
            *acked.spent.entry(customer).or_default() += actual;
            *acked.overdraft.entry(customer).or_default() += outcome.excess;
        } else if roll < 97 {
            let (_, id, _) = open_holds.swap_remove(rng.random_range(0..open_holds.len()));
            let outcome = engine.release(&id).unwrap();
            engine.wait_durable(outcome.ticket, WAIT).unwrap();
        } else if over_commits {
            // Let holds expire: a commit after expiry is billed in full and may pass the limit, like an over-commit.
            clock.advance_ms(rng.random_range(1..=20));
        }
    }
    // Leave the rest to expire or stay open.
    acked
}

fn check_running_invariant(engine: &Engine, over_commits: bool) {
    for customer in CUSTOMERS {
        let b = engine.balance(customer).unwrap();
        assert!(b.spent + b.reserved <= b.limit + b.overdraft, "{customer}: {b:?}");
        if !over_commits {
            // Without over-commits or late commits nothing may ever pass the limit.
            assert!(b.spent + b.reserved <= b.limit, "{customer}: {b:?}");
            assert_eq!(b.overdraft, 0, "{customer}: {b:?}");
        }
        assert!(b.remaining >= 0 && b.reserved >= 0 && b.active_holds >= 0, "{b:?}");
    }
}

fn run(relaxed: bool, threads: usize, ops: usize, seed: u64, over_commits: bool) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let engine = Arc::new(open(dir.path(), clock.clone(), relaxed));
    for (customer, limit) in CUSTOMERS.iter().zip(LIMITS) {
        engine.wait_durable(engine.set_budget(customer, limit, "").unwrap().ticket, WAIT).unwrap();
    }
    let done = Arc::new(AtomicBool::new(false));
    let checker = {
        let (engine, done) = (engine.clone(), done.clone());
        std::thread::spawn(move || {
            let mut checks = 0u64;
            while !done.load(Ordering::SeqCst) {
                check_running_invariant(&engine, over_commits);
                checks += 1;
            }
            checks
        })
    };
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (engine, clock, start) = (engine.clone(), clock.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                worker(&engine, &clock, seed * 1000 + t as u64, ops, over_commits)
            })
        })
        .collect();
    let mut total = Acked::default();
    for handle in handles {
        let acked = handle.join().unwrap();
        for (c, v) in acked.spent {
            *total.spent.entry(c).or_default() += v;
        }
        for (c, v) in acked.overdraft {
            *total.overdraft.entry(c).or_default() += v;
        }
    }
    done.store(true, Ordering::SeqCst);
    assert!(checker.join().unwrap() > 0);

    // Quiet now: the books must equal what was acknowledged, exactly.
    engine.check_invariants().unwrap();
    for customer in CUSTOMERS {
        let b = engine.balance(customer).unwrap();
        assert_eq!(b.spent, total.spent.get(customer).copied().unwrap_or(0), "{customer}");
        assert_eq!(b.overdraft, total.overdraft.get(customer).copied().unwrap_or(0), "{customer}");
    }
    // Expire everything, then compare memory with a reopened environment.
    clock.advance_ms(1_000);
    engine.reap_expired();
    let before: Vec<_> = CUSTOMERS.iter().map(|c| engine.balance(c).unwrap()).collect();
    for b in &before {
        assert_eq!((b.reserved, b.active_holds), (0, 0), "{b:?}");
    }
    engine.close();
    drop(engine);
    let reopened = open(dir.path(), clock, relaxed);
    let after: Vec<_> = CUSTOMERS.iter().map(|c| reopened.balance(c).unwrap()).collect();
    assert_eq!(before, after);
    reopened.check_invariants().unwrap();
}

#[test]
fn randomized_threads_never_overspend_and_the_books_survive_a_reopen() {
    for seed in 1..=4 {
        run(true, 8, 1_500, seed, seed % 2 == 0);
    }
}

#[test]
fn randomized_with_fsync_durability() {
    run(false, 8, 300, 99, true);
}

#[test]
fn sixteen_threads_on_one_budget_get_exactly_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(0));
    let mut config = EngineConfig::new(dir.path());
    config.relaxed = true;
    config.max_holds_per_budget = 100_000;
    let engine = Arc::new(Engine::open_with_clock(config, clock).unwrap());
    engine.set_budget("hot", 1_000, "").unwrap();
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let engine = engine.clone();
            std::thread::spawn(move || (0..200).filter(|_| engine.reserve("hot", 1, "", 0).unwrap().granted).count())
        })
        .collect();
    let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(granted, 1_000);
    let b = engine.balance("hot").unwrap();
    assert_eq!((b.reserved, b.remaining, b.active_holds), (1_000, 0, 1_000));
}
