//! The client side of the registry: `mailroom deploy`, `rollback`, `undeploy`, `ls`,
//! `history`, and waiting until the fleet runs a revision.
//!
//! Every command decides what it will do before it writes, says it (through `say`), then
//! writes one new revision with a compare-and-set, so two concurrent commands on one handler
//! cannot both succeed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use futures::StreamExt as _;

use super::change::{classify, Change, Kind};
use super::store::Latest;
use super::view::size;
use super::{spec, ModuleRef, Origin, Registry, SpecRecord};
use crate::capabilities::{Backend, MemoryBackend};
use crate::config::HandlerConfig;
use crate::runtime::{Runtime, RuntimeConfig};

/// What to deploy.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// The handler's name.
    pub name: String,
    /// The component file.
    pub module: PathBuf,
    /// A file with the `[[handler]]` table.
    pub handler_config: Option<PathBuf>,
    /// `--set key=value`, applied after the file.
    pub sets: Vec<(String, String)>,
    /// `--label key=value`.
    pub labels: BTreeMap<String, String>,
    /// The compile cache for the local check.
    pub cache_dir: Option<PathBuf>,
}

/// A deploy checked locally, ready to be written.
#[derive(Debug, Clone)]
pub struct Checked {
    name: String,
    table: toml::Table,
    config: HandlerConfig,
    bytes: Arc<Vec<u8>>,
    module: ModuleRef,
    labels: BTreeMap<String, String>,
    /// What the check found worth saying.
    pub notes: Vec<String>,
}

/// A revision written (or, when unchanged, the current one).
#[derive(Debug, Clone)]
pub struct Deployed {
    /// The handler.
    pub name: String,
    /// Its revision now.
    pub revision: u64,
    /// What kind of change it was.
    pub change: Change,
    /// Its module.
    pub module: ModuleRef,
    /// Whether the module had to be uploaded (it was not stored yet).
    pub uploaded: bool,
}

/// Builds the handler table, validates it as a host's config, and checks the module exactly
/// as a host does (compile, link, one instantiation). Needs no server.
pub async fn check(request: &DeployRequest) -> anyhow::Result<Checked> {
    let name = &request.name;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("handler name {name:?} is not valid: use 1 to 64 letters, digits, '-' or '_'");
    }
    for (k, v) in &request.labels {
        crate::config::check_label(k, v).map_err(anyhow::Error::msg)?;
    }
    let (table, notes) = spec::build_table(name, request.handler_config.as_deref(), &request.sets)?;
    let module_path = std::path::absolute(&request.module).unwrap_or(request.module.clone());
    let config = crate::config::handler_from_table(name, table.clone(), module_path)
        .context("the handler spec is not valid")?;
    let bytes = std::fs::read(&request.module).with_context(|| {
        format!(
            "cannot read module {}: build the handler first, or fix the path",
            request.module.display()
        )
    })?;
    let runtime = Runtime::new(&RuntimeConfig {
        max_instances: 4,
        max_memory: config.limits.memory.max(64 << 20),
        cache_dir: request.cache_dir.clone(),
        ..RuntimeConfig::default()
    })?;
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new(1 << 20));
    super::module::check(&runtime, &config, backend, Arc::default())
        .await
        .with_context(|| format!("module {} cannot be deployed", request.module.display()))?;
    let module = ModuleRef::of(&bytes);
    Ok(Checked {
        name: name.clone(),
        table,
        config,
        bytes: Arc::new(bytes),
        module,
        labels: request.labels.clone(),
        notes,
    })
}

/// Writes a checked deploy as the handler's next revision: says what kind of change it is,
/// uploads the module unless it is stored already, then writes the spec.
pub async fn deploy(
    registry: &Registry,
    checked: &Checked,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<Deployed> {
    let name = &checked.name;
    let latest = registry.latest(name).await?;
    let current = live_record(&latest);
    let change = change_from(
        name,
        current,
        &checked.config,
        &checked.module,
        &checked.labels,
    )?;
    if change.kind == Kind::Unchanged {
        let revision = current.map_or(0, |r| r.revision);
        say(format!(
            "{name}: revision {revision} already runs this module and spec; nothing deployed"
        ));
        return Ok(Deployed {
            name: name.clone(),
            revision,
            change,
            module: checked.module.clone(),
            uploaded: false,
        });
    }
    let revision = next_revision(&latest);
    say(format!("{name}: revision {revision} will be {change}"));
    let (module, uploaded) = registry.upload(&checked.bytes).await?;
    say(if uploaded {
        format!(
            "uploaded module sha256:{} ({}) to {}",
            module.short(),
            size(module.size),
            super::MODULES
        )
    } else {
        format!(
            "module sha256:{} is stored already; not uploaded again",
            module.short()
        )
    });
    let record = SpecRecord {
        name: name.clone(),
        revision,
        handler: spec::render(&checked.table)?,
        module: module.clone(),
        labels: checked.labels.clone(),
        deployed_at: super::unix_now(),
        deployed_by: deployed_by(),
        origin: Origin::Deploy,
    };
    registry
        .write(name, &record, latest.map(|l| l.kv_revision))
        .await?;
    say(format!("deployed {name} revision {revision}"));
    Ok(Deployed {
        name: name.clone(),
        revision,
        change,
        module,
        uploaded,
    })
}

/// Writes a copy of an earlier revision (`to`, or else the one before the latest) as the
/// next revision.
pub async fn rollback(
    registry: &Registry,
    name: &str,
    to: Option<u64>,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<Deployed> {
    let history = registry.history(name).await?;
    let Some(latest_record) = history.last() else {
        bail!("{name} was never deployed (or was purged); nothing to roll back to");
    };
    let target = match to {
        Some(to) => history.iter().find(|r| r.revision == to).ok_or_else(|| {
            anyhow::anyhow!(
                "{name} has no revision {to} any more; the registry keeps the last {} \
                 revisions of each handler: {}",
                super::HISTORY,
                history
                    .iter()
                    .map(|r| r.revision.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None => history
            .iter()
            .rev()
            .skip(1)
            .find(|r| r.is_live())
            .ok_or_else(|| {
                anyhow::anyhow!("{name} has no earlier revision to roll back to; use --to")
            })?,
    };
    if !target.is_live() {
        bail!(
            "revision {} of {name} is an undeploy; roll back to a revision that ran",
            target.revision
        );
    }
    if !registry.has_module(&target.module).await {
        bail!(
            "revision {} of {name} needs module sha256:{}, which is no longer in {}",
            target.revision,
            target.module.short(),
            super::MODULES
        );
    }
    let latest = registry.latest(name).await?;
    let current = live_record(&latest).filter(|_| latest_record.is_live());
    let target_config = spec::config_of(name, &target.handler, PathBuf::new())?;
    let change = change_from(
        name,
        current,
        &target_config,
        &target.module,
        &target.labels,
    )?;
    let revision = next_revision(&latest);
    say(format!(
        "{name}: revision {revision} (a copy of revision {}) will be {change}",
        target.revision
    ));
    let record = SpecRecord {
        revision,
        deployed_at: super::unix_now(),
        deployed_by: deployed_by(),
        origin: Origin::Rollback {
            to: target.revision,
        },
        ..target.clone()
    };
    registry
        .write(name, &record, latest.map(|l| l.kv_revision))
        .await?;
    say(format!(
        "rolled {name} back to revision {} as revision {revision}",
        target.revision
    ));
    Ok(Deployed {
        name: name.to_owned(),
        revision,
        change,
        module: record.module,
        uploaded: false,
    })
}

/// Writes an undeploy revision: hosts drain the handler and stop it. Its consumer and data
/// stay; see [`purge`].
pub async fn undeploy(
    registry: &Registry,
    name: &str,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<u64> {
    let latest = registry.latest(name).await?;
    let Some(current) = live_record(&latest) else {
        bail!("{name} is not deployed; `mailroom ls` lists what is");
    };
    let revision = next_revision(&latest);
    say(format!(
        "{name}: revision {revision} undeploys it: hosts drain it and stop it"
    ));
    let record = SpecRecord {
        revision,
        deployed_at: super::unix_now(),
        deployed_by: deployed_by(),
        origin: Origin::Undeploy,
        ..current.clone()
    };
    registry
        .write(name, &record, latest.map(|l| l.kv_revision))
        .await?;
    say(format!("undeployed {name} (revision {revision})"));
    Ok(revision)
}

/// After an undeploy: deletes the handler's consumer (or partition work streams) and its
/// registry history. Its module objects stay (other revisions may share them).
pub async fn purge(
    js: &jetstream::Context,
    registry: &Registry,
    name: &str,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<()> {
    let history = registry.history(name).await?;
    let Some(last) = history.last() else {
        bail!("{name} has no history to purge");
    };
    if last.is_live() {
        bail!("{name} is deployed; undeploy it before purging it");
    }
    let config = spec::config_of(name, &last.handler, PathBuf::new())?;
    if let Ok(stream) = js.get_stream(&config.stream).await {
        if stream.delete_consumer(&config.consumer).await.is_ok() {
            say(format!(
                "deleted consumer {} of stream {}",
                config.consumer, config.stream
            ));
        }
    }
    let prefix = format!("MR_{name}_P");
    let mut names = js.stream_names();
    let mut work_streams = Vec::new();
    while let Some(stream) = names.next().await {
        let stream = stream.context("listing streams")?;
        if stream
            .strip_prefix(&prefix)
            .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            work_streams.push(stream);
        }
    }
    for stream in work_streams {
        js.delete_stream(&stream)
            .await
            .with_context(|| format!("deleting work stream {stream}"))?;
        say(format!("deleted partition work stream {stream}"));
    }
    registry
        .specs
        .purge(name)
        .await
        .with_context(|| format!("purging {name} from {}", super::SPECS))?;
    say(format!("purged {name}'s revisions from {}", super::SPECS));
    Ok(())
}

fn live_record(latest: &Option<Latest>) -> Option<&SpecRecord> {
    latest
        .as_ref()
        .and_then(|l| l.record.as_ref())
        .filter(|r| r.is_live())
}

fn next_revision(latest: &Option<Latest>) -> u64 {
    latest
        .as_ref()
        .and_then(|l| l.record.as_ref())
        .map_or(1, |r| r.revision + 1)
}

fn change_from(
    name: &str,
    current: Option<&SpecRecord>,
    config: &HandlerConfig,
    module: &ModuleRef,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<Change> {
    let old = match current {
        Some(record) => Some((
            spec::config_of(name, &record.handler, config.module.clone())?,
            record,
        )),
        None => None,
    };
    let mut change = classify(old.as_ref().map(|(c, r)| (c, &r.module)), (config, module));
    if let Some((_, record)) = &old {
        if &record.labels != labels {
            change.what.push("labels".to_owned());
            if change.kind == Kind::Unchanged {
                change.kind = Kind::HotSwap;
            }
        }
    }
    Ok(change)
}

fn deployed_by() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "someone".to_owned());
    let (_, machine) = crate::group::host_id(None);
    format!("{user}@{machine}")
}
