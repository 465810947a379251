//! The bursts scenario: Mailroom starts on an empty stream, and a backlog arrives while it
//! runs, several times, each after the pool went back to `min_workers`. Per burst it times how
//! long the pool took to reach `max_workers`, to drain the burst, and to shrink back to `min`
//! once the burst was done (which includes `scale_cooldown`).

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use mailroom::Config;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::inprocess::{snapshot, POLL};
use crate::native::STALL;
use crate::report::Measurement;
use crate::sys::{mib, Meter};

/// How long the pool must sit at `min_workers`, idle, before a burst is published.
const IDLE: Duration = Duration::from_millis(500);

/// One burst's timings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Burst {
    /// Publishing the burst (the host drains while it is published).
    pub publish_s: f64,
    /// From the first publish until the pool had `max_workers`; `None` if it never did.
    pub to_max_s: Option<f64>,
    /// From the first publish until every message of the burst succeeded.
    pub drain_s: f64,
    /// From the last success of the burst until the pool was back at `min_workers`.
    pub back_to_min_s: Option<f64>,
    /// The most workers at once during the burst.
    pub peak_workers: i64,
}

/// Runs `config` (one handler named `name`, autoscaled `min..=max`) through `bursts` bursts of
/// `size` messages; `publish(i)` publishes burst `i` (0-based) and waits until it is stored.
pub async fn run<F, Fut>(
    client: async_nats::Client,
    config: Config,
    name: &str,
    (min, max): (usize, usize),
    bursts: usize,
    size: u64,
    publish: F,
) -> anyhow::Result<Measurement>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let shutdown = CancellationToken::new();
    let mut meter = Meter::start();
    let running = mailroom::start(config, client, shutdown.clone())
        .await
        .with_context(|| format!("starting mailroom for {name}"))?;
    meter.restart_cpu();
    let result = async {
        let mut timings = Vec::with_capacity(bursts);
        for burst in 0..bursts {
            idle_at_min(&running, name, min).await?;
            timings.push(one(&running, name, (min, max), burst, size, &publish).await?);
        }
        anyhow::Ok(timings)
    }
    .await;
    let usage = meter.read();
    let last = snapshot(&running, name);
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(60), running.wait()).await;
    let timings = result?;
    if stopped.is_err() {
        bail!("mailroom did not drain within 60s after {name} was done");
    }
    let messages = bursts as u64 * size;
    let draining: f64 = timings.iter().map(|b| b.drain_s).sum();
    Ok(Measurement {
        messages,
        seconds: draining,
        msgs_per_s: messages as f64 / draining.max(1e-9),
        cpu_s_per_1k: usage.cpu_seconds.map(|c| c / messages as f64 * 1000.0),
        peak_rss_mib: usage.peak_rss.map(mib),
        time_to_max_workers_s: timings.first().and_then(|b| b.to_max_s),
        host: Some(last?),
        bursts: timings,
        ..Measurement::default()
    })
}

/// Waits until the pool has been at `min` workers with nothing in flight for [`IDLE`].
async fn idle_at_min(
    running: &mailroom::RunningHost,
    name: &str,
    min: usize,
) -> anyhow::Result<()> {
    let began = Instant::now();
    let mut since: Option<Instant> = None;
    loop {
        let s = snapshot(running, name)?;
        if s.workers == min as i64 && s.in_flight == 0 {
            let at = *since.get_or_insert_with(Instant::now);
            if at.elapsed() >= IDLE {
                return Ok(());
            }
        } else {
            since = None;
        }
        if began.elapsed() > STALL {
            bail!("{name}: the pool did not go back to {min} workers within {STALL:?}: {s:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn one<Fut: Future<Output = anyhow::Result<()>>>(
    running: &mailroom::RunningHost,
    name: &str,
    (min, max): (usize, usize),
    burst: usize,
    size: u64,
    publish: &impl Fn(usize) -> Fut,
) -> anyhow::Result<Burst> {
    let before = snapshot(running, name)?.succeeded;
    let target = before + size;
    let started = Instant::now();
    let mut timing = Burst::default();
    let publish = async {
        publish(burst).await?;
        anyhow::Ok(started.elapsed())
    };
    let watch = async {
        let mut progress = (before, Instant::now());
        loop {
            tokio::time::sleep(POLL).await;
            let s = snapshot(running, name)?;
            timing.peak_workers = timing.peak_workers.max(s.workers);
            if timing.to_max_s.is_none() && s.workers >= max as i64 {
                timing.to_max_s = Some(started.elapsed().as_secs_f64());
            }
            if s.succeeded >= target {
                timing.drain_s = started.elapsed().as_secs_f64();
                return anyhow::Ok(());
            }
            if s.succeeded != progress.0 {
                progress = (s.succeeded, Instant::now());
            } else if progress.1.elapsed() > STALL {
                bail!(
                    "{name}, burst {}: no message succeeded for {STALL:?}; {} of {size} done",
                    burst + 1,
                    s.succeeded - before
                );
            }
        }
    };
    let (published, ()) = tokio::try_join!(publish, watch)?;
    timing.publish_s = published.as_secs_f64();
    let drained = Instant::now();
    loop {
        let s = snapshot(running, name)?;
        if s.workers <= min as i64 {
            timing.back_to_min_s = Some(drained.elapsed().as_secs_f64());
            break;
        }
        if drained.elapsed() > STALL {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(timing)
}
