//! `mailroom-bench`: Mailroom against hand-written async-nats consumers, side by side, in one
//! run against one nats-server.
//!
//! Every scenario run gets a fresh stream, is preloaded with N messages over K subjects, and is
//! then drained while being timed: by Mailroom running in-process (`mailroom::start`) or by a
//! native async-nats consumer doing the same work. Rounds run every scenario once in order
//! (A B A B), and the medians are reported as a table, `results.json` and `throughput.svg`.
//!
//! ```sh
//! cargo xtask guests                                   # once: builds the guest modules
//! cargo run --release -p mailroom-bench -- --quick     # about a minute or two
//! cargo run --release -p mailroom-bench -- --suite all
//! ```

mod bursts;
mod hosts;
mod inprocess;
mod native;
mod peers;
mod report;
mod runner;
mod scenarios;
mod sys;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use mailroom::nats_server::NatsServer;

use crate::report::{Machine, Measurement, Report, Settings};
use crate::runner::Bench;
use crate::scenarios::{Runner, Scenario, Sizes, Suite};

/// Benchmarks Mailroom against hand-written async-nats consumers on the same nats-server.
///
/// Needs the guest modules (`cargo xtask guests`) and nats-server 2.10+ on PATH or in
/// $MAILROOM_NATS_SERVER (unless --nats-url is given).
#[derive(Debug, Parser)]
#[command(name = "mailroom-bench", version)]
struct Args {
    /// Which suite: `compare` (Mailroom against native consumers), `ordering` (ordered against
    /// unordered, by number of distinct subjects), `partitions` (an I/O-bound partitioned
    /// handler, 16 partitions and 1,000 subjects, 4 workers per host, on 1, 2 and 3 hosts in
    /// this process), `all` (those three), or `peers` (Mailroom against wasmCloud's `wash dev`,
    /// installed with pip into target/; not part of `all`). Default: compare.
    #[arg(long, value_enum, default_value_t = SuiteArg::Compare, hide_default_value = true)]
    suite: SuiteArg,

    /// Rounds: every scenario runs once per round, in order, and the median of each metric
    /// is reported. Default: 3, or 1 with --quick.
    #[arg(long, value_name = "R")]
    rounds: Option<usize>,

    /// A quick run: 1 round, N = 20,000 for the compare suite and the ordering suite's sizes
    /// divided by 5. Default: off.
    #[arg(long)]
    quick: bool,

    /// N, the messages of each compare or peers scenario (mailroom-io drains N/4). Default:
    /// 200,000 for compare, 100,000 for peers, or 20,000 with --quick. The ordering suite has
    /// fixed sizes: 50,000 for noop, 10,000 for io and 2,000 for io with a single subject. The
    /// bursts scenario publishes 2 bursts of 50,000 (10,000 with --quick); mailroom-noop-auto
    /// drains at least 100,000 and mailroom-enrich-auto at least 25,000.
    #[arg(long, value_name = "N")]
    messages: Option<u64>,

    /// Fixed worker count (`concurrency`) of mailroom-noop, mailroom-noop-1k,
    /// mailroom-noop-ordered and mailroom-reuse. Default: 4.
    #[arg(long, value_name = "N", default_value_t = 4, hide_default_value = true)]
    workers: usize,

    /// `max_workers` of the autoscaled mailroom-io scenario (`min_workers` is 1); its ideal
    /// is this × 1,000 msgs/s. Default: 16.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 16,
        hide_default_value = true
    )]
    io_workers: usize,

    /// Use this NATS server (with JetStream) instead of starting a local nats-server; the
    /// bench creates and deletes streams named B<n> and B<n>OUT on it. Default: start one.
    #[arg(long, value_name = "URL")]
    nats_url: Option<String>,

    /// Where to write results.json and throughput.svg. Default: target/mailroom-bench/ (under
    /// $CARGO_TARGET_DIR when set).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,

    /// Run only these scenarios (comma-separated names, e.g. native,mailroom-noop). Default:
    /// every scenario of the suite.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SuiteArg {
    Compare,
    Ordering,
    All,
    Peers,
    Partitions,
}

impl SuiteArg {
    fn name(self) -> &'static str {
        match self {
            SuiteArg::Compare => "compare",
            SuiteArg::Ordering => "ordering",
            SuiteArg::All => "all",
            SuiteArg::Peers => "peers",
            SuiteArg::Partitions => "partitions",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Only host warnings and errors; the host's info logs would drown the table.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MAILROOM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("some scenario runs failed (see the errors above)");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The header lines saying what each suite that runs drains.
fn size_lines(scenarios: &[Scenario], sizes: &Sizes) -> Vec<String> {
    let mut lines = Vec::new();
    if scenarios.iter().any(|s| s.suite == Suite::Compare) {
        lines.push(format!(
            "compare: N = {} (mailroom-io: N/4), K = 100 subjects (noop-ordered: 1,000), \
             {} fixed workers for noop/reuse, enrich 16 at once, io workers 1..={}",
            sizes.messages, sizes.workers, sizes.io_workers
        ));
    }
    if let Some(s) = scenarios.iter().find(|s| s.suite == Suite::Partitions) {
        lines.push(format!(
            "partitions: N = {}, K = {} subjects, \"sleep:1\", {} partitions, {} workers per \
             host; hosts in this process, timed once the partitions are spread; the messages \
             are published while the hosts drain",
            s.messages,
            s.subjects,
            scenarios::PARTITIONS,
            scenarios::HOST_WORKERS
        ));
    }
    if scenarios.iter().any(|s| s.suite == Suite::Peers) {
        lines.push(format!(
            "peers: N = {}, K = 100 subjects, 128 B, at most {} messages in flight on both \
             hosts; Mailroom {} fixed workers; wasmCloud poolSize {} when pooled",
            sizes.peer_messages,
            scenarios::PEER_IN_FLIGHT,
            sizes.workers,
            peers::POOL_SIZE
        ));
    }
    let ordering: Vec<&Scenario> = scenarios
        .iter()
        .filter(|s| s.suite == Suite::Ordering)
        .collect();
    if !ordering.is_empty() {
        let n = |handler: &str, one_key: bool| {
            ordering
                .iter()
                .find(|s| {
                    s.cell
                        .is_some_and(|c| c.handler == handler && (c.keys == 1) == one_key)
                })
                .map_or("-".to_owned(), |s| s.messages.to_string())
        };
        lines.push(format!(
            "ordering: concurrency 16; N = {} noop, {} io (sleep:1), {} io with 1 key",
            n("noop", false),
            n("io", false),
            n("io", true)
        ));
    }
    lines
}

/// Round `round` (1-based) of every scenario that succeeded in it.
fn round_of<'a>(
    scenarios: &'a [Scenario],
    results: &'a [Vec<Result<Measurement, String>>],
    round: usize,
) -> report::checks::Round<'a> {
    report::checks::Round {
        measurements: scenarios
            .iter()
            .zip(results)
            .filter_map(|(s, r)| match r.get(round - 1) {
                Some(Ok(m)) => Some((s.name.as_str(), m)),
                _ => None,
            })
            .collect(),
    }
}

fn workspace() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The directory of the guest modules, after checking the ones `scenarios` need are there.
fn guests(scenarios: &[Scenario]) -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("wasm32-wasip2").join("release");
    let mut missing: Vec<String> = Vec::new();
    for s in scenarios {
        if let Runner::Mailroom(spec) | Runner::MailroomBursts { spec, .. } = &s.runner {
            let path = dir.join(format!("{}.wasm", spec.guest));
            let shown = path.display().to_string();
            if !path.exists() && !missing.contains(&shown) {
                missing.push(shown);
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "guest modules missing: {}\nbuild them first with `cargo xtask guests` (with the \
             same CARGO_TARGET_DIR as this run)",
            missing.join(", ")
        );
    }
    Ok(dir)
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let began = Instant::now();
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let sizes = Sizes {
        messages: args
            .messages
            .unwrap_or(if args.quick { 20_000 } else { 200_000 })
            .max(1),
        workers: args.workers.max(1),
        io_workers: args.io_workers.max(1),
        quick: args.quick,
        peer_messages: args
            .messages
            .unwrap_or(if args.quick { 20_000 } else { 100_000 })
            .max(1),
    };
    let mut scenarios = Vec::new();
    if matches!(args.suite, SuiteArg::Compare | SuiteArg::All) {
        scenarios.extend(scenarios::compare(&sizes));
    }
    if matches!(args.suite, SuiteArg::Ordering | SuiteArg::All) {
        scenarios.extend(scenarios::ordering(&sizes));
    }
    if args.suite == SuiteArg::Peers {
        scenarios.extend(scenarios::peers(&sizes));
    }
    if matches!(args.suite, SuiteArg::Partitions | SuiteArg::All) {
        scenarios.extend(scenarios::partitions(&sizes));
    }
    if !args.only.is_empty() {
        for name in &args.only {
            if !scenarios.iter().any(|s| &s.name == name) {
                let known: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "--only: no scenario {name:?} in suite {}; known: {}",
                    args.suite.name(),
                    known.join(", ")
                );
            }
        }
        scenarios.retain(|s| args.only.contains(&s.name));
    }
    let guest_dir = guests(&scenarios)?;
    let wash = if scenarios
        .iter()
        .any(|s| matches!(s.runner, Runner::Wasmcloud { .. }))
    {
        let wash = peers::prepare(&target_dir(), &workspace()).context(
            "the peers suite cannot run wasmCloud here (it needs python3 with venv, PyPI, and \
             cargo with the wasm32-wasip2 target)",
        )?;
        eprintln!(
            "peers: {}{}",
            wash.version,
            if wash.backtrace_was_set {
                "; RUST_BACKTRACE is set here and is removed for wash (it makes wash ~100x slower)"
            } else {
                "; run with RUST_BACKTRACE unset (it makes wash ~100x slower)"
            }
        );
        Some(wash)
    } else {
        None
    };

    let (_server, url, server_label) = match &args.nats_url {
        Some(url) => (None, url.clone(), url.clone()),
        None => {
            let server = NatsServer::start().context("starting a local nats-server")?;
            let url = server.url();
            (Some(server), url, "local, started by the bench".to_owned())
        }
    };
    let admin = async_nats::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let machine = Machine {
        cores: sys::cores(),
        cpu_model: sys::cpu_model(),
        os: std::env::consts::OS.to_owned(),
        nats_server_version: admin.server_info().version,
        nats_server: server_label,
    };
    eprintln!(
        "mailroom-bench: {} scenario(s) × {rounds} round(s) on {} cores against nats-server {} at {url}",
        scenarios.len(),
        machine.cores,
        machine.nats_server_version
    );
    let bench = Bench::new(
        url,
        admin.clone(),
        guest_dir,
        target_dir().join("mailroom-bench-cache"),
        workspace(),
        wash,
    );

    let mut results: Vec<Vec<Result<Measurement, String>>> = vec![Vec::new(); scenarios.len()];
    for round in 1..=rounds {
        for (i, scenario) in scenarios.iter().enumerate() {
            // The soak measures memory over a long run, not throughput: once is enough.
            if scenario.name == "mailroom-soak" && round > 1 {
                continue;
            }
            let outcome = bench.run(scenario).await;
            match &outcome {
                Ok(m) => eprintln!(
                    "[round {round}/{rounds}] {:<32} {:>8.0} msgs/s ({} msgs in {:.2}s; preload {:.2}s{})",
                    scenario.name,
                    m.msgs_per_s,
                    m.messages,
                    m.seconds,
                    m.preload_s,
                    match (m.start_s, m.stop_s) {
                        (Some(a), Some(b)) => format!("; start {a:.2}s, stop {b:.2}s"),
                        _ => String::new(),
                    }
                ),
                Err(err) => eprintln!("[round {round}/{rounds}] {} FAILED: {err:#}", scenario.name),
            }
            results[i].push(outcome.map_err(|e| format!("{e:#}")));
        }
        for line in report::checks::round_lines(
            &scenarios,
            &round_of(&scenarios, &results, round),
            machine.cores,
        ) {
            eprintln!("[round {round}/{rounds}] {line}");
        }
    }
    let all_rounds: Vec<report::checks::Round> = (1..=rounds)
        .map(|round| round_of(&scenarios, &results, round))
        .collect();
    let checks = report::checks::evaluate(&scenarios, &all_rounds, machine.cores);
    drop(all_rounds);

    let reports = report::build(&scenarios, results);
    let ok = reports.iter().all(|r| r.errors.is_empty());
    let mut ratios = Vec::new();
    for suite in [Suite::Compare, Suite::Peers, Suite::Partitions] {
        if scenarios.iter().any(|s| s.suite == suite) {
            ratios.extend(report::ratio_lines(suite, &reports));
        }
    }
    let report = Report {
        machine,
        settings: Settings {
            suite: args.suite.name().to_owned(),
            rounds,
            quick: args.quick,
            messages: sizes.messages,
            workers: sizes.workers,
            io_workers: sizes.io_workers,
            sizes: size_lines(&scenarios, &sizes),
        },
        total_seconds: began.elapsed().as_secs_f64(),
        ordering: report::ordering_rows(&scenarios, &reports),
        ratios,
        checks,
        scenarios: reports,
    };
    let out = args
        .out
        .unwrap_or_else(|| target_dir().join("mailroom-bench"));
    report::write(&report, &out)?;
    eprintln!(
        "wrote {} and {} ({:.0}s in all)",
        out.join("results.json").display(),
        out.join("throughput.svg").display(),
        report.total_seconds
    );
    admin.flush().await.ok();
    print!("{}", report::render_text(&report));
    Ok(ok)
}
