//! One run of one scenario: a fresh stream, a preload of N messages over K subjects through
//! JetStream, a measured drain (Mailroom in-process, or a native baseline), cleanup.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use mailroom::Config;

use crate::peers::Wash;
use crate::report::Measurement;
use crate::scenarios::{self, MailroomSpec, Payload, Runner, Scenario, Workers};
use crate::{bursts, inprocess, native, peers};

/// Shared state of a benchmark run.
pub struct Bench {
    url: String,
    js: jetstream::Context,
    guests: PathBuf,
    cache_dir: PathBuf,
    base_dir: PathBuf,
    next_id: AtomicU32,
    /// The peers suite's wash, when that suite runs.
    wash: Option<Wash>,
}

/// The names one run uses.
pub struct Names {
    /// The input stream, `B<n>`.
    pub stream: String,
    /// Its subjects' first token, `b<n>`.
    pub prefix: String,
    /// The enrich output stream, `B<n>OUT`.
    pub output_stream: String,
    /// The enrich output subject, `b<n>out.orders`.
    pub output_subject: String,
}

impl Bench {
    /// A bench against `url`, using `admin` for streams and preloads.
    pub fn new(
        url: String,
        admin: async_nats::Client,
        guests: PathBuf,
        cache_dir: PathBuf,
        base_dir: PathBuf,
        wash: Option<Wash>,
    ) -> Bench {
        Bench {
            url,
            js: jetstream::new(admin),
            guests,
            cache_dir,
            base_dir,
            next_id: AtomicU32::new(0),
            wash,
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
        let result = async {
            self.fresh_stream(&names.stream, &format!("{}.>", names.prefix))
                .await?;
            if enrich {
                self.fresh_stream(&names.output_stream, &format!("{}out.>", names.prefix))
                    .await?;
            }
            self.measure(scenario, &names, enrich, id).await
        }
        .await;
        // Whatever happened, leave nothing behind on the server (a partitioned handler's
        // work stream too).
        let work = format!("MR_{}_P{}", scenario.name, scenarios::PARTITIONS);
        for name in [&names.stream, &names.output_stream, &work] {
            let _ = self.js.delete_stream(name).await;
        }
        result
    }

    async fn measure(
        &self,
        scenario: &Scenario,
        names: &Names,
        enrich: bool,
        id: u32,
    ) -> anyhow::Result<Measurement> {
        // The bursts scenario publishes while the host runs; every other one drains a preload.
        let preload = match scenario.runner {
            Runner::MailroomBursts { .. } | Runner::MailroomHosts { .. } => Duration::ZERO,
            _ => {
                self.publish(scenario, &names.prefix, 0..scenario.messages)
                    .await?
            }
        };
        let client = async_nats::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.url))?;
        let n = scenario.messages;
        let mut m = match &scenario.runner {
            Runner::Native => native::plain(client.clone(), &names.stream, n)
                .await?
                .measurement(n),
            Runner::NativeIo { in_flight } => {
                native::io(client.clone(), &names.stream, n, *in_flight)
                    .await
                    .map(|d| d.measurement(n))?
            }
            Runner::NativeEnrich { in_flight } => native::enrich(
                client.clone(),
                &names.stream,
                &names.output_subject,
                n,
                *in_flight,
            )
            .await?
            .measurement(n),
            Runner::Mailroom(spec) => self.mailroom(scenario, spec, names, client.clone()).await?,
            Runner::MailroomBursts { spec, bursts, size } => {
                let config = self.config(scenario, spec, names)?;
                let Workers::Auto { min, max } = spec.workers else {
                    anyhow::bail!(
                        "{}: a bursts scenario needs an autoscaled pool",
                        scenario.name
                    );
                };
                bursts::run(
                    client.clone(),
                    config,
                    &scenario.name,
                    (min, max),
                    *bursts,
                    *size,
                    |burst| {
                        let (from, size) = (burst as u64 * size, *size);
                        async move {
                            self.publish(scenario, &names.prefix, from..from + size)
                                .await
                                .map(drop)
                        }
                    },
                )
                .await?
            }
            Runner::MailroomHosts { spec, hosts } => {
                let config = self.config(scenario, spec, names)?;
                let partitions = spec.partitions.ok_or_else(|| {
                    anyhow::anyhow!("{}: a hosts scenario needs partitions", scenario.name)
                })?;
                crate::hosts::run(
                    &self.url,
                    config,
                    &scenario.name,
                    *hosts,
                    partitions,
                    n,
                    async { self.publish(scenario, &names.prefix, 0..n).await.map(drop) },
                )
                .await?
            }
            Runner::Wasmcloud { pooled, in_flight } => {
                let wash = self.wash.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("{}: wash was not prepared for this run", scenario.name)
                })?;
                peers::drain(
                    wash,
                    &self.js,
                    &self.url,
                    id,
                    &names.stream,
                    &names.prefix,
                    n,
                    *pooled,
                    *in_flight,
                )
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

    /// Publishes messages `range` of the scenario through JetStream, awaiting acks in windows
    /// of 512.
    async fn publish(
        &self,
        scenario: &Scenario,
        prefix: &str,
        range: std::ops::Range<u64>,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut window = Vec::with_capacity(512);
        let fixed = match scenario.payload {
            Payload::Orders => None,
            other => Some(other.message(0)),
        };
        for i in range {
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

    /// The host configuration of a Mailroom scenario.
    fn config(
        &self,
        scenario: &Scenario,
        spec: &MailroomSpec,
        names: &Names,
    ) -> anyhow::Result<Config> {
        let module = self.guests.join(format!("{}.wasm", spec.guest));
        let text = inprocess::config_text(&scenario.name, &module, spec, names);
        let mut config = Config::parse(&text, &self.base_dir).with_context(|| {
            format!(
                "the bench's config for {} is invalid:\n{text}",
                scenario.name
            )
        })?;
        config.host.cache_dir = Some(self.cache_dir.clone());
        Ok(config)
    }

    async fn mailroom(
        &self,
        scenario: &Scenario,
        spec: &MailroomSpec,
        names: &Names,
        client: async_nats::Client,
    ) -> anyhow::Result<Measurement> {
        let config = self.config(scenario, spec, names)?;
        let max_workers = match spec.workers {
            Workers::Auto { max, .. } => Some(max),
            Workers::Fixed(_) => None,
        };
        inprocess::drain(
            client,
            config,
            &scenario.name,
            scenario.messages,
            max_workers,
        )
        .await
    }
}
