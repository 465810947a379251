//! Counters and gauges the host keeps per handler, and their Prometheus text rendering.
//!
//! Counters are relaxed atomics: they are incremented on the message path, read rarely, and
//! need no ordering with anything else. Only the binary installs a tracing subscriber; this
//! module never does.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// A lock-free latency histogram: log-linear buckets with 8 per power of two (about 9%
/// resolution) from 1µs to about 12 days. Recording is one atomic add.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

const SUB_BUCKETS: u32 = 8;
const BUCKETS: usize = 40 * SUB_BUCKETS as usize;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish()
    }
}

impl Histogram {
    fn index(micros: u64) -> usize {
        let v = micros.max(1);
        let octave = 63 - v.leading_zeros();
        // The 3 bits below the leading one pick the sub-bucket.
        let sub = if octave >= 3 {
            (v >> (octave - 3)) & 7
        } else {
            (v << (3 - octave)) & 7
        };
        ((octave * SUB_BUCKETS) as usize + sub as usize).min(BUCKETS - 1)
    }

    /// The upper bound of bucket `i`, in microseconds.
    fn upper(i: usize) -> u64 {
        let octave = (i / SUB_BUCKETS as usize) as u32;
        let sub = (i % SUB_BUCKETS as usize) as u64;
        let base = 1u64 << octave;
        base + (base * (sub + 1)) / SUB_BUCKETS as u64
    }

    /// Records one duration.
    pub fn record(&self, d: std::time::Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(micros)].fetch_add(1, Ordering::Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1), as the upper bound of its bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<std::time::Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(std::time::Duration::from_micros(Self::upper(i)));
            }
        }
        None
    }
}

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
    /// Time from a message's publish to its ack (successes only).
    pub latency: Histogram,
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
}

impl HandlerMetrics {
    /// Adds one to `counter`.
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
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
        }
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

/// One exported series: name, Prometheus type, and how to read it from a snapshot.
type Series = (&'static str, &'static str, fn(&MetricsSnapshot) -> i64);

/// The metrics of every handler of a host, by handler name.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    handlers: Vec<(String, Arc<HandlerMetrics>)>,
}

impl Metrics {
    /// Registers `name` and returns its counters (the same ones if registered before).
    pub fn handler(&mut self, name: &str) -> Arc<HandlerMetrics> {
        if let Some((_, m)) = self.handlers.iter().find(|(n, _)| n == name) {
            return m.clone();
        }
        let m = Arc::new(HandlerMetrics::default());
        self.handlers.push((name.to_owned(), m.clone()));
        m
    }

    /// Snapshots of every handler, in registration order.
    pub fn snapshot(&self) -> Vec<(String, MetricsSnapshot)> {
        self.handlers
            .iter()
            .map(|(n, m)| (n.clone(), m.snapshot()))
            .collect()
    }

    /// Per handler: its counters and its blocked keys, as JSON for `/status`.
    pub fn render_status(&self) -> String {
        let handlers: Vec<serde_json::Value> = self
            .handlers
            .iter()
            .map(|(name, m)| {
                serde_json::json!({
                    "handler": name,
                    "metrics": m.snapshot(),
                    "blocked_keys": m.blocked(),
                })
            })
            .collect();
        serde_json::json!({ "handlers": handlers }).to_string()
    }

    /// The counters in Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let snapshots = self.snapshot();
        let mut out = String::new();
        let series: [Series; 26] = [
            ("received_total", "counter", |s| s.received as i64),
            ("redelivered_total", "counter", |s| s.redelivered as i64),
            ("succeeded_total", "counter", |s| s.succeeded as i64),
            ("retried_total", "counter", |s| s.retried as i64),
            ("dead_lettered_total", "counter", |s| s.dead_lettered as i64),
            ("traps_total", "counter", |s| s.traps as i64),
            ("timeouts_total", "counter", |s| s.timeouts as i64),
            ("published_total", "counter", |s| s.published as i64),
            ("denied_total", "counter", |s| s.denied as i64),
            ("progress_acks_total", "counter", |s| s.progress_acks as i64),
            ("ack_failures_total", "counter", |s| s.ack_failures as i64),
            ("log_dropped_total", "counter", |s| s.log_dropped as i64),
            ("in_flight", "gauge", |s| s.in_flight),
            ("late_redeliveries_total", "counter", |s| {
                s.late_redeliveries as i64
            }),
            ("duplicate_deliveries_total", "counter", |s| {
                s.duplicate_deliveries as i64
            }),
            ("scale_ups_total", "counter", |s| s.scale_ups as i64),
            ("scale_downs_total", "counter", |s| s.scale_downs as i64),
            ("workers", "gauge", |s| s.workers),
            ("target_workers", "gauge", |s| s.target_workers),
            ("busy_workers", "gauge", |s| s.busy),
            ("busy_workers_peak", "gauge", |s| s.busy_peak),
            ("buffered", "gauge", |s| s.buffered),
            ("keys", "gauge", |s| s.keys),
            ("blocked_keys", "gauge", |s| s.blocked_keys),
            ("latency_p50_microseconds", "gauge", |s| {
                s.latency_p50_us as i64
            }),
            ("latency_p99_microseconds", "gauge", |s| {
                s.latency_p99_us as i64
            }),
        ];
        for (name, kind, get) in series {
            let _ = writeln!(out, "# TYPE mailroom_{name} {kind}");
            for (handler, snapshot) in &snapshots {
                let _ = writeln!(
                    out,
                    "mailroom_{name}{{handler=\"{handler}\"}} {}",
                    get(snapshot)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_quantiles_are_within_a_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5).unwrap().as_micros() as f64;
        let p99 = h.quantile(0.99).unwrap().as_micros() as f64;
        assert!((500_000.0..=500_000.0 * 1.13).contains(&p50), "{p50}");
        assert!((990_000.0..=990_000.0 * 1.13).contains(&p99), "{p99}");
        h.record(Duration::ZERO);
        h.record(Duration::MAX);
        assert_eq!(h.count(), 1002);
    }

    #[test]
    fn bucket_bounds_cover_their_values() {
        for v in [1u64, 2, 3, 7, 8, 9, 15, 16, 17, 100, 1000, 123_456, 1 << 30] {
            let i = Histogram::index(v);
            assert!(
                Histogram::upper(i) >= v,
                "{v} above bucket {i}'s bound {}",
                Histogram::upper(i)
            );
            if i > 0 {
                assert!(
                    Histogram::upper(i - 1) <= v,
                    "{v} belongs lower than bucket {i}"
                );
            }
        }
    }
}
