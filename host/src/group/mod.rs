//! Partitioned consumer groups: per-key order and one message of a key at a time across every
//! host of a handler, through crashes, joins and leaves.
//!
//! The handler's messages are copied, partitioned by key, into a work stream
//! ([`workstream`]); each partition has its own consumer, and a host pulls a partition only
//! while it holds the partition's lease in the `MR_GROUPS` KV bucket ([`store`], [`lease`]).
//! Every host computes the same plan of who should own what from the live members
//! ([`plan`]) and acquires the free partitions the plan gives it, and releases (after
//! draining) those it gives to others. A host that cannot renew a lease in time stops using
//! it before anyone else can take it (fencing).
//!
//! Invariants:
//! - The group decides which partitions this host pulls; the consumer (`consumer::Intake`)
//!   pulls, runs and acknowledges them. The group never touches a message; the consumer never
//!   touches a lease: a [`Fence`] is all the consumer sees of one.
//! - A partition is attached (its consumer created and pulled) only after its lease was
//!   created by this host, and released (its consumer drained and deleted) before its lease is
//!   deleted.

pub mod generation;
pub mod lease;
mod moves;
pub mod plan;
pub mod presence;
pub mod store;
mod view;
pub mod workstream;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::consumer::{Attached, Intake};
use crate::telemetry::HandlerMetrics;
use lease::{Action, FenceReason, Held, Local, Timing, View};
use moves::{acquire, fence, note_move};
use store::{GroupStore, LeaseRecord, MemberRecord, Renewal, Seen, WriteError};
use view::{apply_seen, next_entry, open_watch, Echo};

/// How often the group looks at its leases even when nothing happens.
const TICK: Duration = Duration::from_millis(250);
/// How many recent moves a member record keeps.
const MOVES_KEPT: usize = 12;

/// A partitioned handler's group membership, as this host runs it.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// The partition count.
    pub partitions: u32,
    /// The handler's configured partition count (the current generation's).
    pub configured: u32,
    /// The partition work stream.
    pub work_stream: Arc<str>,
    /// This host's id in the group (unique per process).
    pub host_id: String,
    /// This host's label.
    pub host_name: String,
    /// How long a release waits for running messages.
    pub drain_timeout: Duration,
    /// A previous generation being drained: messages after this origin sequence are
    /// acknowledged without running, and the group leaves once the work stream is empty.
    pub cutover: Option<u64>,
}

/// The key generation of a partitioned handler with `partitions`.
pub fn generation(partitions: u32) -> String {
    format!("p{partitions}")
}

/// A unique id for this process: its label plus a random suffix.
pub fn host_id(label: Option<&str>) -> (String, String) {
    let name = label.map(str::to_owned).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "host".to_owned())
    });
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let name = if name.is_empty() { "host".into() } else { name };
    (format!("{name}-{:06x}", fastrand::u32(..0x100_0000)), name)
}

/// What an operation under way came to.
enum Done {
    Acquired {
        partition: u32,
        held: Held,
        attached: Attached,
    },
    AcquireFailed {
        partition: u32,
        error: String,
    },
    Drained {
        partition: u32,
        started: Instant,
        released: crate::consumer::Released,
    },
    Renewed {
        partition: u32,
        sent: Instant,
        result: Renewal,
    },
    Member {
        result: Result<u64, WriteError>,
    },
}

type Op<'a> = Pin<Box<dyn Future<Output = Done> + Send + 'a>>;

/// The group of one partitioned handler on this host, until `shutdown`; then it releases
/// every partition it holds (each drained first) and leaves.
pub async fn run(
    intake: &Intake,
    store: GroupStore,
    spec: GroupSpec,
    shutdown: &CancellationToken,
) {
    let shared = intake.shared().clone();
    let m = shared.metrics.clone();
    let timing = Timing::from_ttl(store.ttl);
    let me = spec.host_id.clone();
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut record = MemberRecord {
        name: spec.host_name.clone(),
        pid: std::process::id(),
        started,
        draining: false,
        owned: Vec::new(),
        partitions: spec.partitions,
        configured: spec.configured,
        moves: Vec::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    // Join: the member record first, so the watch's first snapshot holds at least it.
    let mut member_revision = loop {
        match store.put_member(&me, &record, None).await {
            Ok(revision) => break Some(revision),
            Err(err) => {
                tracing::warn!(handler = %shared.name, "cannot join the partition group yet: {err:?}; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    let mut member_sent = Instant::now();
    let mut member_in_flight = false;
    let mut view = View::default();
    let mut watch = open_watch(&store, &mut view, shutdown).await;
    let mut echo = Echo::default();
    tracing::info!(
        handler = %shared.name,
        host = %me,
        partitions = spec.partitions,
        members = view.hosts.len(),
        lease_ttl = ?store.ttl,
        "joined the partition group"
    );
    let mut local = Local {
        me: me.clone(),
        leaving: false,
        held: BTreeMap::new(),
        busy: BTreeSet::new(),
    };
    let mut attached: HashMap<u32, Attached> = HashMap::new();
    let mut renewing: BTreeSet<u32> = BTreeSet::new();
    let mut to_delete: BTreeMap<u32, u64> = BTreeMap::new();
    let mut expired_at: HashMap<u32, Instant> = HashMap::new();
    let mut ops: FuturesUnordered<Op<'_>> = FuturesUnordered::new();
    let mut tick = tokio::time::interval(TICK);
    let mut leave_by: Option<tokio::time::Instant> = None;
    let mut emptiness_checked = Instant::now();
    let prefix = store.prefix();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !local.leaving => {
                local.leaving = true;
                record.draining = true;
                // Give the rest of the group a chance to see we leave before we release.
                member_sent = Instant::now() - timing.renew_every;
                leave_by = Some(tokio::time::Instant::now() + spec.drain_timeout + Duration::from_secs(10));
                tracing::info!(handler = %shared.name, held = local.held.len(), "leaving the partition group: releasing every partition");
            }
            Some(done) = ops.next() => match done {
                Done::Acquired { partition, held, attached: a } => {
                    local.busy.remove(&partition);
                    let now = Instant::now();
                    if let Some(at) = expired_at.remove(&partition) {
                        m.failover.record(now.saturating_duration_since(at));
                    }
                    HandlerMetrics::incr(&m.partitions_acquired);
                    tracing::info!(handler = %shared.name, partition, epoch = held.epoch, consumer = %a.binding.consumer, "partition acquired");
                    note_move(&mut record, '+', partition);
                    local.held.insert(partition, held);
                    attached.insert(partition, a);
                }
                Done::AcquireFailed { partition, error } => {
                    local.busy.remove(&partition);
                    tracing::debug!(handler = %shared.name, partition, "partition not acquired: {error}");
                }
                Done::Drained { partition, started, released } => {
                    local.busy.remove(&partition);
                    if let Some(held) = local.held.remove(&partition) {
                        to_delete.insert(partition, held.revision);
                    }
                    m.handover.record(started.elapsed());
                    HandlerMetrics::incr(&m.partitions_released);
                    note_move(&mut record, '-', partition);
                    tracing::info!(
                        handler = %shared.name,
                        partition,
                        given_up = released.given_up,
                        cut_short = released.cut_short,
                        took = ?started.elapsed(),
                        "partition released"
                    );
                }
                Done::Renewed { partition, sent, result } => {
                    renewing.remove(&partition);
                    match result {
                        Renewal::Renewed(revision) => {
                            if let Some(held) = local.held.get_mut(&partition) {
                                held.renewed(sent, revision);
                                if let Some(a) = attached.get(&partition) {
                                    // A renewal back after the fence lapsed does not revive
                                    // it; the check below gives the partition up.
                                    let _ = a.binding.fence.extend(held.valid_until(&timing));
                                }
                            }
                        }
                        Renewal::Adopted(revision) => {
                            if let Some(held) = local.held.get_mut(&partition) {
                                held.revision = revision;
                            }
                        }
                        Renewal::Lost => {
                            fence(intake, &mut local, &mut attached, &mut record, partition, FenceReason::TakenOver, &m, &shared.name);
                        }
                        Renewal::Unavailable(err) => {
                            HandlerMetrics::incr(&m.lease_renew_failures);
                            tracing::warn!(handler = %shared.name, partition, "lease renewal failed ({err}); retrying");
                        }
                    }
                }
                Done::Member { result } => {
                    member_in_flight = false;
                    match result {
                        Ok(revision) => {
                            member_revision = Some(revision);
                            echo.wrote(revision, Instant::now());
                        }
                        // Expired (this host was silent too long) or written by nobody else:
                        // write it afresh.
                        Err(WriteError::Conflict) => member_revision = None,
                        Err(WriteError::Unavailable(err)) => {
                            tracing::debug!(handler = %shared.name, "member record not renewed: {err}");
                        }
                    }
                }
            },
            entry = next_entry(&mut watch) => match entry {
                Some(entry) => {
                    echo.saw(entry.revision);
                    let seen = store::read(&prefix, &entry);
                    if let Seen::LeaseGone(partition) = &seen {
                        if entry.operation == async_nats::jetstream::kv::Operation::Purge {
                            expired_at.insert(*partition, Instant::now());
                        }
                    }
                    apply_seen(&mut view, seen);
                }
                None => {
                    tracing::warn!(handler = %shared.name, "the partition group watch ended; watching again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    view = View::default();
                    watch = open_watch(&store, &mut view, shutdown).await;
                }
            },
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if echo.stalled(now, (timing.renew_every * 2).max(Duration::from_secs(3))) {
            tracing::warn!(handler = %shared.name, "the partition group watch stopped delivering (this host's own write did not come back through it); watching again");
            echo = Echo::default();
            view = View::default();
            watch = open_watch(&store, &mut view, shutdown).await;
        }
        if spec.cutover.is_some()
            && !local.leaving
            && now >= emptiness_checked + Duration::from_secs(1)
        {
            emptiness_checked = now;
            let empty = match shared.js.get_stream(&*spec.work_stream).await {
                Ok(mut stream) => stream.info().await.is_ok_and(|i| i.state.messages == 0),
                Err(_) => true,
            };
            if empty {
                tracing::info!(handler = %shared.name, stream = %spec.work_stream, "the previous partition count's work stream is drained");
                local.leaving = true;
                record.draining = true;
                leave_by = Some(
                    tokio::time::Instant::now() + spec.drain_timeout + Duration::from_secs(10),
                );
            }
        }
        // Partitions to give up at once: their consumer disappeared under this host (taken
        // over), or their fence lapsed although the lease was renewed in the end (the renewal
        // came back too late; deliveries were dropped while the fence was down, so the next
        // epoch must replay them in order).
        let gone: Vec<(u32, FenceReason)> = attached
            .iter()
            .filter(|(p, _)| !local.busy.contains(p))
            .filter_map(|(p, a)| {
                if a.is_lost() {
                    Some((*p, FenceReason::TakenOver))
                } else if !a.binding.fence.holds(now) {
                    Some((*p, FenceReason::Expired))
                } else {
                    None
                }
            })
            .collect();
        // Partitions that lost a delivery in transit: release them (what ran before the gap
        // is acknowledged) and acquire them again, so that a new epoch replays the rest in
        // stream order.
        let gapped: Vec<u32> = attached
            .iter()
            .filter(|(p, a)| !local.busy.contains(p) && a.binding.is_gapped())
            .map(|(p, _)| *p)
            .collect();
        for partition in gapped {
            if let Some(a) = attached.remove(&partition) {
                tracing::info!(handler = %shared.name, partition, "restarting the partition after a lost delivery");
                ops.push(moves::release(
                    intake,
                    &mut local,
                    a,
                    partition,
                    spec.drain_timeout,
                ));
            }
        }
        for (partition, reason) in gone {
            fence(
                intake,
                &mut local,
                &mut attached,
                &mut record,
                partition,
                reason,
                &m,
                &shared.name,
            );
        }
        // Renew what is due.
        for (partition, held) in local.held.iter_mut() {
            if renewing.contains(partition) || !held.renewal_due(now, &timing) {
                continue;
            }
            held.attempted = now;
            renewing.insert(*partition);
            let (partition, revision) = (*partition, held.revision);
            let lease = LeaseRecord {
                host: me.clone(),
                epoch: held.epoch,
                releasing: held.releasing,
            };
            let store = store.clone();
            let patience = timing.renew_every;
            ops.push(Box::pin(async move {
                let result = store
                    .renew_lease(partition, &lease, revision, patience)
                    .await;
                Done::Renewed {
                    partition,
                    sent: now,
                    result,
                }
            }));
        }
        // Delete the leases of drained partitions (once no renewal of theirs is in flight).
        let ready: Vec<(u32, u64)> = to_delete
            .iter()
            .filter(|(p, _)| !renewing.contains(p))
            .map(|(p, r)| (*p, *r))
            .collect();
        for (partition, revision) in ready {
            to_delete.remove(&partition);
            if let Err(err) = store.delete_lease(partition, revision).await {
                tracing::debug!(handler = %shared.name, partition, "deleting a released lease failed ({err:?}); it expires by itself");
            }
        }
        if !member_in_flight && now >= member_sent + timing.renew_every {
            member_in_flight = true;
            member_sent = now;
            record.owned = local.held.keys().copied().collect();
            let (store, me, record, revision) =
                (store.clone(), me.clone(), record.clone(), member_revision);
            ops.push(Box::pin(async move {
                Done::Member {
                    result: store.put_member(&me, &record, revision).await,
                }
            }));
        }
        for action in lease::decide(spec.partitions, &view, &local, now, &timing) {
            match action {
                Action::Fence(partition, reason) => {
                    fence(
                        intake,
                        &mut local,
                        &mut attached,
                        &mut record,
                        partition,
                        reason,
                        &m,
                        &shared.name,
                    );
                }
                Action::Acquire(partition) => {
                    local.busy.insert(partition);
                    let (store, me, stream) = (store.clone(), me.clone(), spec.work_stream.clone());
                    let cutover = spec.cutover;
                    ops.push(Box::pin(async move {
                        acquire(intake, &store, &me, stream, partition, timing, cutover).await
                    }));
                }
                Action::Release(partition) => {
                    if let Some(a) = attached.remove(&partition) {
                        ops.push(moves::release(
                            intake,
                            &mut local,
                            a,
                            partition,
                            spec.drain_timeout,
                        ));
                    }
                }
            }
        }
        let owned: Vec<u32> = local.held.keys().copied().collect();
        if m.owned() != owned {
            m.set_owned(owned);
        }
        m.partitions_owned
            .store(local.held.len() as i64, Ordering::Relaxed);
        if local.leaving && local.held.is_empty() && local.busy.is_empty() && to_delete.is_empty() {
            break;
        }
        if leave_by.is_some_and(|t| tokio::time::Instant::now() >= t) {
            tracing::warn!(handler = %shared.name, held = local.held.len(), "leaving the partition group before every partition was released");
            for partition in local.held.keys().copied().collect::<Vec<_>>() {
                fence(
                    intake,
                    &mut local,
                    &mut attached,
                    &mut record,
                    partition,
                    FenceReason::Expired,
                    &m,
                    &shared.name,
                );
            }
            break;
        }
    }
    store.delete_member(&me).await;
    m.partitions_owned.store(0, Ordering::Relaxed);
    m.set_owned(Vec::new());
    tracing::info!(handler = %shared.name, "left the partition group");
}
