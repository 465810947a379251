//! The host: load every handler, make sure its streams, buckets and consumers exist, run one
//! consumer per handler, and stop cleanly.
//!
//! Entry points take their dependencies ([`run`] / [`start`] take the config, a connected
//! client and a shutdown token), so tests run the whole host in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, kv, stream};
use async_nats::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::{Backoff, RetryPolicy};
use crate::capabilities::{Backend, Grants, HandlerCaps, NatsBackend};
use crate::config::{BucketSpec, Config, HandlerConfig, HostConfig, OnHandlerError, StreamSpec};
use crate::consumer::{Attempts, Shared};
use crate::group;
use crate::health::HandlerState;
use crate::runtime::{HandlerModule, Runtime, RuntimeConfig};
use crate::status::HostStatus;

mod bind;
use crate::telemetry::{HandlerMetrics, Metrics};
pub(crate) use bind::server_at_least;
use bind::{bind, run_handler, Binding};

/// A host that is running; dropping it does not stop it, cancelling its token does.
pub struct RunningHost {
    metrics: Metrics,
    status: HostStatus,
    tracker: TaskTracker,
    admin_addr: Option<SocketAddr>,
    context: HostContext,
    files: Vec<(HandlerConfig, Arc<Shared>)>,
}

impl RunningHost {
    /// This host's id (in leases, `mailroom status` and `mailroom ls`).
    pub fn id(&self) -> &str {
        &self.context.host_id
    }

    /// How many times the module of handler `name` was replaced since it (last) started
    /// here; `None` if it never ran here.
    pub fn module_version(&self, name: &str) -> Option<u64> {
        self.context
            .lock_running()
            .get(name)
            .map(|shared| shared.module.version())
    }

    /// Reloads a file handler's module whenever its file changes on disk (`mailroom dev
    /// --watch`), through the same validation and swap as a deployed revision, until `stop`.
    /// Every reload (or refusal) is also sent to the returned receiver, if kept.
    pub fn reload_modules_on_change(
        &self,
        stop: CancellationToken,
    ) -> tokio::sync::mpsc::UnboundedReceiver<crate::registry::reload::Reloaded> {
        let (context, files) = (self.context.clone(), self.files.clone());
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        self.tracker
            .spawn(crate::registry::reload::run(context, files, stop, events));
        receiver
    }

    /// Live counters and lifecycle state of every handler.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// What `/status` and `/readyz` report.
    pub fn status(&self) -> &HostStatus {
        &self.status
    }

    /// The address the HTTP endpoint listens on, when `host.metrics_addr` is set (useful with
    /// port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Handlers that are not running because their last start failed, as `name: error`
    /// (under `on_handler_error = "retry"` they are being tried again).
    pub fn failed_handlers(&self) -> Vec<String> {
        self.metrics
            .handlers()
            .filter(|(_, m)| {
                matches!(
                    m.lifecycle.get(),
                    HandlerState::Failed | HandlerState::Starting
                )
            })
            .filter_map(|(name, m)| m.lifecycle.error().map(|e| format!("{name}: {e}")))
            .collect()
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

/// Starts the host and returns once every handler has made its first start attempt.
///
/// The HTTP endpoint (when `host.metrics_addr` is set) answers first, so `/healthz` and
/// `/readyz` work while modules compile. A handler whose module or consumer cannot be set up
/// is `failed` (logged, in `/status`, in [`RunningHost::failed_handlers`]) while the others
/// start; `host.on_handler_error` decides the rest: `exit` fails this call, `retry` (the
/// default) tries it again in the background with a backoff, `continue` leaves it failed.
/// Under `exit` and `continue` this also fails when no handler started (unless the host
/// watches for deployed handlers).
pub async fn start(
    config: Config,
    client: Client,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningHost> {
    start_with(config, client, shutdown, None).await
}

/// [`start`], serving the HTTP endpoint on `listener` when given (bound before connecting).
pub async fn start_with(
    config: Config,
    client: Client,
    shutdown: CancellationToken,
    listener: Option<tokio::net::TcpListener>,
) -> anyhow::Result<RunningHost> {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let js = jetstream::ContextBuilder::new()
        .backpressure_on_inflight(true)
        .build(client.clone());
    let metrics = Metrics::default();
    for handler in &config.handlers {
        metrics.handler(&handler.name);
    }
    let status = HostStatus::new(&config, metrics.clone(), client.clone());
    let tracker = TaskTracker::new();
    // Stops the endpoint too when start fails below.
    let serving = shutdown.child_token();
    let admin_addr = match (listener, &config.host.metrics_addr) {
        (Some(listener), _) => Some(crate::admin::serve(
            listener,
            status.clone(),
            serving.clone(),
            &tracker,
        )?),
        (None, Some(addr)) => Some(
            crate::admin::spawn(addr, status.clone(), serving.clone(), &tracker)
                .await
                .with_context(|| format!("serving the HTTP endpoint on {addr}"))?,
        ),
        (None, None) => None,
    };
    let started = start_handlers(&config, &js, &client, &metrics, &shutdown, &tracker).await;
    let (context, files) = match started {
        Ok(started) => started,
        Err(err) => {
            serving.cancel();
            return Err(err);
        }
    };
    if let Some(every) = config.host.summary_interval {
        tracker.spawn(crate::summary::run(status.clone(), every, shutdown.clone()));
    }
    // Deployed handlers are spawned on the tracker later; closing only lets `wait` finish
    // once every task is done.
    tracker.close();
    Ok(RunningHost {
        metrics,
        status,
        tracker,
        admin_addr,
        context,
        files,
    })
}

/// What starting a handler takes, kept for as long as the host runs: handlers deployed
/// through NATS start (and restart) with it, and failed ones are tried again with it.
#[derive(Clone)]
pub(crate) struct HostContext {
    pub js: jetstream::Context,
    pub client: Client,
    pub runtime: Runtime,
    pub backend: Arc<dyn Backend>,
    pub metrics: Metrics,
    pub host: HostConfig,
    pub host_id: String,
    pub host_name: String,
    /// Every handler task runs on it, so [`RunningHost::wait`] waits for every drain.
    pub tracker: TaskTracker,
    /// The latest launch of every handler, by name.
    pub running: Arc<std::sync::Mutex<std::collections::BTreeMap<String, Arc<Shared>>>>,
}

/// A handler that runs: its shared state, its own stop token, and its task (which returns
/// once the handler drained).
pub(crate) struct Launched {
    pub shared: Arc<Shared>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl HostContext {
    fn lock_running(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Arc<Shared>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets handler `name` once it stopped for good (undeployed here).
    pub fn forget(&self, name: &str) {
        self.lock_running().remove(name);
    }

    /// Loads `handler`'s module with the handler's grants, settings and limits.
    pub fn load(&self, handler: &HandlerConfig) -> anyhow::Result<HandlerModule> {
        let metrics = self.metrics.handler(&handler.name);
        load(&self.runtime, handler, self.backend.clone(), metrics)
    }

    /// Starts `handler` with its loaded `module`: checks it against the server, binds its
    /// consumer (or partition group), and runs it until `stop`, then drains it.
    pub async fn launch(
        &self,
        handler: &HandlerConfig,
        module: HandlerModule,
        stop: CancellationToken,
    ) -> anyhow::Result<Launched> {
        let metrics = self.metrics.handler(&handler.name);
        let (shared, binding) = prepare(self, module, handler, metrics.clone()).await?;
        let shared = Arc::new(shared);
        self.lock_running()
            .insert(handler.name.clone(), shared.clone());
        let task = self.tracker.spawn(run_handler(
            shared.clone(),
            binding,
            metrics,
            stop.clone(),
            self.host.drain_timeout,
        ));
        Ok(Launched { shared, stop, task })
    }

    /// Loads and launches `handler`.
    async fn start(
        &self,
        handler: &HandlerConfig,
        stop: CancellationToken,
    ) -> anyhow::Result<Launched> {
        let module = self.load(handler)?;
        self.launch(handler, module, stop).await
    }
}

/// Sets up every handler of the file (one attempt each, then per `on_handler_error`), and
/// the follower of deployed handlers when the host watches.
async fn start_handlers(
    config: &Config,
    js: &jetstream::Context,
    client: &Client,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<(HostContext, Vec<(HandlerConfig, Arc<Shared>)>)> {
    for spec in &config.streams {
        ensure_stream(js, spec).await?;
    }
    for spec in &config.buckets {
        ensure_bucket(js, spec).await?;
    }
    let backend = Arc::new(NatsBackend::new(js.clone()));
    if let Err(err) = backend.refresh_streams().await {
        tracing::warn!("{err:#}; every publish subject counts as captured by a stream until the list can be read");
    }
    {
        let (backend, stop) = (backend.clone(), shutdown.clone());
        tracker.spawn(async move { backend.watch_streams(stop).await });
    }
    let (host_id, host_name) = group::host_id(config.host.id.as_deref());
    let context = HostContext {
        js: js.clone(),
        client: client.clone(),
        runtime: Runtime::new(&runtime_config(config))?,
        backend,
        metrics: metrics.clone(),
        host: config.host.clone(),
        host_id,
        host_name,
        tracker: tracker.clone(),
        running: Arc::default(),
    };
    let policy = config.host.on_handler_error;
    let mut files = Vec::new();
    let mut failed = Vec::new();
    for handler in &config.handlers {
        let m = metrics.handler(&handler.name);
        match context.start(handler, shutdown.child_token()).await {
            Ok(launched) => files.push((handler.clone(), launched.shared)),
            Err(err) => {
                let action = match policy {
                    OnHandlerError::Exit => "the host exits (on_handler_error = \"exit\")",
                    OnHandlerError::Retry => "trying again in the background",
                    OnHandlerError::Continue => "the other handlers run without it",
                };
                tracing::error!(handler = %handler.name, "handler not started; {action}: {err:#}");
                m.lifecycle.fail(format!("{err:#}"));
                failed.push((handler, m, format!("{}: {err:#}", handler.name)));
            }
        }
    }
    let reasons: Vec<&str> = failed.iter().map(|(_, _, r)| r.as_str()).collect();
    match policy {
        OnHandlerError::Exit if !failed.is_empty() => {
            bail!("a handler could not start:\n  {}", reasons.join("\n  "))
        }
        OnHandlerError::Continue
            if !failed.is_empty()
                && failed.len() == config.handlers.len()
                && !config.deploy.watch =>
        {
            bail!("no handler could start:\n  {}", reasons.join("\n  "))
        }
        _ => {}
    }
    if policy == OnHandlerError::Retry {
        for (handler, m, _) in failed {
            tracker.spawn(start_handler(
                context.clone(),
                handler.clone(),
                m,
                shutdown.clone(),
            ));
        }
    }
    if config.deploy.watch {
        let names = config.handlers.iter().map(|h| h.name.clone()).collect();
        crate::registry::follow::start(
            context.clone(),
            config.deploy.clone(),
            names,
            shutdown.clone(),
        )
        .await?;
    }
    Ok((context, files))
}

/// Tries to set up a handler that failed to start, with a backoff (1s doubling to 60s, ±20%),
/// until it starts (then it runs) or the host shuts down.
async fn start_handler(
    context: HostContext,
    handler: HandlerConfig,
    metrics: Arc<HandlerMetrics>,
    shutdown: CancellationToken,
) {
    let backoff = RetryPolicy {
        max_attempts: u32::MAX,
        backoff: Backoff::Exponential {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(60),
        },
        jitter: 0.2,
    };
    let mut failures = 1;
    loop {
        let delay = backoff.delay_with(failures, fastrand::f64());
        tokio::select! {
            _ = shutdown.cancelled() => {
                metrics.lifecycle.set(HandlerState::Stopped);
                return;
            }
            _ = tokio::time::sleep(delay) => {}
        }
        metrics.lifecycle.set(HandlerState::Starting);
        match context.start(&handler, shutdown.child_token()).await {
            Ok(_) => {
                tracing::info!(handler = %handler.name, failures, "handler started after all");
                return;
            }
            Err(err) => {
                failures += 1;
                tracing::warn!(
                    handler = %handler.name,
                    failures,
                    "handler still cannot start; trying again later: {err:#}"
                );
                metrics.lifecycle.fail(format!("{err:#}"));
            }
        }
    }
}

/// Loads a handler, checks it against its stream, and binds it (see [`bind`]).
async fn prepare(
    context: &HostContext,
    module: HandlerModule,
    handler: &HandlerConfig,
    metrics: Arc<HandlerMetrics>,
) -> anyhow::Result<(Shared, Binding)> {
    let HostContext {
        js,
        client,
        backend,
        host,
        host_id,
        host_name,
        ..
    } = context;
    if let Some(subject) = &handler.dead_letter {
        js.stream_by_subject(subject).await.map_err(|err| {
            anyhow::anyhow!(
                "dead_letter subject {subject} is not captured by any stream ({err}), so \
                 dead-letter records would not be durable; add a [[stream]] whose subjects \
                 include it"
            )
        })?;
    }
    let stream = js.get_stream(&handler.stream).await.with_context(|| {
        format!(
            "handler {}: stream {} is not available; declare it with [[stream]] in the \
             config or create it",
            handler.name, handler.stream
        )
    })?;
    let stream_config = &stream.cached_info().config;
    crate::config::check_against_stream(handler, &stream_config.subjects)
        .map_err(anyhow::Error::msg)?;
    let replicas = stream_config.num_replicas;
    let attempts = Attempts::open(js, &handler.name, replicas).await;
    let binding = bind(js, host, handler, host_id, host_name).await?;
    let shared = Shared::new(
        module,
        handler.clone(),
        client.clone(),
        js.clone(),
        backend.clone(),
        attempts,
        metrics,
    );
    Ok((shared, binding))
}

pub(crate) fn load(
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

pub(crate) fn runtime_config(config: &Config) -> RuntimeConfig {
    let deploy = &config.deploy;
    RuntimeConfig {
        // Every worker may hold an instance; a little headroom absorbs stores that are
        // still being torn down while the next message starts (and, for deployed handlers,
        // the trial instantiation of a new revision).
        max_instances: config
            .handlers
            .iter()
            .map(|h| h.max_workers as u32)
            .sum::<u32>()
            .saturating_add(if deploy.watch { deploy.instances } else { 0 })
            .saturating_add(4),
        max_memory: config
            .handlers
            .iter()
            .map(|h| h.limits.memory)
            .chain(deploy.watch.then_some(deploy.max_memory))
            .max()
            .unwrap_or(64 << 20),
        epoch_tick: config.host.epoch_tick,
        cache_dir: config.host.cache_dir.clone(),
    }
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
    let shutdown = CancellationToken::new();
    let drain = config.host.drain_timeout;
    let signals = tokio::spawn(crate::signals::watch(shutdown.clone(), drain));
    // Bound before connecting: an address in use fails at once, not after NATS is reached.
    let listener = match &config.host.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on host.metrics_addr {addr}"))?,
        ),
        None => None,
    };
    let client = tokio::select! {
        client = crate::connect::connect(&config.nats) => client?,
        _ = shutdown.cancelled() => {
            tracing::info!("stopped before a connection to NATS was made");
            return Ok(());
        }
    };
    let result = match start_with(config, client.clone(), shutdown.clone(), listener).await {
        Ok(host) => {
            host.wait().await;
            Ok(())
        }
        Err(err) => Err(err),
    };
    signals.abort();
    // Give the connection a moment to write the last confirmed acks out.
    let _ = tokio::time::timeout(Duration::from_secs(5).min(drain), client.flush()).await;
    result
}
