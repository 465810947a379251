//! Which messages this host settled recently, so that a redelivery of one (JetStream did not
//! hear of the ack: a consumer leader change lost it) is acknowledged again instead of being
//! run a second time.
//!
//! A direct-mapped table of stream sequences: recording is one relaxed store, checking one
//! load, and nothing allocates. A slot is overwritten by a sequence `SLOTS` later, so the
//! table remembers roughly the last `SLOTS` settled sequences; forgetting only means running
//! a redelivery again, as a host without the table would. It never claims a sequence it did
//! not record.

use std::sync::atomic::{AtomicU64, Ordering};

/// Slots in the table (a power of two); 128 KiB per handler.
const SLOTS: usize = 1 << 14;

/// Recently settled stream sequences of one handler's consumers.
pub struct RecentlySettled {
    slots: Box<[AtomicU64]>,
}

impl Default for RecentlySettled {
    fn default() -> Self {
        RecentlySettled {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RecentlySettled {
    /// Records that `seq` was acked or terminated.
    pub fn insert(&self, seq: u64) {
        self.slots[seq as usize & (SLOTS - 1)].store(seq, Ordering::Relaxed);
    }

    /// Forgets everything: the next stream's sequences start over (a new work stream
    /// generation).
    pub fn clear(&self) {
        for slot in self.slots.iter() {
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// Whether `seq` was recorded (and not overwritten since).
    pub fn contains(&self, seq: u64) -> bool {
        seq != 0 && self.slots[seq as usize & (SLOTS - 1)].load(Ordering::Relaxed) == seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_recent_sequences_and_never_invents_one() {
        let recent = RecentlySettled::default();
        assert!(!recent.contains(0) && !recent.contains(7));
        for seq in 1..=1000 {
            recent.insert(seq);
        }
        assert!((1..=1000).all(|s| recent.contains(s)));
        assert!(!recent.contains(1001));
        recent.insert(7 + SLOTS as u64);
        assert!(!recent.contains(7), "overwritten: forgotten, not confused");
        assert!(recent.contains(7 + SLOTS as u64));
        recent.clear();
        assert!(!recent.contains(8));
    }
}
