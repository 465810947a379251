//! Counters, gauges and histograms the host keeps per handler, and the handler's lifecycle
//! state.
//!
//! Counters are relaxed atomics: they are incremented on the message path, read rarely (at
//! scrape time, by `/status` and by the summary line), and need no ordering with anything
//! else. Nothing here formats or allocates on the message path: [`exposition`] renders the
//! Prometheus text from snapshots when `/metrics` is scraped. Only the binary installs a
//! tracing subscriber; this module never does.

pub mod exposition;
mod histogram;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::health::Lifecycle;

pub use histogram::{Exported, Histogram, BOUNDS_MICROS};

/// Live counters of one handler.
#[derive(Debug, Default)]
pub struct HandlerMetrics {
    /// Deliveries received from JetStream (every attempt counts).
    pub received: AtomicU64,
    /// Deliveries with attempt > 1 (redelivered by JetStream or retried).
    pub redelivered: AtomicU64,
    /// Messages acked after success.
    pub succeeded: AtomicU64,
    /// Failed attempts that will be retried (nak with delay, or retried in place).
    pub retried: AtomicU64,
    /// Messages written to the dead-letter subject (or terminated without one).
    pub dead_lettered: AtomicU64,
    /// Dead-letter records that could not be stored (the message is nak'ed and comes back).
    pub dead_letter_failures: AtomicU64,
    /// Attempts that ended in a trap (panic, out of memory, stack overflow, ...).
    pub traps: AtomicU64,
    /// Attempts stopped by the time limit.
    pub timeouts: AtomicU64,
    /// Publishes confirmed for successful messages.
    pub published: AtomicU64,
    /// Capability calls refused by a grant.
    pub denied: AtomicU64,
    /// Progress acks (`+WPI`) sent to keep long-running or waiting messages alive.
    pub progress_acks: AtomicU64,
    /// Acks, naks or terms that could not be sent (the message will be redelivered).
    pub ack_failures: AtomicU64,
    /// Log records and guest output dropped over the per-message budget.
    pub log_dropped: AtomicU64,
    /// Messages received and not yet settled.
    pub in_flight: AtomicI64,
    /// Redeliveries of a message whose key had already run a later one.
    pub late_redeliveries: AtomicU64,
    /// Deliveries of a message this host already held (ignored; the held copy settles it).
    pub duplicate_deliveries: AtomicU64,
    /// Times the autoscaler grew the pool.
    pub scale_ups: AtomicU64,
    /// Times the autoscaler shrank the pool.
    pub scale_downs: AtomicU64,
    /// Workers alive.
    pub workers: AtomicI64,
    /// The autoscaler's current target.
    pub target_workers: AtomicI64,
    /// Workers running a message.
    pub busy: AtomicI64,
    /// The most workers ever busy at once.
    pub busy_peak: AtomicI64,
    /// Messages held but not running (waiting for their key, a retry, or a worker).
    pub buffered: AtomicI64,
    /// Distinct ordering keys held.
    pub keys: AtomicI64,
    /// Keys blocked by a message that exhausted its attempts (`on_exhausted = "block"`).
    pub blocked_keys: AtomicI64,
    blocked: Mutex<Vec<String>>,
    owned: Mutex<Vec<u32>>,
    /// Publishes of successful attempts that a stream had already stored (re-runs).
    pub duplicate_publishes: AtomicU64,
    /// Publishes sent again because their stream was unavailable (e.g. a leader election).
    pub publish_retries: AtomicU64,
    /// Messages handed back without running (drain, partition release).
    pub handed_back: AtomicU64,
    /// Held messages given up because their partition's lease was lost (fenced).
    pub fenced_messages: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_trips: AtomicU64,
    /// Whether the circuit breaker is open (1) or closed (0).
    pub breaker_open: AtomicI64,
    /// Partitions this host owns (partitioned handlers).
    pub partitions_owned: AtomicI64,
    /// Partitions this host took over (acquired) since it started.
    pub partitions_acquired: AtomicU64,
    /// Partitions this host handed over (released) since it started.
    pub partitions_released: AtomicU64,
    /// Lease renewals that failed (transport errors; the lease may still be held).
    pub lease_renew_failures: AtomicU64,
    /// Partitions this host gave up because it could not renew their lease in time, or found
    /// it taken.
    pub self_fences: AtomicU64,
    /// Partition deliveries found lost in transit (each restarts its partition).
    pub delivery_gaps: AtomicU64,
    /// Time from seeing a partition's lease expire to having attached it here (failover).
    pub failover: Histogram,
    /// Time a graceful release took (stop pulling to consumer deleted).
    pub handover: Histogram,
    /// Time from a message's publish to its ack (successes only).
    pub latency: Histogram,
    /// Time from a message's arrival in the host to the start of its attempt.
    pub queue_wait: Histogram,
    /// Time an attempt spent in the handler (instantiation and call).
    pub handler_duration: Histogram,
    /// Where the handler is in its life: starting, running, failed, tripped, draining.
    pub lifecycle: Lifecycle,
}

/// A point-in-time copy of [`HandlerMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricsSnapshot {
    /// See [`HandlerMetrics::received`].
    pub received: u64,
    /// See [`HandlerMetrics::redelivered`].
    pub redelivered: u64,
    /// See [`HandlerMetrics::succeeded`].
    pub succeeded: u64,
    /// See [`HandlerMetrics::retried`].
    pub retried: u64,
    /// See [`HandlerMetrics::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`HandlerMetrics::dead_letter_failures`].
    pub dead_letter_failures: u64,
    /// See [`HandlerMetrics::traps`].
    pub traps: u64,
    /// See [`HandlerMetrics::timeouts`].
    pub timeouts: u64,
    /// See [`HandlerMetrics::published`].
    pub published: u64,
    /// See [`HandlerMetrics::denied`].
    pub denied: u64,
    /// See [`HandlerMetrics::progress_acks`].
    pub progress_acks: u64,
    /// See [`HandlerMetrics::ack_failures`].
    pub ack_failures: u64,
    /// See [`HandlerMetrics::log_dropped`].
    pub log_dropped: u64,
    /// See [`HandlerMetrics::in_flight`].
    pub in_flight: i64,
    /// See [`HandlerMetrics::late_redeliveries`].
    pub late_redeliveries: u64,
    /// See [`HandlerMetrics::duplicate_deliveries`].
    pub duplicate_deliveries: u64,
    /// See [`HandlerMetrics::scale_ups`].
    pub scale_ups: u64,
    /// See [`HandlerMetrics::scale_downs`].
    pub scale_downs: u64,
    /// See [`HandlerMetrics::workers`].
    pub workers: i64,
    /// See [`HandlerMetrics::target_workers`].
    pub target_workers: i64,
    /// See [`HandlerMetrics::busy`].
    pub busy: i64,
    /// See [`HandlerMetrics::busy_peak`].
    pub busy_peak: i64,
    /// See [`HandlerMetrics::buffered`].
    pub buffered: i64,
    /// See [`HandlerMetrics::keys`].
    pub keys: i64,
    /// See [`HandlerMetrics::blocked_keys`].
    pub blocked_keys: i64,
    /// Median publish-to-ack latency of successful messages, in microseconds.
    pub latency_p50_us: u64,
    /// 99th percentile publish-to-ack latency, in microseconds.
    pub latency_p99_us: u64,
    /// See [`HandlerMetrics::duplicate_publishes`].
    pub duplicate_publishes: u64,
    /// See [`HandlerMetrics::publish_retries`].
    pub publish_retries: u64,
    /// See [`HandlerMetrics::handed_back`].
    pub handed_back: u64,
    /// See [`HandlerMetrics::fenced_messages`].
    pub fenced_messages: u64,
    /// See [`HandlerMetrics::breaker_trips`].
    pub breaker_trips: u64,
    /// See [`HandlerMetrics::breaker_open`].
    pub breaker_open: i64,
    /// See [`HandlerMetrics::partitions_owned`].
    pub partitions_owned: i64,
    /// See [`HandlerMetrics::partitions_acquired`].
    pub partitions_acquired: u64,
    /// See [`HandlerMetrics::partitions_released`].
    pub partitions_released: u64,
    /// See [`HandlerMetrics::lease_renew_failures`].
    pub lease_renew_failures: u64,
    /// See [`HandlerMetrics::self_fences`].
    pub self_fences: u64,
    /// See [`HandlerMetrics::delivery_gaps`].
    pub delivery_gaps: u64,
}

impl HandlerMetrics {
    /// Adds one to `counter`.
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how long a message waited in the host before its attempt started.
    pub fn record_queue_wait(&self, waited: Duration) {
        self.queue_wait.record(waited);
    }

    /// Records how long an attempt spent in the handler.
    pub fn record_handler_duration(&self, took: Duration) {
        self.handler_duration.record(took);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            received: get(&self.received),
            redelivered: get(&self.redelivered),
            succeeded: get(&self.succeeded),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            dead_letter_failures: get(&self.dead_letter_failures),
            traps: get(&self.traps),
            timeouts: get(&self.timeouts),
            published: get(&self.published),
            denied: get(&self.denied),
            progress_acks: get(&self.progress_acks),
            ack_failures: get(&self.ack_failures),
            log_dropped: get(&self.log_dropped),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            late_redeliveries: get(&self.late_redeliveries),
            duplicate_deliveries: get(&self.duplicate_deliveries),
            scale_ups: get(&self.scale_ups),
            scale_downs: get(&self.scale_downs),
            workers: self.workers.load(Ordering::Relaxed),
            target_workers: self.target_workers.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            busy_peak: self.busy_peak.load(Ordering::Relaxed),
            buffered: self.buffered.load(Ordering::Relaxed),
            keys: self.keys.load(Ordering::Relaxed),
            blocked_keys: self.blocked_keys.load(Ordering::Relaxed),
            latency_p50_us: self
                .latency
                .quantile(0.5)
                .map_or(0, |d| d.as_micros() as u64),
            latency_p99_us: self
                .latency
                .quantile(0.99)
                .map_or(0, |d| d.as_micros() as u64),
            duplicate_publishes: get(&self.duplicate_publishes),
            publish_retries: get(&self.publish_retries),
            handed_back: get(&self.handed_back),
            fenced_messages: get(&self.fenced_messages),
            breaker_trips: get(&self.breaker_trips),
            breaker_open: self.breaker_open.load(Ordering::Relaxed),
            partitions_owned: self.partitions_owned.load(Ordering::Relaxed),
            partitions_acquired: get(&self.partitions_acquired),
            partitions_released: get(&self.partitions_released),
            lease_renew_failures: get(&self.lease_renew_failures),
            self_fences: get(&self.self_fences),
            delivery_gaps: get(&self.delivery_gaps),
        }
    }

    /// Records which partitions this host owns (for `/status`).
    pub fn set_owned(&self, partitions: Vec<u32>) {
        *self.owned.lock().unwrap_or_else(|p| p.into_inner()) = partitions;
    }

    /// The partitions this host owns.
    pub fn owned(&self) -> Vec<u32> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records which keys are blocked (a bounded sample, for `/status`).
    pub fn set_blocked(&self, keys: Vec<String>) {
        *self.blocked.lock().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// The blocked keys last recorded.
    pub fn blocked(&self) -> Vec<String> {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The metrics of every handler of a host, by handler name. Clones share the list: handlers
/// deployed through NATS register while the host runs.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    handlers: Arc<Mutex<Vec<Registered>>>,
}

/// A handler's name and counters.
type Registered = (String, Arc<HandlerMetrics>);

impl Metrics {
    /// Registers `name` and returns its counters (the same ones if registered before).
    pub fn handler(&self, name: &str) -> Arc<HandlerMetrics> {
        let mut handlers = self.lock();
        if let Some((_, m)) = handlers.iter().find(|(n, _)| n == name) {
            return m.clone();
        }
        let m = Arc::new(HandlerMetrics::default());
        handlers.push((name.to_owned(), m.clone()));
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Registered>> {
        self.handlers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The metrics of handler `name`, if registered.
    pub fn get(&self, name: &str) -> Option<Arc<HandlerMetrics>> {
        self.lock()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.clone())
    }

    /// Snapshots of every handler, in registration order.
    pub fn snapshot(&self) -> Vec<(String, MetricsSnapshot)> {
        self.lock()
            .iter()
            .map(|(n, m)| (n.clone(), m.snapshot()))
            .collect()
    }

    /// Every handler's name and live metrics, in registration order.
    pub fn handlers(&self) -> impl Iterator<Item = (String, Arc<HandlerMetrics>)> {
        self.lock().clone().into_iter()
    }

    /// Per handler: its state, counters and blocked keys, as JSON (the `handlers` part of
    /// `/status`, without the backlog, which needs the server).
    pub fn render_status(&self) -> String {
        let handlers: Vec<serde_json::Value> = self
            .handlers()
            .map(|(name, m)| handler_status(&name, &m, None))
            .collect();
        serde_json::json!({ "handlers": handlers }).to_string()
    }
}

/// One handler's entry in `/status`.
pub fn handler_status(name: &str, m: &HandlerMetrics, backlog: Option<u64>) -> serde_json::Value {
    serde_json::json!({
        "handler": name,
        "state": m.lifecycle.get(),
        "error": m.lifecycle.error(),
        "backlog": backlog,
        "metrics": m.snapshot(),
        "blocked_keys": m.blocked(),
        "partitions": m.owned(),
    })
}
