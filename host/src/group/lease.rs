//! Partition leases, the pure part: what this host holds, until when it may use it, and what
//! it should do next given what it sees of the group. Time is passed in, so the protocol is
//! tested on a simulated clock with many hosts (below); `group/mod.rs` does the I/O.
//!
//! A lease is a KV key `<handler>.leases.<partition>` in a bucket whose `max_age` is the lease
//! TTL `L`: it expires `L` after its last write unless renewed (a compare-and-set update on
//! its revision) every `L/4`. The host that created it owns it; the revision of the create is
//! the lease's epoch, which names the partition's consumer.
//!
//! Invariants:
//! - A host uses a lease (runs and acknowledges the partition's messages) only until the
//!   *send* time of its last successful write plus `L - M` (margin `M`) on its own monotonic
//!   clock. The server expires the key no earlier than the *arrival* of that write plus `L`,
//!   so the host stops at least `M` before anyone else can acquire the partition, as long as
//!   the host is not paused for longer than `M` between its check and its action.
//! - A host acquires only a lease it sees free, and only with a create (compare-and-set on
//!   "no value"), so two hosts can never both believe they created the same epoch.
//! - A host releases a lease only after its partition is drained (see `consumer::partition`),
//!   and releases one only when the plan gives it to another live host, or when it leaves.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::plan;

/// The lease timings, all derived from the bucket's TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a lease lives after its last write.
    pub ttl: Duration,
    /// How often a held lease is renewed.
    pub renew_every: Duration,
    /// How long after a failed renewal the next attempt goes out.
    pub retry_every: Duration,
    /// How much earlier than the server a host stops using a lease it cannot renew.
    pub margin: Duration,
}

impl Timing {
    /// Renew every quarter TTL, stop using a lease 30% of the TTL before it can expire.
    pub fn from_ttl(ttl: Duration) -> Timing {
        Timing {
            ttl,
            renew_every: ttl / 4,
            retry_every: (ttl / 20).max(Duration::from_millis(100)),
            margin: ttl * 3 / 10,
        }
    }
}

/// A lease this host holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// The revision of the create (names the partition's consumer).
    pub epoch: u64,
    /// The revision of the last successful write (the next renewal's compare-and-set).
    pub revision: u64,
    /// When the last successful write was *sent*.
    pub renewed: Instant,
    /// When the last renewal attempt was sent (successful or not).
    pub attempted: Instant,
    /// The partition is being released.
    pub releasing: bool,
}

impl Held {
    /// A lease just created by a write sent at `sent` that got `revision`.
    pub fn created(revision: u64, sent: Instant) -> Held {
        Held {
            epoch: revision,
            revision,
            renewed: sent,
            attempted: sent,
            releasing: false,
        }
    }

    /// Until when this host may use the lease.
    pub fn valid_until(&self, timing: &Timing) -> Instant {
        self.renewed + timing.ttl.saturating_sub(timing.margin)
    }

    /// Whether a renewal should be sent at `now`.
    pub fn renewal_due(&self, now: Instant, timing: &Timing) -> bool {
        if self.attempted > self.renewed {
            // The last attempt failed (or is in flight): retry soon.
            now >= self.attempted + timing.retry_every
        } else {
            now >= self.renewed + timing.renew_every
        }
    }

    /// A renewal sent at `sent` succeeded with `revision`.
    pub fn renewed(&mut self, sent: Instant, revision: u64) {
        if sent >= self.renewed {
            self.renewed = sent;
            self.revision = revision;
        }
    }
}

/// What the group looks like in the KV bucket (possibly a little stale).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Live hosts of the handler and whether each is leaving.
    pub hosts: BTreeMap<String, bool>,
    /// Lease holders by partition.
    pub leases: BTreeMap<u32, String>,
}

/// What this host knows of itself.
#[derive(Debug, Clone)]
pub struct Local {
    /// This host's id.
    pub me: String,
    /// This host is leaving (it gives everything up and takes nothing).
    pub leaving: bool,
    /// Leases held.
    pub held: BTreeMap<u32, Held>,
    /// Partitions with an acquire or release under way (no new action until it ends).
    pub busy: BTreeSet<u32>,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The lease is free and the plan gives the partition to this host: create the lease.
    Acquire(u32),
    /// The plan gives a held partition to another live host (or this host leaves): drain it,
    /// then delete the lease.
    Release(u32),
    /// The lease can no longer be trusted: give the partition up at once.
    Fence(u32, FenceReason),
}

/// Why a lease was given up at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceReason {
    /// It could not be renewed in time.
    Expired,
    /// Another host holds it now.
    TakenOver,
}

/// Decides what this host should do at `now`.
pub fn decide(
    partitions: u32,
    view: &View,
    local: &Local,
    now: Instant,
    timing: &Timing,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut fenced = BTreeSet::new();
    for (partition, held) in &local.held {
        let reason = if now >= held.valid_until(timing) {
            Some(FenceReason::Expired)
        } else if view.leases.get(partition).is_some_and(|h| *h != local.me) {
            Some(FenceReason::TakenOver)
        } else {
            None
        };
        if let Some(reason) = reason {
            actions.push(Action::Fence(*partition, reason));
            fenced.insert(*partition);
        }
    }
    let mut live: Vec<&str> = view
        .hosts
        .iter()
        .filter(|(id, leaving)| !**leaving && **id != local.me)
        .map(|(id, _)| id.as_str())
        .collect();
    if !local.leaving {
        live.push(&local.me);
    }
    let plan = plan::assign(partitions, &live);
    for partition in 0..partitions {
        if local.busy.contains(&partition) || fenced.contains(&partition) {
            continue;
        }
        let target = plan.get(partition as usize).map(|i| live[*i]);
        match local.held.get(&partition) {
            Some(held) if !held.releasing && target != Some(local.me.as_str()) => {
                actions.push(Action::Release(partition));
            }
            Some(_) => {}
            None if target == Some(local.me.as_str()) && !view.leases.contains_key(&partition) => {
                actions.push(Action::Acquire(partition));
            }
            None => {}
        }
    }
    actions
}

#[cfg(test)]
mod tests;
