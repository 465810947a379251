//! The host: load every handler, make sure its streams, buckets and consumers exist, run one
//! consumer per handler, and stop cleanly.
//!
//! Entry points take their dependencies ([`run`] / [`start`] take the config, a connected
//! client and a shutdown token), so tests run the whole host in-process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, kv, stream};
use async_nats::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::capabilities::{Backend, Grants, HandlerCaps, MemoryBackend, NatsBackend};
use crate::config::{BucketSpec, Config, HandlerConfig, StreamSpec};
use crate::consumer::{self, Shared};
use crate::runtime::{HandlerModule, Runtime, RuntimeConfig};
use crate::telemetry::{HandlerMetrics, Metrics};

/// A host that is running; dropping it does not stop it, cancelling its token does.
pub struct RunningHost {
    metrics: Metrics,
    tracker: TaskTracker,
    failed: Vec<String>,
}

impl RunningHost {
    /// Live counters of every handler that started.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Handlers that could not start, with the reason (the others run).
    pub fn failed_handlers(&self) -> &[String] {
        &self.failed
    }

    /// Waits until every handler has drained after shutdown.
    pub async fn wait(self) {
        self.tracker.wait().await;
    }
}

/// Runs the host until `shutdown` is cancelled and every handler has drained.
pub async fn run(
    config: Config,
    client: Client,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    start(config, client, shutdown).await?.wait().await;
    Ok(())
}

/// Starts the host and returns once every handler is consuming.
///
/// A handler whose module or consumer cannot be set up is reported (logged, and listed in
/// [`RunningHost::failed_handlers`]) while the others start; if none starts, this fails.
pub async fn start(
    config: Config,
    client: Client,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningHost> {
    let js = jetstream::ContextBuilder::new()
        .backpressure_on_inflight(true)
        .build(client.clone());
    for spec in &config.streams {
        ensure_stream(&js, spec).await?;
    }
    for spec in &config.buckets {
        ensure_bucket(&js, spec).await?;
    }
    let runtime = Runtime::new(&runtime_config(&config))?;
    let backend: Arc<dyn Backend> = Arc::new(NatsBackend::new(js.clone()));
    let mut metrics = Metrics::default();
    let tracker = TaskTracker::new();
    let mut failed = Vec::new();
    for handler in &config.handlers {
        let handler_metrics = metrics.handler(&handler.name);
        let prepared = prepare(&runtime, &js, &client, &backend, handler, handler_metrics).await;
        match prepared {
            Ok(shared) => {
                tracing::info!(
                    handler = %handler.name,
                    stream = %handler.stream,
                    consumer = %handler.consumer,
                    ordering = %handler.ordering,
                    workers = %format!("{}..={}", handler.min_workers, handler.max_workers),
                    "handler started"
                );
                tracker.spawn(consumer::run(
                    Arc::new(shared),
                    shutdown.clone(),
                    config.host.drain_timeout,
                ));
            }
            Err(err) => {
                tracing::error!(handler = %handler.name, "handler not started: {err:#}");
                failed.push(format!("{}: {err:#}", handler.name));
            }
        }
    }
    tracker.close();
    if failed.len() == config.handlers.len() {
        bail!("no handler could start:\n  {}", failed.join("\n  "));
    }
    if let Some(addr) = &config.host.metrics_addr {
        crate::metrics_server::spawn(addr, metrics.clone(), shutdown.clone(), &tracker)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    Ok(RunningHost {
        metrics,
        tracker,
        failed,
    })
}

async fn prepare(
    runtime: &Runtime,
    js: &jetstream::Context,
    client: &Client,
    backend: &Arc<dyn Backend>,
    handler: &HandlerConfig,
    metrics: Arc<HandlerMetrics>,
) -> anyhow::Result<Shared> {
    let module = load(runtime, handler, backend.clone(), metrics.clone())?;
    if let Some(subject) = &handler.dead_letter {
        js.stream_by_subject(subject).await.map_err(|err| {
            anyhow::anyhow!(
                "dead_letter subject {subject} is not captured by any stream ({err}), so \
                 dead-letter records would not be durable; add a [[stream]] whose subjects \
                 include it"
            )
        })?;
    }
    consumer::ensure_consumer(js, handler).await?;
    Ok(Shared::new(
        module,
        handler.clone(),
        client.clone(),
        js.clone(),
        metrics,
    ))
}

fn load(
    runtime: &Runtime,
    handler: &HandlerConfig,
    backend: Arc<dyn Backend>,
    metrics: Arc<HandlerMetrics>,
) -> anyhow::Result<HandlerModule> {
    let caps = Arc::new(HandlerCaps {
        name: handler.name.as_str().into(),
        grants: Grants {
            publish: handler.publish_allow.clone(),
            kv_buckets: handler.kv_allow.clone(),
        },
        settings: handler.settings.clone(),
        max_publishes: handler.max_publishes,
        log_budget: handler.log_budget,
        backend,
        metrics,
    });
    runtime.load_handler(
        &handler.module,
        handler.limits.clone(),
        handler.isolation,
        caps,
    )
}

fn runtime_config(config: &Config) -> RuntimeConfig {
    RuntimeConfig {
        // Every worker may hold an instance; a little headroom absorbs stores that are
        // still being torn down while the next message starts.
        max_instances: config
            .handlers
            .iter()
            .map(|h| h.max_workers as u32)
            .sum::<u32>()
            .saturating_add(4),
        max_memory: config
            .handlers
            .iter()
            .map(|h| h.limits.memory)
            .max()
            .unwrap_or(64 << 20),
        epoch_tick: config.host.epoch_tick,
        cache_dir: config.host.cache_dir.clone(),
    }
}

/// Checks every handler's module without connecting: each one is compiled, linked and checked
/// against the `mailroom:handler` world. Returns one summary line per handler.
pub fn validate(config: &Config) -> anyhow::Result<Vec<String>> {
    let runtime = Runtime::new(&runtime_config(config))?;
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new(1 << 20));
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for handler in &config.handlers {
        match load(&runtime, handler, backend.clone(), Arc::default()) {
            Ok(_) => lines.push(format!(
                "handler {}: {} consumes stream {} as {} (ordering {}, workers {}..={}, {} attempts, dead letter {})",
                handler.name,
                handler.module.display(),
                handler.stream,
                handler.consumer,
                handler.ordering,
                handler.min_workers,
                handler.max_workers,
                handler.retry.max_attempts,
                handler.dead_letter.as_deref().unwrap_or("none"),
            )),
            Err(err) => errors.push(format!("handler {}: {err:#}", handler.name)),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(lines)
}

/// Creates `spec` if no stream of that name exists; an existing stream is left as it is.
async fn ensure_stream(js: &jetstream::Context, spec: &StreamSpec) -> anyhow::Result<()> {
    if js.get_stream(&spec.name).await.is_ok() {
        return Ok(());
    }
    js.create_stream(stream::Config {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        storage: if spec.memory_storage {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        duplicate_window: spec.duplicate_window,
        max_age: spec.max_age,
        num_replicas: spec.replicas,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating stream {} ({:?})", spec.name, spec.subjects))?;
    tracing::info!(stream = %spec.name, subjects = ?spec.subjects, "created stream");
    Ok(())
}

/// Creates bucket `spec` if it does not exist.
async fn ensure_bucket(js: &jetstream::Context, spec: &BucketSpec) -> anyhow::Result<()> {
    if js.get_key_value(&spec.name).await.is_ok() {
        return Ok(());
    }
    js.create_key_value(kv::Config {
        bucket: spec.name.clone(),
        history: spec.history,
        storage: if spec.memory_storage {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        num_replicas: spec.replicas,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating KV bucket {}", spec.name))?;
    tracing::info!(bucket = %spec.name, "created KV bucket");
    Ok(())
}

/// Connects with the config's options, runs the host, and drains on SIGINT or SIGTERM.
pub async fn run_until_signal(config: Config) -> anyhow::Result<()> {
    let client = crate::connect::connect(&config.nats).await?;
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
    let drain = config.host.drain_timeout;
    let result = run(config, client.clone(), shutdown.clone()).await;
    signals.abort();
    // Give the connection a moment to write the last confirmed acks out.
    let _ = tokio::time::timeout(Duration::from_secs(5).min(drain), client.flush()).await;
    result
}

async fn wait_for_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; draining"),
                    _ = int.recv() => tracing::info!("SIGINT received; draining"),
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; stop with Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C received; draining");
    }
    shutdown.cancel();
}
