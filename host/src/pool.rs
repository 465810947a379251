//! The worker pool of one handler: how many workers there are, how many are busy, and the
//! target the scaler sets.
//!
//! Workers are tasks owned by the consumer. Growing spawns new ones; shrinking lowers the
//! target, and idle workers retire themselves until the count matches. A busy worker is never
//! interrupted: the pool never drops below the work in flight.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Worker counts and the retirement signal.
#[derive(Debug)]
pub struct Pool {
    min: usize,
    max: usize,
    target: AtomicUsize,
    live: AtomicUsize,
    busy: AtomicUsize,
    busy_peak: AtomicUsize,
    retire: Notify,
}

impl Pool {
    /// A pool that will hold between `min` and `max` workers, starting at `min`.
    pub fn new(min: usize, max: usize) -> Pool {
        let min = min.max(1);
        Pool {
            min,
            max: max.max(min),
            target: AtomicUsize::new(min),
            live: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            busy_peak: AtomicUsize::new(0),
            retire: Notify::new(),
        }
    }

    /// The smallest size.
    pub fn min(&self) -> usize {
        self.min
    }

    /// The largest size.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The size the pool is moving to.
    pub fn target(&self) -> usize {
        self.target.load(Ordering::Relaxed)
    }

    /// Workers alive.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Workers running a message.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    /// The most workers ever busy at once.
    pub fn busy_peak(&self) -> usize {
        self.busy_peak.load(Ordering::Relaxed)
    }

    /// Sets the target, clamped to `min..=max`; idle workers above it retire.
    pub fn set_target(&self, n: usize) -> usize {
        let n = n.clamp(self.min, self.max);
        let before = self.target.swap(n, Ordering::Relaxed);
        if n < before {
            self.retire.notify_waiters();
        }
        n
    }

    /// How many workers to spawn to reach the target; counts them as live.
    pub fn claim_spawns(&self) -> usize {
        let target = self.target();
        let mut spawned = 0;
        while self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                (live < target).then_some(live + 1)
            })
            .is_ok()
        {
            spawned += 1;
        }
        spawned
    }

    /// Called by an idle worker: true if it should exit (the pool is above its target); the
    /// worker is then no longer counted.
    pub fn try_retire(&self) -> bool {
        let target = self.target();
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |live| {
                (live > target).then_some(live - 1)
            })
            .is_ok()
    }

    /// A worker left for another reason (the executor closed).
    pub fn left(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves when the target drops: idle workers then check [`Pool::try_retire`].
    pub async fn shrunk(&self) {
        self.retire.notified().await;
    }

    /// Marks a worker busy until the guard drops.
    pub fn busy_guard(&self) -> BusyGuard<'_> {
        let now = self.busy.fetch_add(1, Ordering::Relaxed) + 1;
        self.busy_peak.fetch_max(now, Ordering::Relaxed);
        BusyGuard(self)
    }
}

/// Counts a worker busy while alive.
pub struct BusyGuard<'a>(&'a Pool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_target_and_retires_down_to_it() {
        let pool = Pool::new(1, 8);
        assert_eq!(pool.claim_spawns(), 1);
        assert_eq!(pool.set_target(20), 8, "clamped to max");
        assert_eq!(pool.claim_spawns(), 7);
        assert_eq!(pool.live(), 8);
        assert!(!pool.try_retire());
        pool.set_target(0);
        assert_eq!(pool.target(), 1, "clamped to min");
        let retired = (0..10).filter(|_| pool.try_retire()).count();
        assert_eq!(retired, 7);
        assert_eq!(pool.live(), 1);
    }

    #[test]
    fn busy_and_peak() {
        let pool = Pool::new(1, 4);
        {
            let _a = pool.busy_guard();
            let _b = pool.busy_guard();
            assert_eq!(pool.busy(), 2);
        }
        assert_eq!(pool.busy(), 0);
        assert_eq!(pool.busy_peak(), 2);
    }
}
