//! The live summary: one info line per handler every `host.summary_interval`, so a healthy
//! host shows what it does without a metrics stack.
//!
//! [`summarize`] is pure (two snapshots and the time between them); [`run`] is the task that
//! takes the snapshots and logs.

use std::fmt;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::status::HostStatus;
use crate::telemetry::MetricsSnapshot;

/// One handler's line.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Messages settled (acked or dead-lettered) per second over the interval.
    pub msgs_per_s: f64,
    /// The consumer's backlog, `num_pending + num_ack_pending`, when the server answered.
    pub backlog: Option<u64>,
    /// Messages held by this host, running or waiting.
    pub in_flight: i64,
    /// Workers alive.
    pub workers: i64,
    /// Failed attempts retried during the interval.
    pub retries: u64,
    /// Messages dead-lettered during the interval.
    pub dead_letters: u64,
}

/// The summary of the interval between snapshots `before` and `now`, `elapsed` apart.
pub fn summarize(
    before: &MetricsSnapshot,
    now: &MetricsSnapshot,
    elapsed: Duration,
    backlog: Option<u64>,
) -> Summary {
    let settled = |s: &MetricsSnapshot| s.succeeded + s.dead_lettered;
    let secs = elapsed.as_secs_f64();
    let delta = settled(now).saturating_sub(settled(before));
    Summary {
        msgs_per_s: if secs > 0.0 { delta as f64 / secs } else { 0.0 },
        backlog,
        in_flight: now.in_flight,
        workers: now.workers,
        retries: now.retried.saturating_sub(before.retried),
        dead_letters: now.dead_lettered.saturating_sub(before.dead_lettered),
    }
}

/// A backlog for the log line: the number, or `unknown` when the server did not answer.
struct Backlog(Option<u64>);

impl fmt::Display for Backlog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("unknown"),
        }
    }
}

/// Logs every handler's summary every `every` until `shutdown`.
pub async fn run(status: HostStatus, every: Duration, shutdown: CancellationToken) {
    let mut before: Vec<(String, MetricsSnapshot)> = status.metrics().snapshot();
    let mut last = Instant::now();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let backlogs = status.backlogs().await;
        let now = status.metrics().snapshot();
        let elapsed = last.elapsed();
        last = Instant::now();
        for ((name, now_s), (_, before_s)) in now.iter().zip(&before) {
            let backlog = backlogs.iter().find(|(n, _)| n == name).map(|(_, b)| *b);
            let s = summarize(before_s, now_s, elapsed, backlog);
            let state = status
                .metrics()
                .handlers()
                .find(|(n, _)| n == name)
                .map(|(_, m)| m.lifecycle.get().as_str())
                .unwrap_or("unknown");
            tracing::info!(
                handler = %name,
                state = %state,
                msgs_per_s = %format_args!("{:.1}", s.msgs_per_s),
                backlog = %Backlog(s.backlog),
                in_flight = s.in_flight,
                workers = s.workers,
                retries = s.retries,
                dead_letters = s.dead_letters,
                "summary of the last {:.0?}",
                elapsed
            );
        }
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_counts_cover_the_interval_only() {
        let before = MetricsSnapshot {
            succeeded: 100,
            dead_lettered: 2,
            retried: 7,
            ..Default::default()
        };
        let now = MetricsSnapshot {
            succeeded: 390,
            dead_lettered: 12,
            retried: 10,
            in_flight: 16,
            workers: 4,
            ..Default::default()
        };
        let s = summarize(&before, &now, Duration::from_secs(10), Some(120));
        assert_eq!(
            s,
            Summary {
                msgs_per_s: 30.0,
                backlog: Some(120),
                in_flight: 16,
                workers: 4,
                retries: 3,
                dead_letters: 10,
            }
        );
        assert_eq!(
            summarize(&now, &now, Duration::ZERO, None).msgs_per_s,
            0.0,
            "no division by zero"
        );
        assert_eq!(Backlog(None).to_string(), "unknown");
    }
}
