//! Mailroom in-process: the handler's configuration, `mailroom::start`, polling its counters
//! until every message succeeded, and a clean stop.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use mailroom::telemetry::MetricsSnapshot;
use mailroom::{Config, RunningHost};
use tokio_util::sync::CancellationToken;

use crate::native::STALL;
use crate::report::Measurement;
use crate::runner::Names;
use crate::scenarios::{MailroomSpec, Workers};
use crate::sys::{mib, Meter};

/// How often the handler's counters are read while it drains.
pub const POLL: Duration = Duration::from_millis(5);

/// Runs `config` (one handler named `name`) until `n` messages succeeded, timing from
/// `mailroom::start` returning; then cancels it and waits for it to drain. With `max_workers`,
/// also notes when the pool first had that many workers.
pub async fn drain(
    client: async_nats::Client,
    config: Config,
    name: &str,
    n: u64,
    max_workers: Option<usize>,
) -> anyhow::Result<Measurement> {
    let shutdown = CancellationToken::new();
    let mut meter = Meter::start();
    let t_start = Instant::now();
    let running = mailroom::start(config, client, shutdown.clone())
        .await
        .with_context(|| format!("starting mailroom for {name}"))?;
    let start_s = t_start.elapsed().as_secs_f64();
    meter.restart_cpu();
    let drained = wait_for(&running, name, n, max_workers).await;
    let usage = meter.read();
    shutdown.cancel();
    let t_stop = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(60), running.wait()).await;
    let stop_s = t_stop.elapsed().as_secs_f64();
    let Drained {
        elapsed,
        snapshot,
        to_max,
        rss_tenth,
        rss_end,
        workers,
    } = drained?;
    if stopped.is_err() {
        bail!("mailroom did not drain within 60s after {name} was done");
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(Measurement {
        messages: n,
        seconds: secs,
        msgs_per_s: n as f64 / secs,
        p50_ms: Some(snapshot.latency_p50_us as f64 / 1000.0),
        p99_ms: Some(snapshot.latency_p99_us as f64 / 1000.0),
        cpu_s_per_1k: usage.cpu_seconds.map(|c| c / n as f64 * 1000.0),
        peak_rss_mib: usage.peak_rss.map(mib),
        start_s: Some(start_s),
        stop_s: Some(stop_s),
        time_to_max_workers_s: to_max.map(|d| d.as_secs_f64()),
        workers_settled: workers.settled(),
        workers_peak: workers.peak(),
        host: Some(snapshot),
        rss_at_tenth_mib: rss_tenth.map(mib),
        rss_end_mib: rss_end.map(mib),
        ..Measurement::default()
    })
}

/// The pool size over a drain, sampled at every poll.
#[derive(Debug, Default)]
pub struct WorkerSeries(Vec<(Duration, i64)>);

impl WorkerSeries {
    /// Adds a sample taken `at` into the drain.
    pub fn push(&mut self, at: Duration, workers: i64) {
        self.0.push((at, workers));
    }

    /// The median pool size over the second half of the drain (by time): where it settled.
    pub fn settled(&self) -> Option<f64> {
        let end = self.0.last()?.0;
        let mut late: Vec<i64> = self
            .0
            .iter()
            .filter(|(at, _)| *at >= end / 2)
            .map(|&(_, w)| w)
            .collect();
        late.sort_unstable();
        late.get(late.len() / 2).map(|&w| w as f64)
    }

    /// The largest pool size seen.
    pub fn peak(&self) -> Option<u64> {
        self.0
            .iter()
            .map(|&(_, w)| u64::try_from(w).unwrap_or(0))
            .max()
    }
}

/// What [`wait_for`] saw.
struct Drained {
    elapsed: Duration,
    snapshot: MetricsSnapshot,
    /// When the pool first reached `max_workers`.
    to_max: Option<Duration>,
    rss_tenth: Option<u64>,
    rss_end: Option<u64>,
    workers: WorkerSeries,
}

/// The handler's counters as the host has them now.
pub fn snapshot(running: &RunningHost, name: &str) -> anyhow::Result<MetricsSnapshot> {
    running
        .metrics()
        .snapshot()
        .into_iter()
        .find(|(handler, _)| handler == name)
        .map(|(_, s)| s)
        .ok_or_else(|| anyhow!("the host has no handler named {name}"))
}

/// Polls the handler's counters every [`POLL`] until `n` messages succeeded. Returns the time
/// it took, the last snapshot, when the pool first reached `max_workers` (if it did), and the
/// pool size over time.
async fn wait_for(
    running: &RunningHost,
    name: &str,
    n: u64,
    max_workers: Option<usize>,
) -> anyhow::Result<Drained> {
    let started = Instant::now();
    let mut to_max = None;
    let mut rss_tenth = None;
    let mut workers = WorkerSeries::default();
    let mut progress = (0u64, Instant::now());
    loop {
        tokio::time::sleep(POLL).await;
        let snapshot = snapshot(running, name)?;
        workers.push(started.elapsed(), snapshot.workers);
        if to_max.is_none() && max_workers.is_some_and(|max| snapshot.workers >= max as i64) {
            to_max = Some(started.elapsed());
        }
        if rss_tenth.is_none() && snapshot.succeeded >= n / 10 {
            rss_tenth = crate::sys::current_rss_bytes();
        }
        if snapshot.succeeded >= n {
            return Ok(Drained {
                elapsed: started.elapsed(),
                snapshot,
                to_max,
                rss_tenth,
                rss_end: crate::sys::current_rss_bytes(),
                workers,
            });
        }
        if snapshot.succeeded != progress.0 {
            progress = (snapshot.succeeded, Instant::now());
        } else if progress.1.elapsed() > STALL {
            bail!(
                "{name}: no message succeeded for {STALL:?}; {} of {n} done; counters: {snapshot:?}",
                snapshot.succeeded
            );
        }
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The host configuration of one scenario run: one handler named `name` on `names.stream`.
pub fn config_text(name: &str, module: &Path, spec: &MailroomSpec, names: &Names) -> String {
    let mut text = format!(
        "[host]\ndrain_timeout = \"10s\"\n\n[[handler]]\nname = {}\nmodule = {}\nstream = {}\nordering = \"{}\"\n",
        toml_string(name),
        toml_string(&module.display().to_string()),
        toml_string(&names.stream),
        if spec.ordered { "subject" } else { "none" },
    );
    match spec.workers {
        Workers::Fixed(n) => text.push_str(&format!("concurrency = {n}\n")),
        Workers::Auto { min, max } => {
            text.push_str(&format!("min_workers = {min}\nmax_workers = {max}\n"))
        }
    }
    if spec.reuse {
        text.push_str("isolation = \"reuse\"\n");
    }
    if let Some(n) = spec.partitions {
        text.push_str(&format!("partitions = {n}\n"));
    }
    if let Some(n) = spec.in_flight {
        text.push_str(&format!("max_buffered = {n}\n"));
    }
    if let Some(cooldown) = spec.scale_cooldown {
        text.push_str(&format!("scale_cooldown = {}\n", toml_string(cooldown)));
    }
    if spec.enrich {
        text.push_str(&format!(
            "publish = {{ allow = [{}] }}\nconfig = {{ output-subject = {} }}\n",
            toml_string(&format!("{}out.>", names.prefix)),
            toml_string(&names.output_subject),
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_size_settled_at_is_the_median_of_the_second_half() {
        let mut series = WorkerSeries::default();
        for (ms, workers) in [(0, 1), (250, 4), (500, 16), (750, 3), (1000, 3), (1250, 4)] {
            series.push(Duration::from_millis(ms), workers);
        }
        // The second half (625 ms on): 3, 3, 4.
        assert_eq!(series.settled(), Some(3.0));
        assert_eq!(series.peak(), Some(16));
        assert_eq!(WorkerSeries::default().settled(), None);
    }
}
