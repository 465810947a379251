//! Changing a handler's partition count safely: a generation switch.
//!
//! The partition of a key depends on the partition count, so the old work stream
//! (`MR_<h>_P<M>`) and the new one (`MR_<h>_P<N>`) would put one key in two partitions that
//! could run at once. So the switch waits until no live host runs M as its configured count
//! ([`blockers`]: such a host knows no cutover and would run what the old stream copies while
//! it is being stopped), and is then done in order:
//! 1. the new stream starts sourcing right after the last origin message the old one sourced
//!    (`S`), and the old one stops sourcing, with `S` recorded in its metadata as the cutover;
//! 2. hosts with the new count first drain the old stream (its own partition group, running
//!    only messages up to `S`: a few later ones the old stream copied before it stopped are
//!    acknowledged without running, as the new stream has them too);
//! 3. once the old stream is empty it is deleted, and the new one is consumed.
//!
//! Each origin message runs in exactly one generation, and all of a key's messages in the old
//! one run before any in the new one. Steps are idempotent: several hosts may run them at once
//! (the new stream's start sequence is the single record of `S`).

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use futures::StreamExt as _;

use super::workstream::{self, CUTOVER};
use crate::config::HandlerConfig;

/// A previous generation still to drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draining {
    /// Its work stream.
    pub stream: String,
    /// Its partition count.
    pub partitions: u32,
    /// The last origin sequence it may run.
    pub cutover: u64,
}

/// The hosts that keep `handler`'s partition count from switching to `partitions` now: live
/// members of a previous generation whose stream still sources, configured with another
/// count (they run that stream as their current one and would run the messages it copies
/// while the switch stops it, which the new stream has too). The switch waits until they
/// leave or restart with the new count; "host (pid N)" each.
pub async fn blockers(
    js: &jetstream::Context,
    handler: &HandlerConfig,
    partitions: u32,
    lease_ttl: std::time::Duration,
) -> anyhow::Result<Vec<String>> {
    let mut hosts = Vec::new();
    for (old, n) in others(js, handler, partitions).await? {
        let raw = raw_info(js, &old).await?;
        if raw["config"]["metadata"].get(CUTOVER).is_some() {
            continue;
        }
        let store =
            super::store::GroupStore::open(js, &handler.name, &super::generation(n), lease_ttl, 1)
                .await?;
        for (_, member) in store.members().await? {
            if member.configured != partitions {
                hosts.push(format!("{} (pid {})", member.name, member.pid));
            }
        }
    }
    Ok(hosts)
}

/// The other generations' work streams of `handler`, with their partition counts.
async fn others(
    js: &jetstream::Context,
    handler: &HandlerConfig,
    partitions: u32,
) -> anyhow::Result<Vec<(String, u32)>> {
    let prefix = format!("MR_{}_P", handler.name);
    let mut others = Vec::new();
    let mut names = js.stream_names();
    while let Some(name) = names.next().await {
        let name = name.context("listing streams")?;
        if let Some(n) = name
            .strip_prefix(&prefix)
            .and_then(|n| n.parse::<u32>().ok())
        {
            if n != partitions {
                others.push((name, n));
            }
        }
    }
    Ok(others)
}

/// The generations of `handler` at `partitions`: the ones to drain first (oldest first), and
/// the current work stream's name (created if needed). Call it once [`blockers`] found none.
pub async fn prepare(
    js: &jetstream::Context,
    handler: &HandlerConfig,
    partitions: u32,
) -> anyhow::Result<(Vec<Draining>, String)> {
    let current = workstream::name(&handler.name, partitions);
    let others = others(js, handler, partitions).await?;
    let mut draining = Vec::new();
    let mut start = None;
    for (old, n) in others {
        let raw = raw_info(js, &old).await?;
        let config: stream::Config = serde_json::from_value(raw["config"].clone())
            .with_context(|| format!("reading the configuration of {old}"))?;
        let cutover = match config.metadata.get(CUTOVER) {
            Some(cut) => cut.parse::<u64>().unwrap_or(u64::MAX),
            None => {
                // Still sourcing: take over from where it is.
                let sourced = raw["sources"][0]["seq"].as_u64().unwrap_or(0);
                let cut = match existing_start(js, &current).await {
                    Some(start) => start.saturating_sub(1),
                    None => {
                        workstream::ensure(js, handler, partitions, Some(sourced + 1)).await?;
                        sourced
                    }
                };
                let mut stopped = config.clone();
                stopped.sources = None;
                stopped.metadata.insert(CUTOVER.to_owned(), cut.to_string());
                js.update_stream(&stopped)
                    .await
                    .with_context(|| format!("stopping the sourcing of {old}"))?;
                tracing::warn!(
                    handler = %handler.name,
                    from = n,
                    to = partitions,
                    cutover = cut,
                    "the partition count changed: {old} stops at origin sequence {cut} and is \
                     drained first; {current} takes over from {}",
                    cut + 1
                );
                cut
            }
        };
        start.get_or_insert(cutover.saturating_add(1));
        let messages = raw["state"]["messages"].as_u64().unwrap_or(0);
        if messages == 0 {
            let _ = js.delete_stream(&old).await;
            tracing::info!(handler = %handler.name, stream = %old, "deleted the drained work stream of the previous partition count");
        } else {
            draining.push(Draining {
                stream: old,
                partitions: n,
                cutover,
            });
        }
    }
    let start = match start {
        Some(start) => Some(start),
        None => durable_start(js, handler).await,
    };
    workstream::ensure(js, handler, partitions, start).await?;
    Ok((draining, current))
}

/// Where the work stream starts when the handler ran without partitions before: after the
/// durable consumer's ack floor, so what it processed is not processed again.
async fn durable_start(js: &jetstream::Context, handler: &HandlerConfig) -> Option<u64> {
    if js
        .get_stream(workstream::name(&handler.name, handler.partitions?))
        .await
        .is_ok()
    {
        return None;
    }
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(&handler.consumer, &handler.stream)
        .await
        .ok()?;
    let floor = consumer.info().await.ok()?.ack_floor.stream_sequence;
    tracing::warn!(
        handler = %handler.name,
        consumer = %handler.consumer,
        "switching to partitions: the work stream starts after the durable consumer's ack \
         floor ({floor}); stop every host still running this handler without partitions \
         (they would process new messages a second time), then delete the consumer"
    );
    Some(floor + 1)
}

async fn existing_start(js: &jetstream::Context, name: &str) -> Option<u64> {
    let raw = raw_info(js, name).await.ok()?;
    raw["config"]["sources"][0]["opt_start_seq"].as_u64()
}

/// Stream info as JSON (async-nats does not expose a source's last sequence).
async fn raw_info(js: &jetstream::Context, name: &str) -> anyhow::Result<serde_json::Value> {
    let reply = js
        .client()
        .request(format!("$JS.API.STREAM.INFO.{name}"), "".into())
        .await
        .with_context(|| format!("reading stream info of {name}"))?;
    let value: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if let Some(err) = value.get("error") {
        anyhow::bail!("stream info of {name}: {err}");
    }
    Ok(value)
}
