//! Several Mailroom hosts on one partitioned handler, in this process: each with its own NATS
//! connection and host id, as separate machines would be. They start on an empty stream and
//! are timed only once the partitions are spread evenly; then the messages are published (the
//! hosts drain while they arrive) until every one succeeded, on whichever host.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use mailroom::telemetry::MetricsSnapshot;
use mailroom::{Config, RunningHost};
use tokio_util::sync::CancellationToken;

use crate::inprocess::{snapshot, POLL};
use crate::native::STALL;
use crate::report::Measurement;
use crate::sys::{mib, Meter};

/// How long the hosts may take to join and spread the partitions.
const SPREAD: Duration = Duration::from_secs(60);

/// Runs `hosts` hosts of `config` (one handler named `name` with `partitions`), waits until
/// each owns its share, then calls `publish` (which publishes the `n` messages and waits until
/// they are stored) and times from then until `n` succeeded in all.
pub async fn run<Fut>(
    url: &str,
    config: Config,
    name: &str,
    hosts: usize,
    partitions: u32,
    n: u64,
    publish: Fut,
) -> anyhow::Result<Measurement>
where
    Fut: Future<Output = anyhow::Result<()>>,
{
    let shutdown = CancellationToken::new();
    let mut meter = Meter::start();
    let mut running = Vec::with_capacity(hosts);
    for host in 0..hosts {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting host {host} to {url}"))?;
        running.push(
            mailroom::start(config.clone(), client, shutdown.clone())
                .await
                .with_context(|| format!("starting host {host} for {name}"))?,
        );
    }
    let result = async {
        spread(&running, name, partitions).await?;
        meter.restart_cpu();
        let started = Instant::now();
        let (published, drained) = tokio::join!(publish, drain(&running, name, n));
        published?;
        let last = drained?;
        anyhow::Ok((started.elapsed(), last))
    }
    .await;
    let usage = meter.read();
    shutdown.cancel();
    let t_stop = Instant::now();
    for host in running {
        if tokio::time::timeout(Duration::from_secs(60), host.wait())
            .await
            .is_err()
        {
            bail!("a host did not drain within 60s after {name} was done");
        }
    }
    let stop_s = t_stop.elapsed().as_secs_f64();
    let (elapsed, first) = result?;
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(Measurement {
        messages: n,
        seconds: secs,
        msgs_per_s: n as f64 / secs,
        p50_ms: Some(first.latency_p50_us as f64 / 1000.0),
        p99_ms: Some(first.latency_p99_us as f64 / 1000.0),
        cpu_s_per_1k: usage.cpu_seconds.map(|c| c / n as f64 * 1000.0),
        peak_rss_mib: usage.peak_rss.map(mib),
        stop_s: Some(stop_s),
        host: Some(first),
        ..Measurement::default()
    })
}

/// Waits until the hosts own every partition between them, each at least its even share.
async fn spread(running: &[RunningHost], name: &str, partitions: u32) -> anyhow::Result<()> {
    let share = i64::from(partitions) / running.len() as i64;
    let deadline = Instant::now() + SPREAD;
    loop {
        let owned = running
            .iter()
            .map(|h| snapshot(h, name).map(|s| s.partitions_owned))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if owned.iter().sum::<i64>() == i64::from(partitions) && owned.iter().all(|&o| o >= share) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name}: the partitions were not spread after {SPREAD:?}: owned {owned:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls every host until `n` messages succeeded in all; returns the first host's counters
/// (its latencies; the counts summed over the hosts).
async fn drain(running: &[RunningHost], name: &str, n: u64) -> anyhow::Result<MetricsSnapshot> {
    let mut progress = (0u64, Instant::now());
    loop {
        tokio::time::sleep(POLL).await;
        let mut sum = snapshot(&running[0], name)?;
        for host in &running[1..] {
            let s = snapshot(host, name)?;
            sum.succeeded += s.succeeded;
            sum.received += s.received;
            sum.dead_lettered += s.dead_lettered;
            sum.redelivered += s.redelivered;
        }
        if sum.succeeded >= n {
            return Ok(sum);
        }
        if sum.succeeded != progress.0 {
            progress = (sum.succeeded, Instant::now());
        } else if progress.1.elapsed() > STALL {
            bail!(
                "{name}: no message succeeded for {STALL:?}; {} of {n} done",
                sum.succeeded
            );
        }
    }
}
