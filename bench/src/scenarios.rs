//! The scenarios, and what one run of a scenario does: a fresh stream, a preload of N messages
//! over K subjects, a measured drain (Mailroom in-process, or a native baseline), cleanup.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use mailroom::telemetry::MetricsSnapshot;
use mailroom::{Config, RunningHost};
use tokio_util::sync::CancellationToken;

use crate::native::{self, STALL};
use crate::report::Measurement;
use crate::sys::Meter;

/// Which suite a scenario belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    /// Mailroom against hand-written consumers.
    Compare,
    /// Ordered against unordered.
    Ordering,
}

/// What each message carries.
#[derive(Debug, Clone, Copy)]
pub enum Payload {
    /// This many filler bytes.
    Filler(usize),
    /// A JSON order, `{"id":n,"customer":"c-n","amount_cents":m}`.
    Orders,
    /// A fixed text (e.g. a command for `flaky`).
    Text(&'static str),
}

impl Payload {
    fn message(self, n: u64) -> Bytes {
        match self {
            Payload::Filler(size) => Bytes::from(vec![b'x'; size]),
            Payload::Orders => {
                let cents = (n * 7919) % 250_000;
                Bytes::from(format!(
                    r#"{{"id":{n},"customer":"c-{n}","amount_cents":{cents}}}"#
                ))
            }
            Payload::Text(text) => Bytes::from_static(text.as_bytes()),
        }
    }

    /// A short description for reports.
    pub fn describe(self) -> String {
        match self {
            Payload::Filler(size) => format!("{size} B"),
            Payload::Orders => "JSON order".to_owned(),
            Payload::Text(text) => format!("{text:?}"),
        }
    }
}

/// How many workers a Mailroom handler has.
#[derive(Debug, Clone, Copy)]
pub enum Workers {
    /// `concurrency = n`.
    Fixed(usize),
    /// `min_workers` / `max_workers`, autoscaled.
    Auto {
        /// Fewest.
        min: usize,
        /// Most.
        max: usize,
    },
}

/// A Mailroom handler as the scenario configures it.
#[derive(Debug, Clone)]
pub struct MailroomSpec {
    /// The guest module: `noop`, `enrich` or `flaky`.
    pub guest: &'static str,
    /// `ordering = "subject"` rather than `"none"`.
    pub ordered: bool,
    /// The pool.
    pub workers: Workers,
    /// `isolation = "reuse"`.
    pub reuse: bool,
    /// Grant publishing to, and configure, the output subject.
    pub enrich: bool,
}

/// Who drains the stream.
#[derive(Debug, Clone)]
pub enum Runner {
    /// async-nats, plain ack.
    Native,
    /// async-nats, enrich + publish + ack, this many messages at once.
    NativeEnrich {
        /// Messages in flight.
        in_flight: usize,
    },
    /// Mailroom in-process.
    Mailroom(MailroomSpec),
}

/// What a scenario's throughput is compared with.
#[derive(Debug, Clone)]
pub enum Baseline {
    /// Nothing: it is a baseline.
    None,
    /// Another scenario's median msgs/s.
    Scenario(String),
    /// A computed ideal.
    Ideal {
        /// The ideal rate.
        msgs_per_s: f64,
        /// How it is described.
        label: String,
    },
}

/// The place of an ordering-suite scenario in its table.
#[derive(Debug, Clone, Copy)]
pub struct OrderingCell {
    /// Distinct subjects.
    pub keys: u64,
    /// `noop` or `io`.
    pub handler: &'static str,
    /// Ordered by subject.
    pub ordered: bool,
}

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Unique name.
    pub name: String,
    /// Its suite.
    pub suite: Suite,
    /// Who drains.
    pub runner: Runner,
    /// What the messages carry.
    pub payload: Payload,
    /// N.
    pub messages: u64,
    /// K.
    pub subjects: u64,
    /// The comparison.
    pub baseline: Baseline,
    /// Ordering suite only.
    pub cell: Option<OrderingCell>,
}

/// Sizes from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// N for the compare suite.
    pub messages: u64,
    /// Workers of the fixed-pool noop scenarios.
    pub workers: usize,
    /// `max_workers` of `mailroom-io`.
    pub io_workers: usize,
    /// Ordering suite sizes are divided by 5.
    pub quick: bool,
}

/// Concurrency of both enrich scenarios.
const ENRICH_CONCURRENCY: usize = 16;
/// Fixed concurrency of every ordering-suite scenario.
const ORDERING_CONCURRENCY: usize = 16;
/// The `flaky` command of the I/O scenarios: a ~1 ms host-side wait.
const SLEEP: Payload = Payload::Text("sleep:1");

/// The compare suite, in run order.
pub fn compare(s: &Sizes) -> Vec<Scenario> {
    let n = s.messages;
    let sc = |name: &str, runner, payload, messages, subjects, baseline: Baseline| Scenario {
        name: name.to_owned(),
        suite: Suite::Compare,
        runner,
        payload,
        messages,
        subjects,
        baseline,
        cell: None,
    };
    let noop = |ordered, reuse| {
        Runner::Mailroom(MailroomSpec {
            guest: "noop",
            ordered,
            workers: Workers::Fixed(s.workers),
            reuse,
            enrich: false,
        })
    };
    let vs = |name: &str| Baseline::Scenario(name.to_owned());
    let small = Payload::Filler(128);
    let large = Payload::Filler(1024);
    vec![
        sc("native", Runner::Native, small, n, 100, Baseline::None),
        sc("native-1k", Runner::Native, large, n, 100, Baseline::None),
        sc("mailroom-noop", noop(false, false), small, n, 100, vs("native")),
        sc("mailroom-noop-1k", noop(false, false), large, n, 100, vs("native-1k")),
        sc("mailroom-noop-ordered", noop(true, false), small, n, 1000, vs("mailroom-noop")),
        sc(
            "native-enrich",
            Runner::NativeEnrich {
                in_flight: ENRICH_CONCURRENCY,
            },
            Payload::Orders,
            n,
            100,
            Baseline::None,
        ),
        sc(
            "mailroom-enrich",
            Runner::Mailroom(MailroomSpec {
                guest: "enrich",
                ordered: false,
                workers: Workers::Fixed(ENRICH_CONCURRENCY),
                reuse: false,
                enrich: true,
            }),
            Payload::Orders,
            n,
            100,
            vs("native-enrich"),
        ),
        sc(
            "mailroom-io",
            Runner::Mailroom(MailroomSpec {
                guest: "flaky",
                ordered: false,
                workers: Workers::Auto {
                    min: 1,
                    max: s.io_workers,
                },
                reuse: false,
                enrich: false,
            }),
            SLEEP,
            (n / 4).max(1),
            100,
            Baseline::Ideal {
                msgs_per_s: s.io_workers as f64 * 1000.0,
                label: format!("ideal {}×1000/s", s.io_workers),
            },
        ),
        sc("mailroom-reuse", noop(false, true), small, n, 100, vs("native")),
    ]
}

/// The ordering suite: every key count × handler × (ordered, unordered), in run order.
pub fn ordering(s: &Sizes) -> Vec<Scenario> {
    let div = if s.quick { 5 } else { 1 };
    let mut out = Vec::new();
    for keys in [1u64, 10, 1_000, 100_000] {
        for handler in ["noop", "io"] {
            let messages = match (handler, keys) {
                ("noop", _) => 50_000,
                (_, 1) => 2_000,
                _ => 10_000,
            } / div;
            for ordered in [true, false] {
                let mode = if ordered { "ordered" } else { "unordered" };
                let unordered_name = format!("ordering-{handler}-k{keys}-unordered");
                out.push(Scenario {
                    name: format!("ordering-{handler}-k{keys}-{mode}"),
                    suite: Suite::Ordering,
                    runner: Runner::Mailroom(MailroomSpec {
                        guest: if handler == "noop" { "noop" } else { "flaky" },
                        ordered,
                        workers: Workers::Fixed(ORDERING_CONCURRENCY),
                        reuse: false,
                        enrich: false,
                    }),
                    payload: if handler == "noop" {
                        Payload::Filler(128)
                    } else {
                        SLEEP
                    },
                    messages,
                    subjects: keys,
                    baseline: if ordered {
                        Baseline::Scenario(unordered_name)
                    } else {
                        Baseline::None
                    },
                    cell: Some(OrderingCell {
                        keys,
                        handler,
                        ordered,
                    }),
                });
            }
        }
    }
    out
}

/// Shared state of a benchmark run.
pub struct Bench {
    url: String,
    js: jetstream::Context,
    guests: PathBuf,
    cache_dir: PathBuf,
    base_dir: PathBuf,
    next_id: AtomicU32,
}

/// The names one run uses.
struct Names {
    stream: String,
    prefix: String,
    output_stream: String,
    output_subject: String,
}

impl Bench {
    /// A bench against `url`, using `admin` for streams and preloads.
    pub fn new(
        url: String,
        admin: async_nats::Client,
        guests: PathBuf,
        cache_dir: PathBuf,
        base_dir: PathBuf,
    ) -> Bench {
        Bench {
            url,
            js: jetstream::new(admin),
            guests,
            cache_dir,
            base_dir,
            next_id: AtomicU32::new(0),
        }
    }

    /// Runs `scenario` once on a fresh stream.
    pub async fn run(&self, scenario: &Scenario) -> anyhow::Result<Measurement> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let prefix = format!("b{id}");
        let names = Names {
            stream: format!("B{id}"),
            output_stream: format!("B{id}OUT"),
            output_subject: format!("{prefix}out.orders"),
            prefix,
        };
        let enrich = matches!(scenario.runner, Runner::NativeEnrich { .. })
            || matches!(&scenario.runner, Runner::Mailroom(m) if m.enrich);
        self.fresh_stream(&names.stream, &format!("{}.>", names.prefix))
            .await?;
        if enrich {
            self.fresh_stream(&names.output_stream, &format!("{}out.>", names.prefix))
                .await?;
        }
        let result = self.measure(scenario, &names, enrich).await;
        for name in [&names.stream, &names.output_stream] {
            let _ = self.js.delete_stream(name).await;
        }
        result
    }

    async fn measure(
        &self,
        scenario: &Scenario,
        names: &Names,
        enrich: bool,
    ) -> anyhow::Result<Measurement> {
        let preload = self.preload(scenario, &names.prefix).await?;
        let client = async_nats::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        let n = scenario.messages;
        let mut m = match &scenario.runner {
            Runner::Native => native_measurement(
                n,
                native::plain(client.clone(), &names.stream, n).await?,
            ),
            Runner::NativeEnrich { in_flight } => native_measurement(
                n,
                native::enrich(
                    client.clone(),
                    &names.stream,
                    &names.output_subject,
                    n,
                    *in_flight,
                )
                .await?,
            ),
            Runner::Mailroom(spec) => {
                self.mailroom(scenario, spec, names, client.clone())
                    .await?
            }
        };
        m.preload_s = preload.as_secs_f64();
        if enrich {
            let mut out = self
                .js
                .get_stream(&names.output_stream)
                .await
                .context("looking up the output stream")?;
            let stored = out
                .info()
                .await
                .context("reading the output stream")?
                .state
                .messages;
            m.outputs = Some(stored);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
        Ok(m)
    }

    async fn fresh_stream(&self, name: &str, subjects: &str) -> anyhow::Result<()> {
        // A stream left over by an interrupted run against the same server.
        let _ = self.js.delete_stream(name).await;
        self.js
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![subjects.to_owned()],
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating stream {name} for {subjects}"))?;
        Ok(())
    }

    /// Publishes the scenario's messages through JetStream, awaiting acks in windows of 512.
    async fn preload(&self, scenario: &Scenario, prefix: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut window = Vec::with_capacity(512);
        let fixed = match scenario.payload {
            Payload::Orders => None,
            other => Some(other.message(0)),
        };
        for i in 0..scenario.messages {
            let subject = format!("{prefix}.k{}", i % scenario.subjects.max(1));
            let payload = fixed.clone().unwrap_or_else(|| scenario.payload.message(i));
            let ack = self
                .js
                .publish(subject, payload)
                .await
                .with_context(|| format!("preloading message {i}"))?;
            window.push(ack);
            if window.len() == 512 {
                for ack in window.drain(..) {
                    ack.await.context("preloaded message not stored")?;
                }
            }
        }
        for ack in window {
            ack.await.context("preloaded message not stored")?;
        }
        Ok(started.elapsed())
    }

    async fn mailroom(
        &self,
        scenario: &Scenario,
        spec: &MailroomSpec,
        names: &Names,
        client: async_nats::Client,
    ) -> anyhow::Result<Measurement> {
        let module = self.guests.join(format!("{}.wasm", spec.guest));
        let text = mailroom_toml(&scenario.name, &module, spec, names);
        let mut config = Config::parse(&text, &self.base_dir)
            .with_context(|| format!("the bench's config for {} is invalid:\n{text}", scenario.name))?;
        config.host.cache_dir = Some(self.cache_dir.clone());
        let shutdown = CancellationToken::new();
        let mut meter = Meter::start();
        let t_start = Instant::now();
        let running = mailroom::start(config, client, shutdown.clone())
            .await
            .with_context(|| format!("starting mailroom for {}", scenario.name))?;
        let start_s = t_start.elapsed().as_secs_f64();
        meter.restart_cpu();
        let max_workers = match spec.workers {
            Workers::Auto { max, .. } => Some(max),
            Workers::Fixed(_) => None,
        };
        let drained = wait_for(&running, &scenario.name, scenario.messages, max_workers).await;
        let usage = meter.read();
        shutdown.cancel();
        let t_stop = Instant::now();
        let stopped = tokio::time::timeout(Duration::from_secs(60), running.wait()).await;
        let stop_s = t_stop.elapsed().as_secs_f64();
        let (elapsed, snapshot, to_max) = drained?;
        if stopped.is_err() {
            bail!("mailroom did not drain within 60s after {} was done", scenario.name);
        }
        let n = scenario.messages;
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
            host: Some(snapshot),
            ..Measurement::default()
        })
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn native_measurement(n: u64, d: native::Drained) -> Measurement {
    let secs = d.elapsed.as_secs_f64().max(1e-9);
    let ms = |q| d.latency.quantile(q).map(|l| l.as_secs_f64() * 1000.0);
    Measurement {
        messages: n,
        seconds: secs,
        msgs_per_s: n as f64 / secs,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        cpu_s_per_1k: d.usage.cpu_seconds.map(|c| c / n as f64 * 1000.0),
        peak_rss_mib: d.usage.peak_rss.map(mib),
        ..Measurement::default()
    }
}

/// Polls the handler's counters every 5 ms until `n` messages succeeded. Returns the time it
/// took, the last snapshot, and when the pool first reached `max_workers` (if given and it did).
async fn wait_for(
    running: &RunningHost,
    name: &str,
    n: u64,
    max_workers: Option<usize>,
) -> anyhow::Result<(Duration, MetricsSnapshot, Option<Duration>)> {
    let started = Instant::now();
    let mut to_max = None;
    let mut progress = (0u64, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let snapshot = running
            .metrics()
            .snapshot()
            .into_iter()
            .find(|(handler, _)| handler == name)
            .map(|(_, s)| s)
            .ok_or_else(|| anyhow!("the host has no handler named {name}"))?;
        if to_max.is_none() && max_workers.is_some_and(|max| snapshot.workers >= max as i64) {
            to_max = Some(started.elapsed());
        }
        if snapshot.succeeded >= n {
            return Ok((started.elapsed(), snapshot, to_max));
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

fn mailroom_toml(name: &str, module: &std::path::Path, spec: &MailroomSpec, names: &Names) -> String {
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

    fn sizes() -> Sizes {
        Sizes {
            messages: 1000,
            workers: 4,
            io_workers: 16,
            quick: false,
        }
    }

    #[test]
    fn every_config_parses() {
        let names = Names {
            stream: "B1".into(),
            prefix: "b1".into(),
            output_stream: "B1OUT".into(),
            output_subject: "b1out.orders".into(),
        };
        for s in compare(&sizes()).iter().chain(ordering(&sizes()).iter()) {
            if let Runner::Mailroom(spec) = &s.runner {
                let text = mailroom_toml(&s.name, std::path::Path::new("/x/\"q\".wasm"), spec, &names);
                Config::parse(&text, std::path::Path::new("/")).unwrap_or_else(|e| panic!("{text}\n{e:#}"));
            }
        }
    }

    #[test]
    fn baselines_exist() {
        let all: Vec<Scenario> = compare(&sizes()).into_iter().chain(ordering(&sizes())).collect();
        for s in &all {
            if let Baseline::Scenario(b) = &s.baseline {
                assert!(all.iter().any(|o| &o.name == b), "{} -> {b}", s.name);
            }
        }
        assert_eq!(ordering(&sizes()).len(), 16);
    }

    #[test]
    fn orders_are_json() {
        let v: serde_json::Value = serde_json::from_slice(&Payload::Orders.message(3)).unwrap();
        assert_eq!(v["customer"], "c-3");
    }
}
