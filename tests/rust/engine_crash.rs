//! kill -9 at random points: a child process (this test binary, re-run with an env var) commits in a loop with fsync
//! durability and prints each commit once it is durable; the parent kills it mid-stream, reopens the environment and
//! checks that every printed (acknowledged) commit is on the books, and nothing beyond what was attempted.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use spendgate::{Engine, EngineConfig};

const CHILD_ENV: &str = "SPENDGATE_CRASH_CHILD_DIR";
const WAIT: Duration = Duration::from_secs(30);
const THREADS: usize = 4;

fn config(dir: &str) -> EngineConfig {
    let mut config = EngineConfig::new(dir);
    config.map_size_mb = 64;
    config.max_holds_per_budget = 1_000;
    config
}

/// The child: 4 threads reserve + commit forever. "A <amount>" = acknowledged commit; "T <amount>" = attempted.
fn child(dir: &str) -> ! {
    let engine = Arc::new(Engine::open(config(dir)).unwrap());
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (engine, out) = (engine.clone(), out.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64 + std::process::id() as u64);
                loop {
                    let amount = rng.random_range(1..=9);
                    let r = engine.reserve("cus", amount, "", 0).unwrap();
                    if !r.granted {
                        continue;
                    }
                    engine.wait_durable(r.ticket, WAIT).unwrap();
                    let actual = rng.random_range(0..=amount);
                    use std::io::Write;
                    writeln!(out.lock().unwrap(), "T {actual}").unwrap();
                    let c = engine.commit(&r.reservation_id, actual).unwrap();
                    engine.wait_durable(c.ticket, WAIT).unwrap();
                    writeln!(out.lock().unwrap(), "A {actual}").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    unreachable!("the child runs until killed")
}

#[test]
fn every_commit_acknowledged_before_kill_9_is_on_the_books() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_string();
    {
        let engine = Engine::open(config(&path)).unwrap();
        engine.wait_durable(engine.set_budget("cus", 1 << 40, "").unwrap().ticket, WAIT).unwrap();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut acked, mut attempted) = (0i64, 0i64);
    for round in 0..6 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "every_commit_acknowledged_before_kill_9_is_on_the_books", "--nocapture"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                lines.push(line.unwrap());
            }
            lines
        });
        // Kill after a random amount of progress (bounded in time).
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(50..600));
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            let (tag, amount) = line.split_once(' ').unwrap_or(("", ""));
            let Ok(amount) = amount.parse::<i64>() else { continue };
            match tag {
                "A" => acked += amount,
                "T" => attempted += amount,
                _ => {}
            }
        }
        let engine = Engine::open(config(&path)).unwrap();
        let b = engine.balance("cus").unwrap();
        assert!(b.spent >= acked, "round {round}: spent {} < acknowledged {acked}", b.spent);
        assert!(b.spent <= attempted, "round {round}: spent {} > attempted {attempted}", b.spent);
        engine.check_invariants().unwrap();
        // Unacknowledged commits that made it count from now on as acknowledged (they are on the books).
        acked = b.spent;
    }
    assert!(acked > 0, "the child never committed anything");
}
