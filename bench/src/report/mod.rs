//! What a benchmark run produced: the per-round measurements, medians and ratios, printed as a
//! table, written as `results.json` and drawn as `throughput.svg`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use mailroom::telemetry::MetricsSnapshot;
use serde::Serialize;

use crate::bursts::Burst;
use crate::peers::PeerRun;
use crate::scenarios::{Baseline, Runner, Scenario, Suite, Workers};

pub mod checks;
mod ratios;
mod svg;

pub use ratios::{ordering_rows, ratio_lines};

pub use checks::Check;

/// One run of one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measurement {
    /// Messages drained (N).
    pub messages: u64,
    /// Seconds the preload took (not part of the measurement).
    pub preload_s: f64,
    /// Mailroom: seconds `mailroom::start` took (not timed).
    pub start_s: Option<f64>,
    /// The timed drain, in seconds.
    pub seconds: f64,
    /// N / seconds.
    pub msgs_per_s: f64,
    /// Median publish-to-ack latency.
    pub p50_ms: Option<f64>,
    /// 99th percentile publish-to-ack latency.
    pub p99_ms: Option<f64>,
    /// CPU seconds (user + system, this process) per 1,000 messages over the timed drain.
    pub cpu_s_per_1k: Option<f64>,
    /// Peak RSS of this process during the scenario, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Mailroom: seconds from cancelling to `wait()` returning.
    pub stop_s: Option<f64>,
    /// Autoscaled: seconds until the pool first had `max_workers` workers.
    pub time_to_max_workers_s: Option<f64>,
    /// Autoscaled: the median pool size over the second half of the drain.
    pub workers_settled: Option<f64>,
    /// Autoscaled: the largest pool size seen.
    pub workers_peak: Option<u64>,
    /// The bursts scenario: each burst's timings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bursts: Vec<Burst>,
    /// A peer host's run: its version and the consumer it created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerRun>,
    /// Enrich: messages stored in the output stream afterwards.
    pub outputs: Option<u64>,
    /// Mailroom: the handler's counters at the end.
    pub host: Option<MetricsSnapshot>,
    /// Mailroom: resident memory of this process when a tenth of the messages were done, MiB.
    pub rss_at_tenth_mib: Option<f64>,
    /// Mailroom: resident memory of this process when all were done, MiB.
    pub rss_end_mib: Option<f64>,
}

/// The machine and server.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores available to the bench.
    pub cores: usize,
    /// From /proc/cpuinfo.
    pub cpu_model: String,
    /// `std::env::consts::OS`.
    pub os: String,
    /// As the server reports it.
    pub nats_server_version: String,
    /// `local` (started by the bench) or the URL given.
    pub nats_server: String,
}

/// The options the run used.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// compare, ordering or all.
    pub suite: String,
    /// Rounds.
    pub rounds: usize,
    /// `--quick`.
    pub quick: bool,
    /// N of the compare suite.
    pub messages: u64,
    /// Fixed workers of the noop scenarios.
    pub workers: usize,
    /// `max_workers` of mailroom-io.
    pub io_workers: usize,
    /// What each suite that ran drains, in words (for the header).
    pub sizes: Vec<String>,
}

/// Medians over the rounds that succeeded, metric by metric.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// msgs/s.
    pub msgs_per_s: f64,
    /// ms.
    pub p50_ms: Option<f64>,
    /// ms.
    pub p99_ms: Option<f64>,
    /// CPU s per 1,000 messages.
    pub cpu_s_per_1k: Option<f64>,
    /// MiB.
    pub peak_rss_mib: Option<f64>,
    /// s, over the rounds where it happened.
    pub time_to_max_workers_s: Option<f64>,
    /// Rounds in which the pool reached `max_workers`.
    pub rounds_reaching_max_workers: usize,
    /// Pool size it settled at.
    pub workers_settled: Option<f64>,
}

/// One scenario over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// Name.
    pub name: String,
    /// Suite.
    pub suite: Suite,
    /// Who drained and how.
    pub runner: String,
    /// Payload.
    pub payload: String,
    /// N.
    pub messages: u64,
    /// K.
    pub subjects: u64,
    /// What the ratio compares with.
    pub baseline: Option<String>,
    /// The baseline's median msgs/s.
    pub baseline_msgs_per_s: Option<f64>,
    /// Median msgs/s over the baseline's.
    pub ratio: Option<f64>,
    /// Medians.
    pub median: Option<Summary>,
    /// Every successful round.
    pub rounds: Vec<Measurement>,
    /// Rounds that failed, with the reason.
    pub errors: Vec<String>,
}

/// One line of the ordering table.
#[derive(Debug, Clone, Serialize)]
pub struct OrderingRow {
    /// Distinct subjects.
    pub keys: u64,
    /// noop or io.
    pub handler: String,
    /// N.
    pub messages: u64,
    /// Median msgs/s, ordered by subject.
    pub ordered_msgs_per_s: Option<f64>,
    /// Median msgs/s, unordered.
    pub unordered_msgs_per_s: Option<f64>,
    /// Ordered over unordered.
    pub ratio: Option<f64>,
}

/// One of the closing `ratio` lines.
#[derive(Debug, Clone, Serialize)]
pub struct RatioLine {
    /// `a/b`.
    pub name: String,
    /// The value.
    pub value: Option<f64>,
}

/// `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Machine.
    pub machine: Machine,
    /// Options.
    pub settings: Settings,
    /// Wall time of the whole run.
    pub total_seconds: f64,
    /// Every scenario.
    pub scenarios: Vec<ScenarioReport>,
    /// The closing ratios (compare and peers suites).
    pub ratios: Vec<RatioLine>,
    /// The targets checked in every round.
    pub checks: Vec<Check>,
    /// The ordering table (ordering suite).
    pub ordering: Vec<OrderingRow>,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

fn summarize(rounds: &[Measurement]) -> Option<Summary> {
    let of = |f: fn(&Measurement) -> Option<f64>| median(rounds.iter().filter_map(f).collect());
    Some(Summary {
        msgs_per_s: of(|m| Some(m.msgs_per_s))?,
        p50_ms: of(|m| m.p50_ms),
        p99_ms: of(|m| m.p99_ms),
        cpu_s_per_1k: of(|m| m.cpu_s_per_1k),
        peak_rss_mib: of(|m| m.peak_rss_mib),
        time_to_max_workers_s: of(|m| m.time_to_max_workers_s),
        rounds_reaching_max_workers: rounds
            .iter()
            .filter(|m| m.time_to_max_workers_s.is_some())
            .count(),
        workers_settled: of(|m| m.workers_settled),
    })
}

fn describe_runner(runner: &Runner) -> String {
    match runner {
        Runner::Native => "async-nats, plain ack".to_owned(),
        Runner::NativeEnrich { in_flight } => {
            format!("async-nats, enrich + publish + ack, {in_flight} in flight")
        }
        Runner::NativeIo { in_flight } => {
            format!("async-nats, 1 ms tokio sleep + ack, {in_flight} in flight")
        }
        Runner::Mailroom(spec)
        | Runner::MailroomBursts { spec, .. }
        | Runner::MailroomHosts { spec, .. } => {
            let workers = match spec.workers {
                Workers::Fixed(n) => format!("concurrency {n}"),
                Workers::Auto { min, max } => format!("workers {min}..={max}"),
            };
            let bursts = match runner {
                Runner::MailroomBursts { bursts, size, .. } => {
                    format!(", {bursts} bursts of {size}")
                }
                Runner::MailroomHosts { hosts, .. } => format!(", {hosts} host(s)"),
                _ => String::new(),
            };
            format!(
                "mailroom {}.wasm, ordering {}, {workers}{}{}{}{bursts}",
                spec.guest,
                if spec.ordered { "subject" } else { "none" },
                if spec.reuse { ", isolation reuse" } else { "" },
                spec.in_flight
                    .map_or(String::new(), |n| format!(", max_buffered {n}")),
                spec.scale_cooldown
                    .map_or(String::new(), |c| format!(", scale_cooldown {c}")),
            ) + &spec
                .partitions
                .map_or(String::new(), |n| format!(", {n} partitions"))
        }
        Runner::Wasmcloud { pooled, in_flight } => format!(
            "wasmCloud wash dev, wasmcloud-noop.wasm, max-ack-pending {in_flight}{}",
            if *pooled {
                format!(", poolSize {}", crate::peers::POOL_SIZE)
            } else {
                ", fresh instance per message".to_owned()
            }
        ),
    }
}

/// Builds the per-scenario reports; `results[i]` holds scenario `i`'s rounds.
pub fn build(
    scenarios: &[Scenario],
    results: Vec<Vec<Result<Measurement, String>>>,
) -> Vec<ScenarioReport> {
    let mut reports: Vec<ScenarioReport> = scenarios
        .iter()
        .zip(results)
        .map(|(s, rounds)| {
            let (ok, errors): (Vec<_>, Vec<_>) = rounds.into_iter().partition(Result::is_ok);
            let rounds: Vec<Measurement> = ok.into_iter().filter_map(Result::ok).collect();
            ScenarioReport {
                name: s.name.clone(),
                suite: s.suite,
                runner: describe_runner(&s.runner),
                payload: s.payload.describe(),
                messages: s.messages,
                subjects: s.subjects,
                baseline: None,
                baseline_msgs_per_s: None,
                ratio: None,
                median: summarize(&rounds),
                rounds,
                errors: errors.into_iter().filter_map(Result::err).collect(),
            }
        })
        .collect();
    let medians: Vec<(String, Option<f64>)> = reports
        .iter()
        .map(|r| (r.name.clone(), r.median.as_ref().map(|m| m.msgs_per_s)))
        .collect();
    for (report, scenario) in reports.iter_mut().zip(scenarios) {
        let (label, base) = match &scenario.baseline {
            Baseline::None => continue,
            Baseline::Scenario(name) => (
                name.clone(),
                medians
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, m)| *m),
            ),
            Baseline::Ideal { msgs_per_s, label } => (label.clone(), Some(*msgs_per_s)),
        };
        report.baseline = Some(label);
        report.baseline_msgs_per_s = base;
        report.ratio = match (report.median.as_ref(), base) {
            (Some(m), Some(b)) if b > 0.0 => Some(m.msgs_per_s / b),
            _ => None,
        };
    }
    reports
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Remarks below the table: mailroom-io against its ideal, failures, missing outputs, errors.
fn notes(report: &Report) -> Vec<String> {
    let mut notes = Vec::new();
    for r in &report.scenarios {
        let Some(med) = &r.median else { continue };
        if r.name == "mailroom-io" {
            let reached = match med.time_to_max_workers_s {
                Some(t) => format!(
                    "reached max_workers after {t:.2}s (median; {} of {} rounds)",
                    med.rounds_reaching_max_workers,
                    r.rounds.len()
                ),
                None => {
                    let peak = r
                        .rounds
                        .iter()
                        .filter_map(|m| m.host.map(|h| h.busy_peak))
                        .max();
                    format!(
                        "never reached max_workers (most workers busy at once: {})",
                        peak.map_or("n/a".to_owned(), |p| p.to_string())
                    )
                }
            };
            notes.push(format!(
                "note: mailroom-io: {:.0} msgs/s against {} = {}/s; {reached}",
                med.msgs_per_s,
                r.baseline.as_deref().unwrap_or("ideal"),
                opt(r.baseline_msgs_per_s, 0),
            ));
        }
        if r.name.ends_with("-auto") {
            let peaks: Vec<String> = r
                .rounds
                .iter()
                .map(|m| m.workers_peak.map_or("n/a".to_owned(), |p| p.to_string()))
                .collect();
            notes.push(format!(
                "note: {}: the pool settled at {} workers (median of the drain's second half, median of rounds; {} cores); most workers per round: {}",
                r.name,
                opt(med.workers_settled, 1),
                report.machine.cores,
                peaks.join(", ")
            ));
        }
        for (round, m) in r.rounds.iter().enumerate() {
            for (i, b) in m.bursts.iter().enumerate() {
                notes.push(format!(
                    "note: {} round {}, burst {}: max_workers after {}s, drained in {:.2}s (published in {:.2}s), back to min_workers {}s after draining (scale_cooldown {}); most workers {}",
                    r.name,
                    round + 1,
                    i + 1,
                    opt(b.to_max_s, 2),
                    b.drain_s,
                    b.publish_s,
                    opt(b.back_to_min_s, 2),
                    crate::scenarios::BURST_COOLDOWN,
                    b.peak_workers
                ));
            }
        }
        if let Some(peer) = r.rounds.iter().find_map(|m| m.peer.as_ref()) {
            notes.push(format!(
                "note: {}: {} (RUST_BACKTRACE unset), consumer it created: {}",
                r.name, peer.version, peer.consumer
            ));
        }
        if r.name == "mailroom-soak" {
            for m in &r.rounds {
                if let (Some(a), Some(b)) = (m.rss_at_tenth_mib, m.rss_end_mib) {
                    notes.push(format!(
                        "note: mailroom-soak: process RSS {a:.1} MiB after {} messages, {b:.1} MiB \
                         after {} ({:+.1}%)",
                        m.messages / 10,
                        m.messages,
                        (b / a - 1.0) * 100.0
                    ));
                }
            }
        }
        for m in &r.rounds {
            if let Some(h) = &m.host {
                if h.retried + h.dead_lettered + h.ack_failures + h.traps + h.timeouts > 0 {
                    notes.push(format!(
                        "note: {}: retried {}, dead-lettered {}, traps {}, timeouts {}, ack failures {}",
                        r.name, h.retried, h.dead_lettered, h.traps, h.timeouts, h.ack_failures
                    ));
                }
            }
            if let Some(stored) = m.outputs {
                if stored != m.messages {
                    notes.push(format!(
                        "note: {}: {stored} outputs stored for {} inputs",
                        r.name, m.messages
                    ));
                }
            }
        }
        for e in &r.errors {
            notes.push(format!("error: {}: {e}", r.name));
        }
    }
    notes
}

/// The header, the table, notes, the ordering table and the ratio lines.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let s = &report.settings;
    let _ = writeln!(
        out,
        "mailroom-bench: suite {}, {} round(s){}",
        s.suite,
        s.rounds,
        if s.quick { " (--quick)" } else { "" },
    );
    for line in &s.sizes {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "machine: {} cores, {}, {}; nats-server {} ({})",
        m.cores, m.cpu_model, m.os, m.nats_server_version, m.nats_server
    );
    let _ = writeln!(
        out,
        "medians over rounds; p50/p99 = JetStream publish (the preload) to ack, as log-bucket upper \
         bounds (<= 12.5% high);\nCPU (user+sys) over the timed drain and peak RSS are this \
         process only (nats-server excluded)\n"
    );
    let _ = writeln!(
        out,
        "{:<32} {:>10} {:>9} {:>9} {:>11} {:>13} {:>7}  baseline",
        "scenario", "msgs/s", "p50 ms", "p99 ms", "CPU s/1k", "peak RSS MiB", "ratio"
    );
    for r in &report.scenarios {
        let Some(med) = &r.median else {
            let _ = writeln!(out, "{:<32} failed: {}", r.name, r.errors.join("; "));
            continue;
        };
        let _ = writeln!(
            out,
            "{:<32} {:>10.0} {:>9} {:>9} {:>11} {:>13} {:>7}  {}",
            r.name,
            med.msgs_per_s,
            opt(med.p50_ms, 2),
            opt(med.p99_ms, 2),
            opt(med.cpu_s_per_1k, 3),
            opt(med.peak_rss_mib, 1),
            opt(r.ratio, 3),
            r.baseline.as_deref().unwrap_or("-"),
        );
    }
    let _ = writeln!(out);
    let notes = notes(report);
    for note in &notes {
        let _ = writeln!(out, "{note}");
    }
    if !notes.is_empty() {
        let _ = writeln!(out);
    }
    if !report.ordering.is_empty() {
        let _ = writeln!(out, "ordering suite (concurrency 16):\n");
        let _ = writeln!(
            out,
            "| keys | handler | ordered msgs/s | unordered msgs/s | ordered/unordered |"
        );
        let _ = writeln!(out, "|---:|---|---:|---:|---:|");
        for row in &report.ordering {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                row.keys,
                if row.handler == "io" {
                    "io (sleep:1)"
                } else {
                    "noop"
                },
                opt(row.ordered_msgs_per_s, 0),
                opt(row.unordered_msgs_per_s, 0),
                opt(row.ratio, 3),
            );
        }
        let _ = writeln!(out);
    }
    if !report.checks.is_empty() {
        let _ = writeln!(out, "targets, checked in every round:");
        for c in &report.checks {
            let values: Vec<String> = c.values.iter().map(|v| opt(*v, 3)).collect();
            let _ = writeln!(
                out,
                "check {} {}: {} (met in {} of {} rounds)",
                c.name,
                c.target,
                values.join(", "),
                c.met,
                c.values.len()
            );
        }
        let _ = writeln!(out);
    }
    if !report.ratios.is_empty() {
        for line in &report.ratios {
            let _ = writeln!(out, "ratio {} {}", line.name, opt(line.value, 3));
        }
    }
    out
}

/// Writes `results.json` and `throughput.svg` into `dir`.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).context("serializing the results")?;
    let path = dir.join("results.json");
    std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    let path = dir.join("throughput.svg");
    std::fs::write(&path, svg::render(report))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
