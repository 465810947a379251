//! What the operating system says about this process's CPU: the time it has used and the
//! cores it may use. The autoscaler reads both once a tick to tell a CPU-bound handler from an
//! I/O-bound one (see [`crate::scaler`]); nothing on the message path calls them.

use std::time::Duration;

/// User plus system CPU time this process (all its threads) has used so far; `None` where the
/// operating system does not say.
#[cfg(unix)]
pub fn process_time() -> Option<Duration> {
    // SAFETY: `getrusage` only writes into the zeroed struct it is given, and RUSAGE_SELF is
    // always a valid `who`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).ok()?)
            .checked_add(Duration::from_micros(u64::try_from(t.tv_usec).ok()?))
    };
    time(usage.ru_utime)?.checked_add(time(usage.ru_stime)?)
}

/// User plus system CPU time this process has used so far; `None` where unsupported.
#[cfg(not(unix))]
pub fn process_time() -> Option<Duration> {
    None
}

/// Cores this process may use (affinity and cgroup quotas included), at least 1.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn process_time_advances_with_work() {
        let before = process_time().expect("getrusage works on unix");
        let mut x = 0u64;
        let mut after = before;
        // Spin until the clock moves (its resolution can be a scheduler tick).
        for i in 0u64.. {
            x = x.wrapping_mul(31).wrapping_add(i);
            if i % 1_000_000 == 0 {
                after = process_time().expect("getrusage works on unix");
                if after > before {
                    break;
                }
            }
        }
        std::hint::black_box(x);
        assert!(after > before);
        assert!(cores() >= 1);
    }
}
