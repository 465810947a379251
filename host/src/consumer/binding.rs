//! A binding is one JetStream consumer this host pulls for a handler: the handler's durable
//! consumer, or the consumer of one partition while this host holds that partition's lease.
//! Each binding has its own fetch loop, flow control (its share of the handler's capacity)
//! and [`Fence`]; every held message ([`Job`]) knows its binding.
//!
//! Invariants:
//! - Nothing of a binding runs or is acknowledged once its fence stops holding: workers check
//!   the fence before they start a message and again before they ack it; a fenced binding's
//!   messages are dropped without a word to JetStream (the partition's next owner replays them
//!   from a new consumer, in stream order).
//! - A binding knows nothing of leases: the fence is all it sees of them (`group/` decides).
//! - A partition's deliveries are dispatched only while their consumer sequence has no gap.
//!   A partition's consumer has one puller, so every delivery (redeliveries too) takes the
//!   next sequence; a jump means a delivery was lost in transit (a reconnect, a consumer
//!   leader change) while the server counts it as delivered, to come back only after
//!   AckWait, behind its key's later messages. From the jump on nothing more is dispatched,
//!   and the group restarts the partition (release, then a new epoch that replays from the
//!   first unacknowledged message, in order).
//! - A released binding leaves nothing behind: its fetch loop has stopped, its waiting
//!   messages are given up (they stay in the work stream), its running ones settled, every
//!   acknowledgement it sent confirmed, and its consumer deleted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::attempts::Record;
use super::delivery::Delivery;
use super::job::Job;
use super::puller::{Pulled, Puller};
use super::Shared;
use crate::executor::Pushed;
use crate::fence::Fence;
use crate::ordering::MissingKey;
use crate::telemetry::HandlerMetrics;

/// Which consumer a binding pulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The handler's durable consumer on its own stream, shared by every host.
    Durable,
    /// One partition's consumer on the handler's work stream, named after its lease epoch.
    Partition {
        /// The partition.
        partition: u32,
        /// The lease epoch (the revision that created the lease).
        epoch: u64,
    },
}

/// One pulled consumer and its share of the handler.
pub struct Binding {
    /// The consumer's name.
    pub consumer: String,
    /// The stream it is on.
    pub stream: Arc<str>,
    /// Durable or partition.
    pub kind: Kind,
    /// Until when its messages may run and be acknowledged.
    pub fence: Arc<Fence>,
    /// Cancels its running handlers (fenced, or released past the drain deadline).
    pub abort: CancellationToken,
    /// Ends its fetch loop.
    pub(super) stop: CancellationToken,
    held: AtomicUsize,
    freed: Notify,
    /// The fetch loop wants waking once `held` drops to this (a batch's worth of room).
    wake_at: AtomicUsize,
    idle: Notify,
    /// The consumer's pending count at the last delivery: this binding's share of the backlog.
    pub(super) pending: AtomicU64,
    /// The consumer was deleted under this host (another owner took the partition).
    lost: AtomicBool,
    /// The consumer sequence of the last delivery (partitions only; see the invariants).
    last_delivery: AtomicU64,
    /// A partition delivery was lost in transit: nothing more is dispatched.
    gapped: AtomicBool,
    /// The reply subject of the last message acked or terminated: confirming one more ack
    /// there proves every earlier one was processed (a release's barrier).
    last_settled: Mutex<Option<Subject>>,
    /// A partition's attempts-ledger records, read when it was acquired (`None`: look up
    /// redeliveries one by one).
    pub recalled: Option<HashMap<u64, Record>>,
    /// Origin sequences above this belong to the next generation (see `group::generation`):
    /// they are acknowledged without running.
    pub(super) skip_above: AtomicU64,
}

impl Binding {
    /// A binding of `consumer` on `stream`.
    pub fn new(
        consumer: String,
        stream: Arc<str>,
        kind: Kind,
        fence: Arc<Fence>,
        recalled: Option<HashMap<u64, Record>>,
    ) -> Binding {
        Binding {
            recalled,
            skip_above: AtomicU64::new(u64::MAX),
            consumer,
            stream,
            kind,
            fence,
            abort: CancellationToken::new(),
            stop: CancellationToken::new(),
            held: AtomicUsize::new(0),
            freed: Notify::new(),
            wake_at: AtomicUsize::new(usize::MAX),
            idle: Notify::new(),
            pending: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            last_delivery: AtomicU64::new(0),
            gapped: AtomicBool::new(false),
            last_settled: Mutex::new(None),
        }
    }

    /// Whether its messages are copies in a partition work stream.
    pub fn sourced(&self) -> bool {
        matches!(self.kind, Kind::Partition { .. })
    }

    /// Messages held (queued to settled).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether the consumer was found deleted.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Whether a partition delivery was lost in transit (the partition needs a restart).
    pub fn is_gapped(&self) -> bool {
        self.gapped.load(Ordering::Relaxed)
    }

    /// Follows the consumer sequence of a partition's deliveries (called by its one fetch
    /// loop). A sequence at or below the last one is a restart of the numbering (a new
    /// consumer leader resends from its last replicated state).
    pub(super) fn follow(&self, sequence: u64) -> Sequence {
        if self.gapped.load(Ordering::Relaxed) {
            return Sequence::Stopped;
        }
        let last = self.last_delivery.load(Ordering::Relaxed);
        if sequence > last + 1 {
            self.gapped.store(true, Ordering::Relaxed);
            return Sequence::Gap { after: last };
        }
        self.last_delivery.store(sequence, Ordering::Relaxed);
        Sequence::Next
    }

    fn hold(&self, shared: &Shared) {
        self.held.fetch_add(1, Ordering::Relaxed);
        shared.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// One held message left (settled, handed back or given up).
    pub fn release_one(&self, shared: &Shared) {
        let held = self.held.fetch_sub(1, Ordering::AcqRel) - 1;
        shared.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Waking the fetch loop for every settled message would cost a task switch each;
        // it only needs to hear once there is room for a batch.
        if held <= self.wake_at.load(Ordering::Relaxed) {
            self.freed.notify_one();
        }
        if held == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Remembers where the last settlement went, for the release barrier (partitions only:
    /// the durable is never released while others keep using it).
    pub fn note_settled(&self, delivery: &Delivery) {
        if self.sourced() {
            let mut last = self.last_settled.lock().unwrap_or_else(|p| p.into_inner());
            *last = Some(delivery.reply().clone());
        }
    }

    /// Waits until nothing is held, or `deadline`; returns whether nothing is held.
    pub(super) async fn settle_until(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.held() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.held() == 0;
            }
        }
    }

    /// Confirms that JetStream processed every acknowledgement sent so far: one more ack of
    /// the last settled message, as a request, is answered only after the ones before it
    /// (they travel the same connection and are processed in order).
    pub(super) async fn confirm_settled(&self, shared: &Shared) -> Result<(), String> {
        let last = self
            .last_settled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(reply) = last else {
            return Ok(());
        };
        shared
            .client
            .request(reply, Bytes::from_static(b"+ACK"))
            .await
            .map(drop)
            .map_err(|err| format!("confirming the last acknowledgements: {err}"))
    }
}

/// What a delivery's consumer sequence says (see [`Binding::follow`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sequence {
    /// Dispatch it.
    Next,
    /// Deliveries after `after` are missing: drop this one and stop.
    Gap { after: u64 },
    /// An earlier gap stopped the binding: drop it.
    Stopped,
}

/// This binding's share of the handler's capacity.
fn capacity(shared: &Shared) -> usize {
    let bindings = shared.bindings_active().max(1);
    shared.capacity().div_ceil(bindings).max(1)
}

/// Why a fetch loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown, release or fence.
    Stopped,
    /// The consumer is gone (a partition taken over by another host).
    Lost,
    /// The subscription closed for good.
    Closed,
}

/// Pulls and dispatches for `binding` until its stop token (or `shutdown`) fires.
pub async fn fetch(
    shared: &Arc<Shared>,
    binding: &Arc<Binding>,
    puller: &mut Puller,
    shutdown: &CancellationToken,
) -> Ended {
    loop {
        let capacity = capacity(shared);
        let held = binding.held();
        let mut free = capacity.saturating_sub(held + puller.outstanding());
        if shared.ordered() && shared.executor.stats().keys >= shared.config.max_keys {
            free = 0;
        }
        if let Some(limit) = shared.breaker_pull_limit() {
            free = free.min(limit);
        }
        // Ask in chunks: a request per freed slot would cost a round trip per message.
        let min_batch = (capacity / 4).max(1);
        if free >= min_batch || (free > 0 && puller.outstanding() == 0) {
            if let Err(err) = puller.request(free).await {
                tracing::warn!(handler = %shared.name, consumer = %binding.consumer, "pull request failed: {err:#}");
                if sleep_or(Duration::from_secs(1), shutdown, &binding.stop).await {
                    return Ended::Stopped;
                }
                continue;
            }
        }
        // Wake up again once releases leave room for a batch (or for anything, when no
        // request is out).
        let room = if puller.outstanding() == 0 {
            1
        } else {
            min_batch
        };
        binding.wake_at.store(
            capacity.saturating_sub(puller.outstanding() + room),
            Ordering::Relaxed,
        );
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ended::Stopped,
            _ = binding.stop.cancelled() => return Ended::Stopped,
            pulled = puller.next() => match pulled {
                Pulled::Message(message) => match Delivery::parse(message, binding.sourced()) {
                    Ok(delivery) => dispatch(shared, binding, delivery).await,
                    Err(err) => tracing::warn!(handler = %shared.name, "ignoring a message on the pull inbox: {}", err.0),
                },
                Pulled::Reset => {}
                Pulled::Unavailable => {
                    tracing::warn!(handler = %shared.name, consumer = %binding.consumer, "JetStream did not answer the pull request; retrying in 1s");
                    if sleep_or(Duration::from_secs(1), shutdown, &binding.stop).await {
                        return Ended::Stopped;
                    }
                }
                Pulled::Fatal(reason) => {
                    if binding.sourced() {
                        // Only the partition's owner may create its consumer: a deleted one
                        // means another host took the partition over.
                        tracing::warn!(handler = %shared.name, consumer = %binding.consumer, %reason, "partition consumer is gone; giving the partition up");
                        binding.lost.store(true, Ordering::Relaxed);
                        return Ended::Lost;
                    }
                    tracing::warn!(handler = %shared.name, %reason, "consumer unusable; binding it again");
                    loop {
                        match super::ensure_consumer(&shared.js, &shared.config).await {
                            Ok(()) => break,
                            Err(err) => {
                                tracing::error!(handler = %shared.name, "{err:#}; retrying in 5s");
                                if sleep_or(Duration::from_secs(5), shutdown, &binding.stop).await {
                                    return Ended::Stopped;
                                }
                            }
                        }
                    }
                }
                Pulled::Closed => {
                    tracing::error!(handler = %shared.name, consumer = %binding.consumer, "the pull subscription closed; stopping");
                    return Ended::Closed;
                }
            },
            _ = binding.freed.notified() => {}
        }
    }
}

/// Queues a delivery under its ordering key.
pub(super) async fn dispatch(shared: &Shared, binding: &Arc<Binding>, delivery: Delivery) {
    binding.pending.store(delivery.pending, Ordering::Relaxed);
    let seq = delivery.stream_sequence;
    if binding.sourced() {
        match binding.follow(delivery.consumer_sequence) {
            Sequence::Next => {}
            Sequence::Stopped => return,
            Sequence::Gap { after } => {
                HandlerMetrics::incr(&shared.metrics.delivery_gaps);
                tracing::warn!(
                    handler = %shared.name,
                    consumer = %binding.consumer,
                    after,
                    got = delivery.consumer_sequence,
                    stream_seq = seq,
                    "a partition delivery was lost in transit (its consumer sequence jumped); \
                     restarting the partition so that it replays in order"
                );
                return;
            }
        }
    }
    if shared.recent.contains(seq) {
        // This host already settled this message, but JetStream did not hear of it (an ack
        // lost in a consumer leader change): settle it again instead of running it again.
        HandlerMetrics::incr(&shared.metrics.duplicate_deliveries);
        tracing::debug!(handler = %shared.name, stream_seq = seq, "redelivery of a message this host already settled; acknowledging it again");
        if let Err(err) = delivery.ack(&shared.client, true).await {
            tracing::warn!(handler = %shared.name, stream_seq = seq, "acknowledging a settled message again failed ({err}); it will come back");
        }
        return;
    }
    if !binding.fence.holds(Instant::now()) {
        // Arrived after the lease was lost: the next owner replays it.
        return;
    }
    if delivery.origin_sequence > binding.skip_above.load(Ordering::Relaxed) {
        // Copied into an old generation's work stream after its cutover: the current one
        // has it and runs it.
        tracing::debug!(handler = %shared.name, origin_seq = delivery.origin_sequence, "message of the next generation acknowledged without running");
        if let Err(err) = delivery.ack(&shared.client, false).await {
            tracing::debug!("acknowledging a message of the next generation: {err}");
        }
        return;
    }
    let ordering = &shared.config.ordering;
    let mut job = Job::new(delivery, binding.clone());
    let fallback = shared.config.on_missing_key == MissingKey::Subject;
    if let Err(err) = ordering.key(job.delivery.subject(), |name| job.delivery.header(name)) {
        if !fallback {
            job.key_error = Some(err.0);
        }
    }
    let pushed = shared.executor.push_with(seq, job, |job| {
        if job.key_error.is_some() {
            // Straight to the dead-letter path: it needs no lane.
            return None;
        }
        let d = &job.delivery;
        match ordering.key(d.subject(), |name| d.header(name)) {
            Ok(key) => key,
            Err(_) => Some(d.subject()),
        }
    });
    match pushed {
        Pushed::Queued { late } => {
            binding.hold(shared);
            if late {
                HandlerMetrics::incr(&shared.metrics.late_redeliveries);
                tracing::info!(
                    handler = %shared.name,
                    stream_seq = seq,
                    "redelivery of a message whose key already ran a later one; it runs as soon as its key is free"
                );
            }
        }
        Pushed::Duplicate(job) => {
            // This host already holds this message (running or waiting); the server sent it
            // again because it had not heard of it in time. Acks go by stream sequence, so the
            // held copy settles both deliveries: this one is dropped, the message is not.
            HandlerMetrics::incr(&shared.metrics.duplicate_deliveries);
            tracing::debug!(handler = %shared.name, stream_seq = seq, delivered = job.delivery.delivered, "duplicate delivery of a held message ignored");
        }
    }
}

/// Sleeps for `d`; returns true if one of the tokens fired first.
async fn sleep_or(d: Duration, a: &CancellationToken, b: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = a.cancelled() => true,
        _ = b.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition() -> Binding {
        let fence = Arc::new(Fence::until(Instant::now() + Duration::from_secs(60)));
        let kind = Kind::Partition {
            partition: 0,
            epoch: 1,
        };
        Binding::new("h-p0-e1".into(), "W".into(), kind, fence, None)
    }

    #[test]
    fn a_jump_in_the_consumer_sequence_stops_dispatching_for_good() {
        let b = partition();
        assert_eq!(b.follow(1), Sequence::Next);
        assert_eq!(b.follow(2), Sequence::Next);
        assert_eq!(b.follow(3), Sequence::Next);
        assert!(!b.is_gapped());
        // 4 never arrived.
        assert_eq!(b.follow(5), Sequence::Gap { after: 3 });
        assert!(b.is_gapped());
        assert_eq!(b.follow(4), Sequence::Stopped);
        assert_eq!(b.follow(6), Sequence::Stopped);
    }

    #[test]
    fn a_new_consumer_leader_may_number_again_from_an_earlier_sequence() {
        let b = partition();
        for seq in 1..=10 {
            assert_eq!(b.follow(seq), Sequence::Next);
        }
        // The new leader had 1..=7 replicated: it resends 8.. under their old numbers.
        for seq in 8..=12 {
            assert_eq!(b.follow(seq), Sequence::Next);
        }
        assert_eq!(b.follow(14), Sequence::Gap { after: 12 });
    }

    #[test]
    fn a_lost_first_delivery_is_a_gap_too() {
        assert_eq!(partition().follow(2), Sequence::Gap { after: 0 });
    }
}
