//! The host side of the registry (`[deploy] watch = true`): watch `MR_REGISTRY`, and for every
//! deployed handler this host selects, run its latest revision.
//!
//! One supervisor task per handler applies that handler's revisions one at a time, always
//! the latest (a revision overtaken while it was being prepared is dropped). For a new
//! revision it downloads the module (hash checked), builds the config from the stored table,
//! checks it against this host's `[deploy]` ceiling, compiles and instantiates it once, all
//! while the old revision keeps running; then, by [`super::change::classify`]:
//! - hot swap: `ModuleSlot::swap`; running messages finish on the old module, the next ones
//!   start on the new one;
//! - drain and rebind: the handler's own stop token is cancelled, it drains as on SIGTERM
//!   (partitions released gracefully), and the new revision is launched.
//!
//! A revision that fails any check never replaces the running one: the host logs why, keeps
//! running what it ran, and reports the failure in its `MR_REGISTRY_HOSTS` record (shown by
//! `mailroom ls`). Download and launch failures are retried (with backoff); a module or spec
//! that fails its checks is not, until a newer revision comes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::change::{classify, Kind};
use super::module::{self, ModuleFiles};
use super::{spec, unix_now, HandlerReport, HostRecord, Registry, SpecRecord};
use crate::config::{DeployConfig, HandlerConfig};
use crate::host::{HostContext, Launched};
use crate::runtime::HandlerModule;

/// How often the host record is renewed when nothing changes (it expires after a minute).
const RENEW_EVERY: Duration = Duration::from_secs(15);
/// The longest wait before retrying a download or launch that failed.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How long start-up waits for the handlers deployed before it to run.
const START_WAIT: Duration = Duration::from_secs(120);

/// Starts following the registry: runs the handlers deployed already (returning once each
/// runs or was refused, within two minutes), then keeps watching until `shutdown`.
pub(crate) async fn start(
    ctx: HostContext,
    deploy: DeployConfig,
    file_handlers: Vec<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = Registry::open(&ctx.js, 1).await.context(
        "deploy.watch is on, but the handler registry cannot be opened; check that the \
         account has JetStream",
    )?;
    let files = ModuleFiles::new(ctx.host.cache_dir.as_deref())?;
    let report = Arc::new(Reporter {
        record: Mutex::new(HostRecord {
            name: ctx.host_name.clone(),
            pid: std::process::id(),
            started: unix_now(),
            updated: unix_now(),
            select_handlers: deploy.handlers.clone(),
            select_labels: deploy.labels.clone(),
            file_handlers: file_handlers.clone(),
            handlers: BTreeMap::new(),
        }),
        changed: Notify::new(),
    });
    let follower = Arc::new(Follower {
        ctx: ctx.clone(),
        registry: registry.clone(),
        deploy,
        files,
        file_handlers,
        report: report.clone(),
        reserved: Mutex::new(BTreeMap::new()),
        shutdown: shutdown.clone(),
    });
    ctx.tracker.spawn(write_reports(
        registry.clone(),
        ctx.host_id.clone(),
        report,
        shutdown.clone(),
    ));
    let mut supervisors = Supervisors::default();
    match registry.all().await {
        Ok(records) => {
            let mut settling = Vec::new();
            for record in records {
                let revision = record.revision;
                if let Some(settled) =
                    supervisors.offer(&follower, &record.name.clone(), Some(record))
                {
                    settling.push((revision, settled));
                }
            }
            let all = futures::future::join_all(settling.into_iter().map(
                |(revision, mut settled)| async move {
                    let _ = settled.wait_for(|s| *s >= revision).await;
                },
            ));
            if tokio::time::timeout(START_WAIT, all).await.is_err() {
                tracing::warn!("some deployed handlers are still being prepared; the host starts without waiting for them");
            }
        }
        Err(err) => {
            tracing::warn!("cannot read the deployed handlers yet ({err:#}); watching for them")
        }
    }
    ctx.tracker
        .spawn(watch_registry(follower, supervisors, shutdown));
    Ok(())
}

/// Everything the supervisors share.
struct Follower {
    ctx: HostContext,
    registry: Registry,
    deploy: DeployConfig,
    files: ModuleFiles,
    file_handlers: Vec<String>,
    report: Arc<Reporter>,
    /// `max_workers` of each deployed handler running here (the `deploy.instances` ceiling).
    reserved: Mutex<BTreeMap<String, usize>>,
    shutdown: CancellationToken,
}

/// This host's record, and a wake-up for the task that writes it.
struct Reporter {
    record: Mutex<HostRecord>,
    changed: Notify,
}

impl Reporter {
    fn update(&self, name: &str, change: impl FnOnce(&mut HandlerReport)) {
        {
            let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
            let report = record.handlers.entry(name.to_owned()).or_default();
            change(report);
            report.since = unix_now();
        }
        self.changed.notify_one();
    }
}

/// The supervisors by handler name: where the watch sends each handler's latest revision.
#[derive(Default)]
struct Supervisors {
    desired: HashMap<String, watch::Sender<Option<SpecRecord>>>,
}

impl Supervisors {
    /// Hands `record` (or its absence: deleted, purged) to `name`'s supervisor, starting one
    /// if this host selects it. Returns the supervisor's progress (the last revision it
    /// settled) when one was started.
    fn offer(
        &mut self,
        follower: &Arc<Follower>,
        name: &str,
        record: Option<SpecRecord>,
    ) -> Option<watch::Receiver<u64>> {
        if follower.file_handlers.iter().any(|n| n == name) {
            if let Some(record) = record.filter(SpecRecord::is_live) {
                let reason =
                    format!("this host's file has a handler named {name}, which runs here instead");
                tracing::warn!(
                    handler = name,
                    revision = record.revision,
                    "deployed handler not run: {reason}"
                );
                follower
                    .report
                    .update(name, |r| r.failed = Some((record.revision, reason)));
            }
            return None;
        }
        let wanted = record.filter(|r| r.is_live() && follower.deploy.selects(&r.name, &r.labels));
        if let Some(sender) = self.desired.get(name) {
            sender.send_replace(wanted);
            return None;
        }
        wanted.as_ref()?;
        let (sender, receiver) = watch::channel(wanted);
        let (settled_tx, settled_rx) = watch::channel(0);
        self.desired.insert(name.to_owned(), sender);
        follower.ctx.tracker.spawn(supervise(
            follower.clone(),
            name.to_owned(),
            receiver,
            settled_tx,
        ));
        Some(settled_rx)
    }
}

/// Watches `MR_REGISTRY` until `shutdown`, re-opening the watch when it ends (a server
/// restart): the watch starts with every key's latest value, so nothing is missed.
async fn watch_registry(
    follower: Arc<Follower>,
    mut supervisors: Supervisors,
    shutdown: CancellationToken,
) {
    loop {
        let mut watch = loop {
            match follower.registry.specs.watch_all().await {
                Ok(watch) => break watch,
                Err(err) => {
                    tracing::warn!("cannot watch the handler registry ({err}); retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        loop {
            let entry = tokio::select! {
                entry = watch.next() => entry,
                _ = shutdown.cancelled() => return,
            };
            match entry {
                Some(Ok(entry)) => {
                    let record = match entry.operation {
                        async_nats::jetstream::kv::Operation::Put => {
                            match serde_json::from_slice::<SpecRecord>(&entry.value) {
                                Ok(record) => Some(record),
                                Err(err) => {
                                    tracing::warn!(key = %entry.key, "ignoring an unreadable registry entry: {err}");
                                    continue;
                                }
                            }
                        }
                        _ => None,
                    };
                    supervisors.offer(&follower, &entry.key, record);
                }
                Some(Err(err)) => tracing::debug!("registry watch: {err}"),
                None => break,
            }
        }
        tracing::info!("the handler registry watch ended; watching again");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// What a supervisor does next (pure).
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Nothing: it runs what it should, or refused it for good.
    Idle,
    /// Stop the running revision (undeployed, or no longer selected).
    Stop,
    /// Prepare and apply the wanted revision.
    Apply,
}

fn step(running: Option<u64>, refused: Option<u64>, wanted: Option<u64>) -> Step {
    match wanted {
        None if running.is_some() => Step::Stop,
        None => Step::Idle,
        Some(w) if Some(w) == running || Some(w) == refused => Step::Idle,
        Some(_) => Step::Apply,
    }
}

/// The revision a handler runs here.
struct Active {
    record: SpecRecord,
    config: HandlerConfig,
    launched: Launched,
}

/// Why a revision is not running.
struct Failed {
    /// Retrying cannot help (the module or spec fails a check).
    permanent: bool,
    error: String,
}

impl Failed {
    fn permanent(err: impl std::fmt::Display) -> Failed {
        Failed {
            permanent: true,
            error: err.to_string(),
        }
    }

    fn transient(err: impl std::fmt::Display) -> Failed {
        Failed {
            permanent: false,
            error: err.to_string(),
        }
    }
}

/// Runs the latest revision of handler `name` that `wanted` says, until `shutdown`.
async fn supervise(
    f: Arc<Follower>,
    name: String,
    mut wanted: watch::Receiver<Option<SpecRecord>>,
    settled: watch::Sender<u64>,
) {
    let mut active: Option<Active> = None;
    let mut refused: Option<u64> = None;
    let mut retry = Duration::from_secs(1);
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let want = wanted.borrow_and_update().clone();
        let running = active.as_ref().map(|a| a.record.revision);
        match step(running, refused, want.as_ref().map(|r| r.revision)) {
            Step::Idle => {}
            Step::Stop => {
                if let Some(a) = active.take() {
                    tracing::info!(handler = %name, revision = a.record.revision, "deployed handler undeployed here: draining it");
                    stop(&f, &name, a).await;
                    f.ctx.forget(&name);
                }
                f.report.update(&name, |r| {
                    r.running = None;
                    r.module = None;
                    r.preparing = None;
                });
                settled.send_replace(u64::MAX);
            }
            Step::Apply => {
                let Some(record) = want else {
                    // `step` applies only a wanted revision.
                    continue;
                };
                let revision = record.revision;
                f.report.update(&name, |r| r.preparing = Some(revision));
                let outcome = tokio::select! {
                    outcome = apply(&f, &name, record, &mut active, &wanted) => outcome,
                    _ = f.shutdown.cancelled() => break,
                };
                retry_at = None;
                match outcome {
                    Ok(()) => {
                        retry = Duration::from_secs(1);
                        refused = None;
                        f.report.update(&name, |r| {
                            r.preparing = None;
                            r.running = active.as_ref().map(|a| a.record.revision);
                            r.module = active.as_ref().map(|a| a.record.module.sha256.clone());
                            if r.failed.as_ref().is_some_and(|(rev, _)| *rev <= revision) {
                                r.failed = None;
                            }
                        });
                    }
                    Err(failed) => {
                        let still = active.as_ref().map(|a| a.record.revision);
                        if failed.permanent {
                            refused = Some(revision);
                            tracing::error!(
                                handler = %name,
                                revision,
                                running = ?still,
                                "deployed revision REFUSED, the running one stays: {}",
                                failed.error
                            );
                        } else {
                            tracing::warn!(
                                handler = %name,
                                revision,
                                "deployed revision not running yet ({}); retrying in {retry:?}",
                                failed.error
                            );
                            retry_at = Some(tokio::time::Instant::now() + retry);
                            retry = (retry * 2).min(MAX_RETRY);
                        }
                        f.report.update(&name, |r| {
                            r.preparing = None;
                            r.running = still;
                            r.failed = Some((revision, failed.error));
                        });
                    }
                }
                settled.send_replace(revision);
            }
        }
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { break },
            _ = sleep_until_some(retry_at), if retry_at.is_some() => {
                retry_at = None;
            }
            _ = f.shutdown.cancelled() => break,
        }
    }
    // The host is stopping: the handler's stop token is a child of the host's, so it is
    // draining already; wait for it, so that the host's wait covers it.
    if let Some(a) = active {
        let _ = a.launched.task.await;
    }
}

/// Sleeps until `at`; never returns without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Prepares `record` while the running revision keeps running, then applies it.
async fn apply(
    f: &Follower,
    name: &str,
    record: SpecRecord,
    active: &mut Option<Active>,
    wanted: &watch::Receiver<Option<SpecRecord>>,
) -> Result<(), Failed> {
    let (config, module) = prepare(f, name, &record).await?;
    let overtaken = wanted.borrow().as_ref().map(|r| r.revision) != Some(record.revision);
    if overtaken {
        // A newer revision (or an undeploy) came while this one was prepared: the loop
        // takes that one next; this one never runs.
        return Ok(());
    }
    let Some(current) = active.as_mut() else {
        let launched = launch(f, name, &config, module).await?;
        tracing::info!(handler = name, revision = record.revision, module = %record.module.short(), "deployed handler runs");
        *active = Some(Active {
            record,
            config,
            launched,
        });
        return Ok(());
    };
    let change = classify(
        Some((&current.config, &current.record.module)),
        (&config, &record.module),
    );
    match change.kind {
        Kind::Unchanged | Kind::New => {}
        Kind::HotSwap => {
            let version = current.launched.shared.module.swap(module);
            tracing::info!(
                handler = name,
                from = current.record.revision,
                to = record.revision,
                swap = version,
                "deployed revision swapped in: {change}"
            );
        }
        Kind::Rebind => {
            tracing::info!(
                handler = name,
                from = current.record.revision,
                to = record.revision,
                "deployed revision needs {change}: draining the running one first"
            );
            if let Some(old) = active.take() {
                stop(f, name, old).await;
            }
            let launched = launch(f, name, &config, module).await?;
            *active = Some(Active {
                record,
                config,
                launched,
            });
            return Ok(());
        }
    }
    current.record = record;
    current.config = config;
    Ok(())
}

/// Downloads, converts, checks against the ceiling, compiles and instantiates once.
async fn prepare(
    f: &Follower,
    name: &str,
    record: &SpecRecord,
) -> Result<(HandlerConfig, HandlerModule), Failed> {
    let path = match f.files.existing(&record.module) {
        Some(path) => path,
        None => {
            let bytes = f
                .registry
                .download(&record.module)
                .await
                .map_err(|e| Failed::transient(format!("{e:#}")))?;
            f.files
                .write(&record.module, &bytes)
                .map_err(|e| Failed::transient(format!("{e:#}")))?
        }
    };
    let config = spec::config_of(name, &record.handler, path)
        .map_err(|e| Failed::permanent(format!("{e:#}")))?;
    let others: usize = {
        let reserved = f.reserved.lock().unwrap_or_else(|p| p.into_inner());
        reserved
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, w)| w)
            .sum()
    };
    f.deploy
        .admits(&config, others)
        .map_err(Failed::permanent)?;
    let metrics = f.ctx.metrics.handler(name);
    let module = module::check(&f.ctx.runtime, &config, f.ctx.backend.clone(), metrics)
        .await
        .map_err(|e| Failed::permanent(format!("{e:#}")))?;
    Ok((config, module))
}

async fn launch(
    f: &Follower,
    name: &str,
    config: &HandlerConfig,
    module: HandlerModule,
) -> Result<Launched, Failed> {
    let launched = f
        .ctx
        .launch(config, module, f.shutdown.child_token())
        .await
        .map_err(|e| Failed::transient(format!("{e:#}")))?;
    f.reserved
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_owned(), config.max_workers);
    Ok(launched)
}

/// Drains a running revision and waits until it stopped.
async fn stop(f: &Follower, name: &str, active: Active) {
    active.launched.stop.cancel();
    let _ = active.launched.task.await;
    f.reserved
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
}

/// Writes this host's record whenever it changes and every [`RENEW_EVERY`]; removes it at
/// shutdown.
async fn write_reports(
    registry: Registry,
    id: String,
    report: Arc<Reporter>,
    shutdown: CancellationToken,
) {
    loop {
        let record = {
            let mut record = report.record.lock().unwrap_or_else(|p| p.into_inner());
            record.updated = unix_now();
            record.clone()
        };
        if let Err(err) = registry.put_host(&id, &record).await {
            tracing::debug!("host record not written: {err:#}");
        }
        tokio::select! {
            _ = report.changed.notified() => {}
            _ = tokio::time::sleep(RENEW_EVERY) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    registry.delete_host(&id).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps() {
        assert_eq!(step(None, None, None), Step::Idle);
        assert_eq!(step(Some(1), None, None), Step::Stop);
        assert_eq!(step(None, None, Some(1)), Step::Apply);
        assert_eq!(step(Some(1), None, Some(1)), Step::Idle);
        assert_eq!(step(Some(1), None, Some(2)), Step::Apply);
        assert_eq!(
            step(Some(1), Some(2), Some(2)),
            Step::Idle,
            "refused for good"
        );
        assert_eq!(step(Some(1), Some(2), Some(3)), Step::Apply);
        assert_eq!(
            step(Some(3), None, Some(2)),
            Step::Apply,
            "a lower number is still the latest"
        );
    }
}
