//! Fences: until when a host's work on a partition may have effects (run, write KV,
//! publish, acknowledge). The group moves a partition's fence forward with every lease
//! renewal and revokes it when the lease is lost; the consumer checks it before a message
//! starts, before its outputs are sent and before it is acknowledged; the capabilities check
//! it before every KV write. It knows nothing of leases or NATS: it is a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Until when work may have effects, on the host's monotonic clock. The durable binding's
/// fence holds forever; a partition's is moved forward by every lease renewal and revoked
/// when the lease is lost.
#[derive(Debug)]
pub struct Fence {
    base: Instant,
    /// Nanoseconds after `base`; `u64::MAX` means forever, 0 revoked.
    until: AtomicU64,
}

impl Fence {
    /// A fence that always holds.
    pub fn forever() -> Fence {
        Fence {
            base: Instant::now(),
            until: AtomicU64::new(u64::MAX),
        }
    }

    /// A fence that holds until `at`.
    pub fn until(at: Instant) -> Fence {
        let base = Instant::now();
        Fence {
            until: AtomicU64::new(nanos_after(base, at)),
            base,
        }
    }

    /// Moves the deadline to `at` (a renewal) and returns true, unless the fence was revoked
    /// or its deadline has passed: a lapsed fence is revoked, for good, and false returned.
    /// A renewal that arrives late must not revive a fence, because while it did not hold,
    /// deliveries and waiting messages were dropped without an ack; going on would run a
    /// key's later messages before those, which come back only after AckWait.
    pub fn extend(&self, at: Instant) -> bool {
        let nanos = nanos_after(self.base, at);
        let now = self.base.elapsed().as_nanos();
        let updated = self
            .until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |until| match until {
                // Revoked, or forever: nothing to move.
                0 | u64::MAX => None,
                lapsed if now >= u128::from(lapsed) => Some(0),
                _ => Some(nanos),
            });
        match updated {
            Ok(before) => now < u128::from(before),
            Err(until) => until == u64::MAX,
        }
    }

    /// Stops holding, for good.
    pub fn revoke(&self) {
        self.until.store(0, Ordering::Release);
    }

    /// Whether the binding may still run and acknowledge at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        let until = self.until.load(Ordering::Acquire);
        until == u64::MAX
            || (until != 0 && now.saturating_duration_since(self.base).as_nanos() < until as u128)
    }
}

/// `at` as nanoseconds after `base`, in `1..u64::MAX` (0 and MAX are reserved).
fn nanos_after(base: Instant, at: Instant) -> u64 {
    let nanos = at.saturating_duration_since(base).as_nanos();
    u64::try_from(nanos)
        .unwrap_or(u64::MAX - 1)
        .clamp(1, u64::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fences_hold_until_their_deadline_and_never_after_a_revoke() {
        let now = Instant::now();
        assert!(Fence::forever().holds(now + Duration::from_secs(1 << 30)));
        let fence = Fence::until(now + Duration::from_secs(7));
        assert!(fence.holds(now + Duration::from_secs(6)));
        assert!(!fence.holds(now + Duration::from_secs(7)));
        assert!(fence.extend(now + Duration::from_secs(14)));
        assert!(fence.holds(now + Duration::from_secs(13)));
        fence.revoke();
        assert!(!fence.holds(now));
        assert!(!fence.extend(now + Duration::from_secs(60)));
        assert!(!fence.holds(now), "a revoked fence stays revoked");
    }

    #[test]
    fn a_late_renewal_does_not_revive_a_lapsed_fence() {
        let now = Instant::now();
        let fence = Fence::until(now + Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!fence.holds(Instant::now()));
        assert!(
            !fence.extend(Instant::now() + Duration::from_secs(60)),
            "the renewal came after the deadline"
        );
        assert!(!fence.holds(Instant::now()), "a lapsed fence stays down");
        assert!(!fence.extend(Instant::now() + Duration::from_secs(60)));
        let forever = Fence::forever();
        assert!(forever.extend(now), "the durable's fence never lapses");
        assert!(forever.holds(now + Duration::from_secs(1 << 30)));
    }
}
