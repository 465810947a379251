//! `mailroom dev`: the one-command demo.
//!
//! Starts a local `nats-server` (unless given a URL), runs the host in-process with the demo
//! configuration, runs the `producer` example, sends the `flaky` handler one message per
//! failure path, waits until every message is settled, and reports what happened. It says
//! what it does as it goes (`progress`, first the header) and ends with the table.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::consumer::settle::headers;
use crate::nats_server::NatsServer;
use crate::telemetry::MetricsSnapshot;

/// What to run.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The demo configuration.
    pub config: PathBuf,
    /// An existing server to use instead of starting one.
    pub nats_url: Option<String>,
    /// Orders to publish.
    pub messages: u64,
    /// Subjects to spread them over.
    pub subjects: u64,
    /// The producer binary (default: next to the running executable).
    pub producer: Option<PathBuf>,
    /// Where the host's log goes, when not to the terminal (named in the header).
    pub log_file: Option<PathBuf>,
    /// After the demo, keep running and reload modules whose files change, until a signal.
    pub watch: bool,
}

/// The payloads sent to `flaky`, one per failure path, and what each should end as.
pub const FLAKY_DEMO: &[(&str, &str)] = &[
    ("ok", "succeeds"),
    ("retry-until:3", "fails twice, then succeeds"),
    (
        "retry-after:300",
        "asks for a 300ms delay once, then succeeds",
    ),
    ("trap-once", "panics once, then succeeds"),
    ("reject", "is rejected: dead-lettered at once"),
    ("trap", "panics on every attempt: dead-lettered"),
    (
        "loop",
        "never returns: stopped by the timeout, dead-lettered",
    ),
    ("oom", "exhausts its memory limit: dead-lettered"),
];

/// One dead-letter record.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Original subject.
    pub subject: String,
    /// Error kind header.
    pub kind: String,
    /// Error header.
    pub error: String,
    /// Attempts header.
    pub attempts: String,
}

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct DevReport {
    /// Counters per handler.
    pub handlers: Vec<(String, MetricsSnapshot)>,
    /// Per stream: name and message count.
    pub streams: Vec<(String, u64)>,
    /// One enriched order, as published.
    pub sample_output: Option<String>,
    /// KV counts, as `(key, value)`.
    pub counts: Vec<(String, String)>,
    /// Records in the dead-letter stream.
    pub dead_letters: Vec<DeadLetter>,
    /// Consumers still holding messages (pending or unacked) when the demo stopped.
    pub unsettled: Vec<String>,
    /// How long processing took.
    pub elapsed: Duration,
}

impl DevReport {
    /// Whether every message was settled.
    pub fn complete(&self) -> bool {
        self.unsettled.is_empty()
    }
}

/// Runs the demo, telling `progress` what it does (one line per call, the header first).
pub async fn run(
    opts: DevOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> anyhow::Result<DevReport> {
    let config = Config::load(&opts.config)?;
    for handler in &config.handlers {
        if !handler.module.exists() {
            bail!(
                "handler {}: module {} is missing; build the examples first with \
                 `cargo xtask demo` (or `cargo build --target wasm32-wasip2 --release -p enrich \
                 -p counter -p flaky`)",
                handler.name,
                handler.module.display()
            );
        }
    }
    let producer = match &opts.producer {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("producer"),
    };
    if !producer.exists() {
        bail!(
            "producer binary {} is missing; build it with `cargo build -p producer` or pass --producer",
            producer.display()
        );
    }

    let (_server, url, server) = match &opts.nats_url {
        Some(url) => (None, url.clone(), format!("nats-server at {url}")),
        None => {
            let s = tokio::task::spawn_blocking(NatsServer::start).await??;
            let text = format!(
                "nats-server {} at {} (started for this demo)",
                s.version(),
                s.url()
            );
            let url = s.url();
            (Some(s), url, text)
        }
    };
    progress(&format!("Mailroom demo on {server}"));
    progress(&match &opts.log_file {
        Some(path) => format!("host log (info): {}", path.display()),
        None => "host log: warnings and errors only, here (--log info for more, --log-file FILE to keep it)".to_owned(),
    });
    if config.handlers.iter().any(|h| h.name == "flaky") {
        progress(
            "note: the flaky handler fails on purpose (retries, panics, a timeout, an \
             out-of-memory); the warnings and panic messages in its log are expected",
        );
    }
    progress("");
    let client = async_nats::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let shutdown = CancellationToken::new();
    let host = crate::host::start(config.clone(), client.clone(), shutdown.clone()).await?;
    if opts.watch {
        // The reloads are logged; nobody needs their events here.
        drop(host.reload_modules_on_change(shutdown.clone()));
    }
    let start = Instant::now();

    let output = tokio::process::Command::new(&producer)
        .arg("--url")
        .arg(&url)
        .arg("--messages")
        .arg(opts.messages.to_string())
        .arg("--subjects")
        .arg(opts.subjects.to_string())
        .output()
        .await
        .with_context(|| format!("running {}", producer.display()))?;
    if !output.status.success() {
        bail!(
            "the producer failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    progress(&format!(
        "producer: {}",
        String::from_utf8_lossy(&output.stdout).trim()
    ));

    let js = jetstream::new(client.clone());
    let flaky = config.handlers.iter().any(|h| h.name == "flaky");
    if flaky {
        for (i, (payload, _)) in FLAKY_DEMO.iter().enumerate() {
            let subject = format!("jobs.{}", payload.split(':').next().unwrap_or(payload));
            js.send_publish(
                subject,
                jetstream::message::PublishMessage::build()
                    .payload((*payload).into())
                    .message_id(format!("demo-job-{i}")),
            )
            .await?
            .await?;
        }
    }

    if flaky {
        progress(&format!(
            "sent flaky one job per failure path ({} jobs); waiting until every message is settled",
            FLAKY_DEMO.len()
        ));
    }
    // Wait until every handler's consumer holds nothing: no pending, nothing awaiting an ack.
    let deadline = Instant::now() + Duration::from_secs(120);
    let unsettled = loop {
        let mut unsettled = Vec::new();
        for h in &config.handlers {
            if let Some(n) = h.partitions {
                // A partitioned handler's work stream is a work queue: empty means settled.
                let work = crate::group::workstream::name(&h.name, n);
                let left = js.get_stream(&work).await?.info().await?.state.messages;
                // It sources the stream: everything published must have been copied too.
                let sourced = js.get_stream(&h.stream).await?.info().await?.state.messages;
                let copied = js
                    .get_stream(&work)
                    .await?
                    .info()
                    .await?
                    .state
                    .last_sequence;
                if left > 0 || copied < sourced {
                    unsettled.push(format!("{}: {left} left in {work}", h.name));
                }
                continue;
            }
            let mut consumer: jetstream::consumer::PullConsumer =
                js.get_consumer_from_stream(&h.consumer, &h.stream).await?;
            let info = consumer.info().await?;
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                unsettled.push(format!(
                    "{}: {} pending, {} awaiting ack",
                    h.name, info.num_pending, info.num_ack_pending
                ));
            }
        }
        if unsettled.is_empty() || Instant::now() > deadline {
            break unsettled;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elapsed = start.elapsed();

    let mut streams = Vec::new();
    for s in &config.streams {
        let mut stream = js.get_stream(&s.name).await?;
        streams.push((s.name.clone(), stream.info().await?.state.messages));
    }
    let sample_output = first_message(&js, "ENRICHED").await;
    let counts = kv_entries(&js, "counts").await;
    let dead_letters = read_dead_letters(&js, "DEAD_LETTERS").await;
    let handlers = host.metrics().snapshot();
    let report = DevReport {
        handlers,
        streams,
        sample_output,
        counts,
        dead_letters,
        unsettled,
        elapsed,
    };
    if opts.watch {
        println!("{report}\n");
        println!(
            "still running on {url}: rebuild a handler (cargo build --target wasm32-wasip2 \
             --release) and its module is reloaded; Ctrl-C stops"
        );
        let stop = CancellationToken::new();
        let signals = tokio::spawn(crate::signals::watch(
            stop.clone(),
            config.host.drain_timeout,
        ));
        stop.cancelled().await;
        signals.abort();
    }
    shutdown.cancel();
    host.wait().await;
    Ok(report)
}

async fn first_message(js: &jetstream::Context, stream: &str) -> Option<String> {
    let stream = js.get_stream(stream).await.ok()?;
    let msg = stream.get_raw_message(1).await.ok()?;
    Some(String::from_utf8_lossy(&msg.payload).into_owned())
}

async fn kv_entries(js: &jetstream::Context, bucket: &str) -> Vec<(String, String)> {
    let Ok(store) = js.get_key_value(bucket).await else {
        return Vec::new();
    };
    let Ok(mut keys) = store.keys().await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some(Ok(key)) = keys.next().await {
        if let Ok(Some(value)) = store.get(&key).await {
            out.push((key, String::from_utf8_lossy(&value).into_owned()));
        }
    }
    out.sort_by_key(|(k, _)| (k.len(), k.clone()));
    out
}

async fn read_dead_letters(js: &jetstream::Context, stream: &str) -> Vec<DeadLetter> {
    let Ok(mut s) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let Ok(info) = s.info().await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(msg) = s.get_raw_message(seq).await {
            let get = |name: &str| {
                msg.headers
                    .get(name)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            out.push(DeadLetter {
                subject: get(headers::SUBJECT),
                kind: get(headers::ERROR_KIND),
                error: get(headers::ERROR),
                attempts: get(headers::ATTEMPTS),
            });
        }
    }
    out
}

impl fmt::Display for DevReport {
    /// The details, then the table: the last thing on the screen is the summary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let streams: Vec<String> = self
            .streams
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        writeln!(f, "streams: {}", streams.join(", "))?;
        if let Some(sample) = &self.sample_output {
            writeln!(f, "enrich's first output: {sample}")?;
        }
        if !self.counts.is_empty() {
            let counts: Vec<String> = self
                .counts
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(f, "counter's KV bucket `counts`: {}", counts.join(" "))?;
        }
        if !self.dead_letters.is_empty() {
            writeln!(
                f,
                "dead letters ({}; see them with `mailroom dlq ls`):",
                self.dead_letters.len()
            )?;
            for d in &self.dead_letters {
                let error: String = d.error.chars().take(100).collect();
                writeln!(
                    f,
                    "  {:<12} {:<14} attempts {:<2} {error}",
                    d.subject, d.kind, d.attempts
                )?;
            }
        }
        writeln!(f)?;
        if self.unsettled.is_empty() {
            writeln!(
                f,
                "every message settled in {:.1?}: nothing pending, nothing awaiting an ack.",
                self.elapsed
            )?;
        } else {
            writeln!(
                f,
                "NOT settled after {:.1?}: {}",
                self.elapsed,
                self.unsettled.join("; ")
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<10} {:>9} {:>9} {:>8} {:>13} {:>10} {:>6} {:>9} {:>13}",
            "handler",
            "received",
            "ok",
            "retried",
            "dead-lettered",
            "published",
            "traps",
            "timeouts",
            "peak workers"
        )?;
        for (i, (name, m)) in self.handlers.iter().enumerate() {
            write!(
                f,
                "{:<10} {:>9} {:>9} {:>8} {:>13} {:>10} {:>6} {:>9} {:>13}",
                name,
                m.received,
                m.succeeded,
                m.retried,
                m.dead_lettered,
                m.published,
                m.traps,
                m.timeouts,
                m.busy_peak
            )?;
            if i + 1 < self.handlers.len() {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
