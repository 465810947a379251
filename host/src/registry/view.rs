//! What the registry looks like from outside: `mailroom ls` (handlers and what each host
//! runs), `mailroom history`, and waiting until every host that should run a revision does.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::bail;
use futures::StreamExt as _;
use serde::Serialize;

use super::{HandlerReport, HostRecord, Origin, Registry, SpecRecord};
use crate::config::DeployConfig;

/// `mailroom ls`: every deployed handler and what each host runs.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Per handler, by name.
    pub handlers: Vec<Listed>,
}

/// One handler of a [`Listing`].
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// Its latest revision.
    pub spec: SpecRecord,
    /// The hosts that report it.
    pub hosts: Vec<HostView>,
}

/// One host's state of one handler.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    /// The host's id.
    pub id: String,
    /// Its report.
    pub report: HandlerReport,
}

/// Reads every handler's latest revision and every live host's report.
pub async fn list(registry: &Registry) -> anyhow::Result<Listing> {
    let specs = registry.all().await?;
    let hosts = registry.host_records().await?;
    let handlers = specs
        .into_iter()
        .map(|spec| {
            let hosts = hosts
                .iter()
                .filter_map(|(id, host)| {
                    host.handlers.get(&spec.name).map(|report| HostView {
                        id: id.clone(),
                        report: report.clone(),
                    })
                })
                .collect();
            Listed { spec, hosts }
        })
        .collect();
    Ok(Listing { handlers })
}

impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.handlers.is_empty() {
            return write!(
                f,
                "no handlers deployed (deploy one with `mailroom deploy`)"
            );
        }
        writeln!(
            f,
            "{:<20} {:>8}  {:<12}  {:>9}  deployed",
            "handler", "revision", "module", "size"
        )?;
        for (i, listed) in self.handlers.iter().enumerate() {
            let s = &listed.spec;
            write!(
                f,
                "{:<20} {:>8}  {:<12}  {:>9}  {} by {}",
                s.name,
                s.revision,
                s.module.short(),
                size(s.module.size),
                when(s.deployed_at),
                s.deployed_by
            )?;
            match s.origin {
                Origin::Deploy => {}
                Origin::Rollback { to } => write!(f, " (rollback to {to})")?,
                Origin::Undeploy => write!(f, " (UNDEPLOYED)")?,
            }
            if listed.hosts.is_empty() {
                write!(f, "\n    no host reports it")?;
            }
            for host in &listed.hosts {
                write!(f, "\n    {:<28} {}", host.id, describe(&host.report))?;
            }
            if i + 1 < self.handlers.len() {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

/// One host's report in words: `runs 3`, `runs 2; revision 3 refused: …`.
pub fn describe(report: &HandlerReport) -> String {
    let mut text = match report.running {
        Some(revision) => format!("runs {revision}"),
        None => "runs nothing".to_owned(),
    };
    if let Some(revision) = report.preparing {
        text.push_str(&format!("; preparing {revision}"));
    }
    if let Some((revision, error)) = &report.failed {
        text.push_str(&format!("; revision {revision} FAILED: {error}"));
    }
    text
}

/// `mailroom history NAME`: the revisions kept, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct History {
    /// The handler.
    pub name: String,
    /// Its revisions.
    pub revisions: Vec<SpecRecord>,
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.revisions.is_empty() {
            return write!(f, "{} was never deployed (or was purged)", self.name);
        }
        write!(
            f,
            "{}: {} revisions kept (the latest is current)",
            self.name,
            self.revisions.len()
        )?;
        for r in &self.revisions {
            let origin = match r.origin {
                Origin::Deploy => "deploy".to_owned(),
                Origin::Rollback { to } => format!("rollback to {to}"),
                Origin::Undeploy => "undeploy".to_owned(),
            };
            write!(
                f,
                "\n  {:>4}  {}  {:<16} {}  {:>9}  {}",
                r.revision,
                when(r.deployed_at),
                origin,
                r.module.short(),
                size(r.module.size),
                r.deployed_by
            )?;
        }
        Ok(())
    }
}

/// Reads `name`'s history.
pub async fn history(registry: &Registry, name: &str) -> anyhow::Result<History> {
    Ok(History {
        name: name.to_owned(),
        revisions: registry.history(name).await?,
    })
}

/// Where every host that should run a revision got to.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// From the start of the wait until the last host got there.
    pub elapsed: Duration,
    /// Per host: its id and what it does with the revision (`runs 3`, `… FAILED: …`).
    pub hosts: Vec<(String, String)>,
    /// The hosts that refused the revision.
    pub refused: Vec<String>,
}

impl fmt::Display for Rollout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hosts.is_empty() {
            return write!(f, "no watching host selects it");
        }
        write!(
            f,
            "every host got there {} after the revision was written:",
            humantime::format_duration(Duration::from_millis(self.elapsed.as_millis() as u64))
        )?;
        for (host, state) in &self.hosts {
            write!(f, "\n    {host:<28} {state}")?;
        }
        Ok(())
    }
}

/// Waits until every live host that selects `spec` runs it (or, for an undeploy, runs
/// nothing of it), or reports that it cannot. Fails after `within`, naming the hosts that
/// are not there yet.
pub async fn wait_for_rollout(
    registry: &Registry,
    spec: &SpecRecord,
    within: Duration,
) -> anyhow::Result<Rollout> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + within;
    let mut hosts: BTreeMap<String, HostRecord> =
        registry.host_records().await?.into_iter().collect();
    let mut watch = registry.hosts.watch_all().await.ok();
    loop {
        let (done, waiting) = progress(&hosts, spec);
        if waiting.is_empty() {
            let refused = hosts
                .iter()
                .filter(|(id, host)| {
                    done.iter().any(|(d, _)| d == *id)
                        && (host.file_handlers.contains(&spec.name)
                            || host.handlers.get(&spec.name).is_some_and(|r| {
                                r.failed
                                    .as_ref()
                                    .is_some_and(|(rev, _)| *rev == spec.revision)
                            }))
                })
                .map(|(id, _)| id.clone())
                .collect();
            return Ok(Rollout {
                elapsed: start.elapsed(),
                hosts: done,
                refused,
            });
        }
        let next = async {
            match watch.as_mut() {
                Some(w) => w.next().await,
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    None
                }
            }
        };
        match tokio::time::timeout_at(deadline, next).await {
            Err(_) => bail!(
                "not every host runs revision {} of {} after {:?}: still waiting for {}",
                spec.revision,
                spec.name,
                within,
                waiting.join(", ")
            ),
            Ok(Some(Ok(entry))) => match entry.operation {
                async_nats::jetstream::kv::Operation::Put => {
                    if let Ok(record) = serde_json::from_slice(&entry.value) {
                        hosts.insert(entry.key, record);
                    }
                }
                _ => {
                    hosts.remove(&entry.key);
                }
            },
            Ok(Some(Err(_))) => {}
            Ok(None) => {
                // No watch (or it ended): read everything again.
                watch = registry.hosts.watch_all().await.ok();
                hosts = registry.host_records().await?.into_iter().collect();
            }
        }
    }
}

/// Hosts that are done with `spec` (and how) and those still waited for.
fn progress(
    hosts: &BTreeMap<String, HostRecord>,
    spec: &SpecRecord,
) -> (Vec<(String, String)>, Vec<String>) {
    let (mut done, mut waiting) = (Vec::new(), Vec::new());
    for (id, host) in hosts {
        if !selects(host, spec) {
            continue;
        }
        let report = host.handlers.get(&spec.name);
        let there = match report {
            _ if host.file_handlers.contains(&spec.name) => true,
            None => !spec.is_live(),
            Some(r) if !spec.is_live() => r.running.is_none(),
            Some(r) => {
                r.running == Some(spec.revision)
                    || r.failed
                        .as_ref()
                        .is_some_and(|(rev, _)| *rev == spec.revision)
            }
        };
        if there {
            done.push((
                id.clone(),
                report.map_or("runs nothing".to_owned(), describe),
            ));
        } else {
            waiting.push(id.clone());
        }
    }
    (done, waiting)
}

/// Whether `host` runs `spec`'s handler (by its selector).
pub fn selects(host: &HostRecord, spec: &SpecRecord) -> bool {
    let selector = DeployConfig {
        watch: true,
        handlers: host.select_handlers.clone(),
        labels: host.select_labels.clone(),
        ..DeployConfig::default()
    };
    selector.selects(&spec.name, &spec.labels)
}

/// Bytes for people: `812 B`, `2.7 MiB`.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b < 1024 => format!("{b} B"),
        b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}
