//! `mailroom dev`: the one-command demo.
//!
//! Starts a local `nats-server` (unless given a URL), runs the host in-process with the demo
//! configuration, runs the `producer` example, sends the `flaky` handler one message per
//! failure path, waits until every message is settled, and reports what happened.

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
    /// The server used.
    pub server: String,
    /// What the producer printed.
    pub producer_output: String,
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

/// Runs the demo.
pub async fn run(opts: DevOptions) -> anyhow::Result<DevReport> {
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
    let client = async_nats::connect(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let shutdown = CancellationToken::new();
    let host = crate::host::start(config.clone(), client.clone(), shutdown.clone()).await?;
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
    let producer_output = String::from_utf8_lossy(&output.stdout).trim().to_owned();

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

    // Wait until every handler's consumer holds nothing: no pending, nothing awaiting an ack.
    let deadline = Instant::now() + Duration::from_secs(120);
    let unsettled = loop {
        let mut unsettled = Vec::new();
        for h in &config.handlers {
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

    shutdown.cancel();
    host.wait().await;
    Ok(DevReport {
        server,
        producer_output,
        handlers,
        streams,
        sample_output,
        counts,
        dead_letters,
        unsettled,
        elapsed,
    })
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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Mailroom demo on {}", self.server)?;
        writeln!(f, "producer: {}", self.producer_output)?;
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
        for (name, m) in &self.handlers {
            writeln!(
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
        }
        writeln!(f)?;
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
            writeln!(f, "dead letters ({}):", self.dead_letters.len())?;
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
            write!(
                f,
                "every message settled in {:.1?}: nothing pending, nothing awaiting an ack.",
                self.elapsed
            )
        } else {
            write!(
                f,
                "NOT settled after {:.1?}: {}",
                self.elapsed,
                self.unsettled.join("; ")
            )
        }
    }
}
