//! Wall-clock milliseconds, behind a trait so that tests drive hold expiry without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("the system clock is before 1970");
        i64::try_from(since_epoch.as_millis()).expect("milliseconds since 1970 fit in i64")
    }
}

/// A clock that only moves when told to.
pub struct ManualClock {
    now_ms: AtomicI64,
}

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        ManualClock { now_ms: AtomicI64::new(start_ms) }
    }
    pub fn advance_ms(&self, delta_ms: i64) {
        assert!(delta_ms >= 0, "time never runs backwards");
        self.now_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}
