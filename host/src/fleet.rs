//! The fleet as NATS sees it: for each handler of a config, the hosts running it, which
//! partitions each owns, the backlog per partition, partitions without an owner and recent
//! moves. `mailroom status` prints it; it needs nothing but a NATS connection, so it works
//! from any machine.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt as _;
use serde::Serialize;

use crate::config::{Config, HandlerConfig};
use crate::consumer::partition_consumer;
use crate::group::store::{self, LeaseRecord, MemberRecord, Seen};
use crate::group::workstream;

/// One handler's view.
#[derive(Debug, Clone, Serialize)]
pub struct HandlerStatus {
    /// The handler.
    pub handler: String,
    /// Partition count, `None` when unpartitioned.
    pub partitions: Option<u32>,
    /// The stream its consumers read.
    pub stream: String,
    /// Live hosts by id.
    pub hosts: BTreeMap<String, MemberRecord>,
    /// Per partition: the lease holder and the backlog.
    pub leases: BTreeMap<u32, PartitionStatus>,
    /// Messages not yet delivered plus delivered and not yet acknowledged.
    pub backlog: u64,
    /// Problems found (a missing stream, say).
    pub problems: Vec<String>,
}

/// One partition.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionStatus {
    /// The lease holder, if any.
    pub owner: Option<String>,
    /// The lease epoch.
    pub epoch: Option<u64>,
    /// `num_pending + num_ack_pending` of its consumer.
    pub backlog: u64,
}

/// Reads the status of every handler of `config` from NATS.
pub async fn status(js: &jetstream::Context, config: &Config) -> Vec<HandlerStatus> {
    let groups = js.get_key_value(store::BUCKET).await.ok();
    let mut out = Vec::new();
    for handler in &config.handlers {
        out.push(handler_status(js, groups.as_ref(), handler).await);
    }
    out
}

async fn handler_status(
    js: &jetstream::Context,
    groups: Option<&jetstream::kv::Store>,
    handler: &HandlerConfig,
) -> HandlerStatus {
    let mut status = HandlerStatus {
        handler: handler.name.clone(),
        partitions: handler.partitions,
        stream: handler.stream.clone(),
        hosts: BTreeMap::new(),
        leases: BTreeMap::new(),
        backlog: 0,
        problems: Vec::new(),
    };
    let mut leases: BTreeMap<u32, LeaseRecord> = BTreeMap::new();
    if let Some(kv) = groups {
        let generation = handler
            .partitions
            .map_or_else(|| "d".to_owned(), crate::group::generation);
        let prefix = format!("{}.{generation}.", handler.name);
        if let Ok(mut watch) = kv.watch_with_history(format!("{prefix}>")).await {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            while let Ok(Some(Ok(entry))) = tokio::time::timeout_at(deadline, watch.next()).await {
                let last = entry.delta == 0;
                match store::read(&prefix, &entry) {
                    Seen::Member(id, record) => {
                        status.hosts.insert(id, record);
                    }
                    Seen::Lease(p, record) => {
                        leases.insert(p, record);
                    }
                    _ => {}
                }
                if last {
                    break;
                }
            }
        }
    }
    match handler.partitions {
        None => {
            let consumer: Result<PullConsumer, _> = js
                .get_consumer_from_stream(&handler.consumer, &handler.stream)
                .await;
            match consumer {
                Ok(mut c) => match c.info().await {
                    Ok(info) => status.backlog = info.num_pending + info.num_ack_pending as u64,
                    Err(err) => status.problems.push(format!("consumer info: {err}")),
                },
                Err(err) => status.problems.push(format!(
                    "no consumer {} on stream {} ({err}): no host has started this handler yet",
                    handler.consumer, handler.stream
                )),
            }
        }
        Some(n) => {
            let work = workstream::name(&handler.name, n);
            status.stream = work.clone();
            if js.get_stream(&work).await.is_err() {
                status.problems.push(format!(
                    "no work stream {work}: no host has started this handler with {n} partitions"
                ));
            }
            for p in 0..n {
                let lease = leases.get(&p);
                let mut part = PartitionStatus {
                    owner: lease.map(|l| l.host.clone()),
                    epoch: lease.map(|l| l.epoch).filter(|e| *e > 0),
                    backlog: 0,
                };
                if let Some(epoch) = part.epoch {
                    let name = partition_consumer(&handler.name, p, epoch);
                    if let Ok(mut c) = js
                        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                            &name, &work,
                        )
                        .await
                    {
                        if let Ok(info) = c.info().await {
                            part.backlog = info.num_pending + info.num_ack_pending as u64;
                        }
                    }
                }
                status.backlog += part.backlog;
                status.leases.insert(p, part);
            }
        }
    }
    status
}

fn ago(unix: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    humantime::format_duration(std::time::Duration::from_secs(now.saturating_sub(unix))).to_string()
}

impl fmt::Display for HandlerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.partitions {
            Some(n) => writeln!(
                f,
                "handler {}: {n} partitions in {}, backlog {}",
                self.handler, self.stream, self.backlog
            )?,
            None => writeln!(
                f,
                "handler {}: one durable consumer on {} (no partitions), backlog {}",
                self.handler, self.stream, self.backlog
            )?,
        }
        for problem in &self.problems {
            writeln!(f, "  ! {problem}")?;
        }
        writeln!(f, "  hosts ({}):", self.hosts.len())?;
        for (id, host) in &self.hosts {
            let owns: Vec<String> = host.owned.iter().map(u32::to_string).collect();
            writeln!(
                f,
                "    {id:<28} pid {:<7} up {:<12} {}{}",
                host.pid,
                ago(host.started),
                if host.draining { "LEAVING " } else { "" },
                if self.partitions.is_some() {
                    format!("owns [{}]", owns.join(" "))
                } else {
                    String::new()
                }
            )?;
        }
        if self.partitions.is_none() {
            return Ok(());
        }
        writeln!(
            f,
            "  partition  owner                         epoch  backlog"
        )?;
        let mut unowned = Vec::new();
        for (p, part) in &self.leases {
            match &part.owner {
                Some(owner) => writeln!(
                    f,
                    "  {p:>9}  {owner:<28}  {:>5}  {:>7}",
                    part.epoch.map_or("-".to_owned(), |e| e.to_string()),
                    part.backlog
                )?,
                None => unowned.push(p.to_string()),
            }
        }
        if unowned.is_empty() {
            writeln!(f, "  every partition has an owner")?;
        } else {
            writeln!(f, "  without an owner: {}", unowned.join(" "))?;
        }
        let mut moves: Vec<(u64, String)> = Vec::new();
        for (id, host) in &self.hosts {
            for m in &host.moves {
                if let Some((what, at)) = m.split_once('@') {
                    let at: u64 = at.parse().unwrap_or(0);
                    let verb = match what.chars().next() {
                        Some('+') => "acquired",
                        Some('-') => "released",
                        _ => "fenced",
                    };
                    moves.push((
                        at,
                        format!("{} ago: {id} {verb} partition {}", ago(at), &what[1..]),
                    ));
                }
            }
        }
        moves.sort();
        if !moves.is_empty() {
            writeln!(f, "  recent moves:")?;
            for (_, line) in moves.iter().rev().take(10) {
                writeln!(f, "    {line}")?;
            }
        }
        Ok(())
    }
}
