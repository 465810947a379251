//! The default prefetch of an unordered handler: how many messages a host holds, pulled and
//! not yet started. Few enough that a slow host does not hoard what another could run, enough
//! that a fast handler is not held back by a pull round trip per handful of messages.

use std::time::Duration;

/// The default holds at least what the pool completes in this long.
pub const HORIZON: Duration = Duration::from_millis(10);

/// The default for a pool of `target` workers completing `rate` messages a second: 8 per
/// worker (32 at least), or what it completes in [`HORIZON`] if that is more.
pub fn default(target: usize, rate: u64) -> usize {
    let horizon = rate.saturating_mul(HORIZON.as_millis() as u64) / 1000;
    (8 * target)
        .max(32)
        .max(usize::try_from(horizon).unwrap_or(usize::MAX))
}

/// The completion rate the default is sized from: the mean of the `old` rate and the one
/// just seen (`completed` messages in `elapsed`), so one quiet tick halves it, not zeroes it.
pub fn smoothed(old: u64, completed: u64, elapsed: Duration) -> u64 {
    let nanos = elapsed.as_nanos();
    if nanos == 0 {
        return old;
    }
    let now = u128::from(completed) * 1_000_000_000 / nanos;
    u64::try_from((u128::from(old) + now) / 2).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::{default, smoothed};
    use std::time::Duration;

    #[test]
    fn the_rate_is_smoothed_over_ticks() {
        let tick = Duration::from_millis(100);
        assert_eq!(smoothed(0, 5_000, tick), 25_000);
        assert_eq!(smoothed(25_000, 5_000, tick), 37_500);
        assert_eq!(smoothed(40_000, 0, tick), 20_000);
        assert_eq!(smoothed(7, 100, Duration::ZERO), 7);
    }

    #[test]
    fn a_slow_pool_holds_a_few_per_worker_and_a_fast_one_what_it_runs_in_the_horizon() {
        // 4 workers at 2 ms a message: a few each, as for any slow handler.
        assert_eq!(default(4, 2_000), 32);
        assert_eq!(default(16, 0), 128);
        // A fast handler: a pull per few messages would cost more than the handler.
        assert_eq!(default(4, 50_000), 500);
        assert!(default(4, u64::MAX) > 1_000_000);
    }
}
