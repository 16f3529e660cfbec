//! The engine in process, from Rust, with no Python: `cargo bench --bench engine` (bench/run.py runs it).
//!
//! One op = `reserve(amount = 1)` then `commit(amount = 1)` on that hold. Throughput is reported in ops (pairs) per
//! second; criterion's `time` is per iteration: one op, except in `group_commit_{WAITERS}_threads` (WAITERS ops, one per
//! thread). For the threaded figures it is wall time over all threads together.
//!
//! - `floor/*`: a bare `AtomicI64::fetch_add`, one thread and THREADS threads on one counter: the floor under any
//!   admission counter.
//! - `reserve_commit/*`: the engine's calls only. The durability of what a sample queued is awaited after its clock
//!   stopped, so these are the counters, the hold table and the hand-off to the writer, not the disk.
//!   `1_thread`; `{THREADS}_threads_hot_budget` (every thread on one budget: compare-and-swap contention);
//!   `{THREADS}_threads_many_budgets` (each thread rotates over its own budgets).
//! - `durable/*`: the whole cost, with each op acknowledged only once durable (LMDB + fsync), as the sidecar does:
//!   `fsync_each_op_1_thread` (one op in flight: one fsync per op), `group_commit_{WAITERS}_threads` (WAITERS
//!   threads each waiting for its own op: the writer batches them, one fsync per batch), and
//!   `group_commit_1_thread_wait_every_1024` (one thread, waiting every 1024 ops).
//!
//! Measurement times are short on purpose (the suite must run in a few minutes on two cores); override them on the
//! command line: `cargo bench --bench engine -- --measurement-time 5 --warm-up-time 1`.

use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spendgate::{Engine, EngineConfig};

/// Threads for the contention figures. Fixed (not the CPU count) so that runs on different machines compare.
const THREADS: usize = 4;
/// Threads each waiting for their own op to be durable: about what a busy sidecar has in flight.
const WAITERS: usize = 64;
const WAIT: Duration = Duration::from_secs(60);
const BUDGETS_PER_THREAD: usize = 16;

struct Bench {
    engine: Engine,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn open(budgets: usize) -> Bench {
        let dir = tempfile::Builder::new().prefix("spendgate-criterion-").tempdir().expect("temp dir");
        let mut config = EngineConfig::new(dir.path());
        // Millions of ops, each with a hold record, a ledger entry and an outbox entry: a large (sparse) map keeps
        // the 90 % high-water mark out of the way, and a deep queue keeps the calls-only figures from filling it.
        config.map_size_mb = 32 * 1024;
        config.write_queue_capacity = 1 << 26;
        config.max_outbox_entries = 1 << 40;
        let engine = Engine::open(config).expect("open engine");
        let mut ticket = 0;
        for i in 0..budgets {
            ticket = engine.set_budget(&customer(i), 1 << 53, "").expect("set_budget").ticket;
        }
        engine.wait_durable(ticket, WAIT).expect("durable");
        Bench { engine, _dir: dir }
    }

    /// One op; returns the commit's durability ticket.
    #[inline]
    fn op(&self, customer: &str) -> u64 {
        let held = self.engine.reserve(customer, 1, "", 0).expect("reserve");
        assert!(held.granted, "a bench budget denied a 1-unit hold: {held:?}");
        self.engine.commit(&held.reservation_id, 1).expect("commit").ticket
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.engine.close();
    }
}

fn customer(i: usize) -> String {
    format!("bench-{i:05}")
}

/// Run `per_thread(thread_index, ops)` on `threads` threads, `total` ops split among them, all released together;
/// returns the wall time from the release until the last thread finished its share.
fn threaded(threads: usize, total: u64, per_thread: impl Fn(usize, u64) + Sync) -> Duration {
    let barrier = Barrier::new(threads + 1);
    let per_thread = &per_thread;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = total / threads as u64 + u64::from((t as u64) < total % threads as u64);
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    per_thread(t, share);
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for handle in handles {
            handle.join().expect("bench thread");
        }
        start.elapsed()
    })
}

fn floor(c: &mut Criterion) {
    let mut group = c.benchmark_group("floor");
    group.throughput(Throughput::Elements(1));
    let counter = AtomicI64::new(0);
    group.bench_function("atomic_fetch_add_1_thread", |b| b.iter(|| black_box(counter.fetch_add(1, Ordering::SeqCst))));
    let shared = Arc::new(AtomicI64::new(0));
    group.bench_function(format!("atomic_fetch_add_{THREADS}_threads_one_counter"), |b| {
        b.iter_custom(|iters| {
            threaded(THREADS, iters, |_, n| {
                for _ in 0..n {
                    black_box(shared.fetch_add(1, Ordering::SeqCst));
                }
            })
        })
    });
    group.finish();
}

fn reserve_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("reserve_commit");
    group.throughput(Throughput::Elements(1));

    let bench = Bench::open(BUDGETS_PER_THREAD);
    let names: Vec<String> = (0..BUDGETS_PER_THREAD).map(customer).collect();
    group.bench_function("1_thread", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut ticket = 0;
            for i in 0..iters as usize {
                ticket = bench.op(&names[i % names.len()]);
            }
            let elapsed = start.elapsed();
            bench.engine.wait_durable(ticket, WAIT).expect("durable"); // untimed: drain the writer between samples
            elapsed
        })
    });
    drop(bench);

    let bench = Bench::open(1);
    let hot = customer(0);
    group.bench_function(format!("{THREADS}_threads_hot_budget"), |b| {
        b.iter_custom(|iters| {
            let elapsed = threaded(THREADS, iters, |_, n| {
                for _ in 0..n {
                    bench.op(&hot);
                }
            });
            drain(&bench.engine);
            elapsed
        })
    });
    drop(bench);

    let bench = Bench::open(THREADS * BUDGETS_PER_THREAD);
    let names: Vec<String> = (0..THREADS * BUDGETS_PER_THREAD).map(customer).collect();
    group.bench_function(format!("{THREADS}_threads_many_budgets"), |b| {
        b.iter_custom(|iters| {
            let elapsed = threaded(THREADS, iters, |t, n| {
                let mine = &names[t * BUDGETS_PER_THREAD..(t + 1) * BUDGETS_PER_THREAD];
                for i in 0..n as usize {
                    bench.op(&mine[i % BUDGETS_PER_THREAD]);
                }
            });
            drain(&bench.engine);
            elapsed
        })
    });
    drop(bench);
    group.finish();
}

/// Wait until everything queued so far is durable.
fn drain(engine: &Engine) {
    // A fresh op takes the next ticket: once it is durable, so is everything before it.
    let ticket = engine.set_budget("bench-drain", 1, "").expect("set_budget").ticket;
    engine.wait_durable(ticket, WAIT).expect("durable");
}

fn durable(c: &mut Criterion) {
    let mut group = c.benchmark_group("durable");
    group.throughput(Throughput::Elements(1));
    // An fsync'd op takes about a millisecond here: fewer samples, so that the figure stays within seconds.
    group.sample_size(10);

    let bench = Bench::open(BUDGETS_PER_THREAD);
    let names: Vec<String> = (0..BUDGETS_PER_THREAD).map(customer).collect();
    group.bench_function("fsync_each_op_1_thread", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            let ticket = bench.op(&names[i % names.len()]);
            bench.engine.wait_durable(ticket, WAIT).expect("durable");
        })
    });
    group.bench_function("group_commit_1_thread_wait_every_1024", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut ticket = 0;
            for i in 0..iters as usize {
                ticket = bench.op(&names[i % names.len()]);
                if i % 1024 == 1023 {
                    bench.engine.wait_durable(ticket, WAIT).expect("durable");
                }
            }
            bench.engine.wait_durable(ticket, WAIT).expect("durable");
            start.elapsed()
        })
    });
    drop(bench);

    // Here one iteration is WAITERS ops, one per thread, each waiting for its own.
    group.throughput(Throughput::Elements(WAITERS as u64));
    let bench = Bench::open(WAITERS);
    let names: Vec<String> = (0..WAITERS).map(customer).collect();
    group.bench_function(format!("group_commit_{WAITERS}_threads"), |b| {
        b.iter_custom(|iters| {
            threaded(WAITERS, iters * WAITERS as u64, |t, n| {
                for _ in 0..n {
                    let ticket = bench.op(&names[t]);
                    bench.engine.wait_durable(ticket, WAIT).expect("durable");
                }
            })
        })
    });
    drop(bench);
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = floor, reserve_commit, durable
}
criterion_main!(benches);
