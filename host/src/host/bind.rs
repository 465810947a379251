//! How a handler's messages reach this host: its durable consumer, or its partition group
//! (after the generations of an earlier partition count still to drain); and the task that
//! runs a bound handler until it stops.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::config::{HandlerConfig, HostConfig};
use crate::consumer::{self, Intake, Shared};
use crate::group::{self, store::GroupStore, GroupSpec};
use crate::health::HandlerState;
use crate::telemetry::HandlerMetrics;

/// How a handler's messages reach this host.
// One per handler, made once and moved into its task: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Binding {
    /// The handler's durable consumer, shared by every host (with the group bucket where this
    /// host registers its presence, for an ordered handler).
    Durable(Option<Box<(GroupStore, String, String)>>),
    /// A partitioned consumer group, after the previous generations still to drain (a
    /// change of the partition count; see `group::generation`).
    Partitioned(Vec<(GroupStore, GroupSpec)>),
    /// The partition count changed while hosts still run the previous one: the switch waits
    /// until they leave or restart with the new count (see `group::generation::blockers`).
    Waiting(Box<Rebind>),
}

/// What binding again takes, and who is waited for.
pub(super) struct Rebind {
    host: HostConfig,
    host_id: String,
    host_name: String,
    blockers: Vec<String>,
}

impl Rebind {
    /// Waits until nobody blocks the switch, then binds; `None` on shutdown first.
    async fn wait(self, shared: &Shared, shutdown: &CancellationToken) -> Option<Binding> {
        let handler = &shared.config;
        let partitions = handler.partitions?;
        let mut blockers = self.blockers;
        let mut warned: Option<std::time::Instant> = None;
        loop {
            if !blockers.is_empty() && warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                warned = Some(std::time::Instant::now());
                tracing::warn!(
                    handler = %handler.name,
                    "the partition count changed to {partitions}, but {} still run(s) the \
                     previous count; this host waits for them to stop or restart with \
                     partitions = {partitions} before switching (each message runs in exactly \
                     one generation), and runs nothing of this handler meanwhile",
                    blockers.join(", ")
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if !blockers.is_empty() {
                match group::generation::blockers(
                    &shared.js,
                    handler,
                    partitions,
                    self.host.lease_ttl,
                )
                .await
                {
                    Ok(now) => blockers = now,
                    Err(err) => {
                        tracing::debug!(handler = %handler.name, "checking the hosts of the previous partition count: {err:#}")
                    }
                }
                continue;
            }
            match bind(
                &shared.js,
                &self.host,
                handler,
                &self.host_id,
                &self.host_name,
            )
            .await
            {
                Ok(Binding::Waiting(again)) => blockers = again.blockers,
                Ok(binding) => {
                    tracing::info!(handler = %handler.name, "no host runs the previous partition count any more: switching to {partitions}");
                    return Some(binding);
                }
                Err(err) => {
                    tracing::warn!(handler = %handler.name, "binding the new partition count failed; trying again: {err:#}")
                }
            }
        }
    }
}

const WARN_EVERY: Duration = Duration::from_secs(30);

/// Runs a set-up handler until `shutdown`, then drains it, keeping its lifecycle state.
pub(super) async fn run_handler(
    shared: Arc<Shared>,
    binding: Binding,
    metrics: Arc<HandlerMetrics>,
    shutdown: CancellationToken,
    drain_timeout: Duration,
) {
    let config = &shared.config;
    tracing::info!(
        handler = %config.name,
        stream = %config.stream,
        consumer = %match &binding {
            Binding::Durable(_) => config.consumer.clone(),
            Binding::Partitioned(generations) => generations
                .last()
                .map(|(_, spec)| format!("{} partitions of {}", spec.partitions, spec.work_stream))
                .unwrap_or_default(),
            Binding::Waiting(_) => "waiting to switch the partition count".to_owned(),
        },
        ordering = %config.ordering,
        workers = %format!("{}..={}", config.min_workers, config.max_workers),
        "handler started"
    );
    metrics.lifecycle.set(HandlerState::Running);
    let intake = Intake::start(shared);
    // The state turns to draining as soon as shutdown starts (partitions are released then).
    let draining = {
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            metrics.lifecycle.set(HandlerState::Draining);
        })
    };
    let binding = match binding {
        Binding::Waiting(rebind) => rebind
            .wait(intake.shared(), &shutdown)
            .await
            .unwrap_or(Binding::Partitioned(Vec::new())),
        binding => binding,
    };
    match binding {
        Binding::Waiting(_) => {}
        Binding::Durable(presence) => {
            let stop = CancellationToken::new();
            let present = presence.map(|presence| {
                let (store, id, name) = *presence;
                let shared = intake.shared();
                let (handler, ordered) =
                    (shared.name.to_string(), shared.config.ordering.is_ordered());
                tokio::spawn(group::presence::run(
                    store,
                    handler,
                    ordered,
                    id,
                    name,
                    stop.clone(),
                ))
            });
            intake.run_durable(&shutdown).await;
            stop.cancel();
            if let Some(task) = present {
                let _ = task.await;
            }
        }
        Binding::Partitioned(generations) => {
            for (store, spec) in generations {
                if shutdown.is_cancelled() {
                    break;
                }
                let (old, stream) = (spec.cutover.is_some(), spec.work_stream.clone());
                intake.forget_settled();
                group::run(&intake, store, spec, &shutdown).await;
                if old && !shutdown.is_cancelled() {
                    // Drained: nothing is left in it (the group checked), and nobody else
                    // needs it any more.
                    let _ = intake.shared().js.delete_stream(&*stream).await;
                }
            }
        }
    }
    intake.drain(drain_timeout).await;
    draining.abort();
    metrics.lifecycle.set(HandlerState::Stopped);
}

/// Makes sure the handler's consumer (or its partition work stream and lease bucket) exists.
pub(super) async fn bind(
    js: &jetstream::Context,
    host: &HostConfig,
    handler: &HandlerConfig,
    host_id: &str,
    host_name: &str,
) -> anyhow::Result<Binding> {
    let Some(partitions) = handler.partitions else {
        consumer::ensure_consumer(js, handler).await?;
        // Registered for `mailroom status`, and so that another host on an ordered handler is
        // noticed (and warned of).
        let presence = GroupStore::open(js, &handler.name, "d", host.lease_ttl, 1)
            .await
            .map_err(
                |err| tracing::debug!(handler = %handler.name, "no presence registration: {err:#}"),
            )
            .ok()
            .map(|store| Box::new((store, host_id.to_owned(), host_name.to_owned())));
        return Ok(Binding::Durable(presence));
    };
    let version = js.client().server_info().version;
    if !server_at_least(&version, 2, 11) {
        bail!(
            "handler {}: partitions need nats-server 2.11 or newer (KV limit markers, subject \
             transforms on sources); this server is {version}",
            handler.name
        );
    }
    let blockers = group::generation::blockers(js, handler, partitions, host.lease_ttl).await?;
    if !blockers.is_empty() {
        return Ok(Binding::Waiting(Box::new(Rebind {
            host: host.clone(),
            host_id: host_id.to_owned(),
            host_name: host_name.to_owned(),
            blockers,
        })));
    }
    let (old, work_stream) = group::generation::prepare(js, handler, partitions).await?;
    let replicas = js
        .get_stream(&handler.stream)
        .await?
        .info()
        .await?
        .config
        .num_replicas;
    let mut generations = Vec::new();
    let spec = |partitions, work_stream: String, cutover| GroupSpec {
        partitions,
        configured: handler.partitions.unwrap_or(partitions),
        work_stream: work_stream.into(),
        host_id: host_id.to_owned(),
        host_name: host_name.to_owned(),
        drain_timeout: host.drain_timeout,
        cutover,
    };
    for gen in old {
        let store = GroupStore::open(
            js,
            &handler.name,
            &group::generation(gen.partitions),
            host.lease_ttl,
            replicas,
        )
        .await?;
        generations.push((store, spec(gen.partitions, gen.stream, Some(gen.cutover))));
    }
    let store = GroupStore::open(
        js,
        &handler.name,
        &group::generation(partitions),
        host.lease_ttl,
        replicas,
    )
    .await?;
    generations.push((store, spec(partitions, work_stream, None)));
    Ok(Binding::Partitioned(generations))
}

/// Whether a server version string (`2.11.3`, `v2.12.0-beta`) is at least `major.minor`.
pub(crate) fn server_at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}
