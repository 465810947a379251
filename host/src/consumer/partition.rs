//! The consumer side of one partition while this host holds its lease: create the
//! partition's consumer for the lease epoch, pull it, and give it up, gracefully (release)
//! or at once (fence).
//!
//! The group (`group/`) holds the lease and calls these; nothing here knows about leases
//! beyond the [`Fence`] it is given.
//!
//! Invariants:
//! - At most one consumer exists per partition: the work stream is a work queue, which
//!   refuses a second consumer with the same filter (error 10100). Before creating its own,
//!   the new owner deletes any other consumer on the partition (the previous owner's), so the
//!   new one starts at the partition's first unacknowledged message and replays what the
//!   previous owner left, in stream order.
//! - A release re-runs nothing: by the time it returns, the fetch loop has stopped, waiting
//!   messages were given up (they stay in the work stream, not started), running ones were
//!   settled, the acknowledgements were confirmed, and the consumer deleted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer;
use futures::StreamExt as _;
use tokio::task::JoinHandle;

use super::binding::{self, Binding, Ended, Kind};
use super::intake::close_and_collect;
use super::puller::Puller;
use super::Intake;
use crate::fence::Fence;
use crate::telemetry::HandlerMetrics;

/// How long the list of the work stream's consumers is reused when several partitions are
/// acquired at once.
const STALE_LIST_TTL: Duration = Duration::from_secs(2);

/// How long a new epoch waits for the runs a fence cut short on this host to stop.
const FENCED_SETTLE: Duration = Duration::from_secs(5);

/// What the group hands the consumer when it won a partition's lease.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The partition work stream.
    pub stream: Arc<str>,
    /// The partition.
    pub partition: u32,
    /// The lease epoch (it names the consumer).
    pub epoch: u64,
    /// Until when this host may run the partition (moved by lease renewals).
    pub fence: Arc<Fence>,
    /// A drained previous generation: origin sequences above this are acknowledged without
    /// running (the next generation has them).
    pub skip_above: Option<u64>,
}

/// A partition this host pulls.
pub struct Attached {
    /// The binding (its fence, counts, consumer name).
    pub binding: Arc<Binding>,
    fetch: JoinHandle<Ended>,
}

/// What a release found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Waiting messages given up (they stay in the work stream for the next owner).
    pub given_up: usize,
    /// Whether running messages had to be cut short at the deadline.
    pub cut_short: bool,
    /// Whether every acknowledgement was confirmed before the consumer was deleted.
    pub confirmed: bool,
}

/// When a work stream's consumers were listed, the stream, and its consumers by filter.
type ConsumerList = (Instant, Arc<str>, HashMap<String, Vec<String>>);

/// The work stream's consumers by filter, read at most every [`STALE_LIST_TTL`].
#[derive(Default)]
pub struct StaleConsumers {
    cache: Mutex<Option<ConsumerList>>,
}

/// The consumer name of `partition` in lease epoch `epoch`.
pub fn consumer_name(handler: &str, partition: u32, epoch: u64) -> String {
    format!("{handler}-p{partition}-e{epoch}")
}

/// The subjects of `partition` in its work stream.
pub fn filter(partition: u32) -> String {
    format!("{partition}.>")
}

impl Intake {
    /// Creates the partition's consumer for `claim` (deleting the previous owner's) and
    /// starts pulling it.
    pub async fn attach(&self, claim: Claim) -> anyhow::Result<Attached> {
        let shared = &self.shared;
        self.await_fenced(claim.partition).await?;
        let name = consumer_name(&shared.name, claim.partition, claim.epoch);
        let filter = filter(claim.partition);
        let stream = shared
            .js
            .get_stream(&*claim.stream)
            .await
            .with_context(|| format!("partition work stream {} is not available", claim.stream))?;
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!(
                "mailroom handler {} partition {} (lease epoch {})",
                shared.name, claim.partition, claim.epoch
            )),
            filter_subject: filter.clone(),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: shared.config.ack_wait,
            max_deliver: -1,
            max_ack_pending: shared.config.max_ack_pending,
            ..Default::default()
        };
        let mut created = stream.create_consumer(config.clone()).await;
        if created.is_err() {
            // Most likely the previous owner's consumer is still there (error 10100): remove
            // it, then try once more.
            for stale in self.stale.on(&stream, &claim.stream, &filter).await {
                if stale != name {
                    tracing::info!(handler = %shared.name, partition = claim.partition, consumer = %stale, "deleting the previous owner's consumer");
                    if let Err(err) = stream.delete_consumer(&stale).await {
                        tracing::debug!("deleting consumer {stale}: {err}");
                    }
                }
            }
            created = stream.create_consumer(config).await;
        }
        created.with_context(|| {
            format!(
                "cannot create consumer {name} for partition {} on {}",
                claim.partition, claim.stream
            )
        })?;
        let recalled = shared.attempts.load_all().await;
        let binding = Arc::new(Binding::new(
            name.clone(),
            claim.stream.clone(),
            Kind::Partition {
                partition: claim.partition,
                epoch: claim.epoch,
            },
            claim.fence.clone(),
            Some(recalled),
        ));
        binding.skip_above.store(
            claim.skip_above.unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut puller = Puller::new(&shared.client, &claim.stream, &name).await?;
        shared.register(&binding);
        let fetch = {
            let shared = shared.clone();
            let binding = binding.clone();
            self.fetches.spawn(async move {
                let ended =
                    binding::fetch(&shared, &binding, &mut puller, &binding.stop.clone()).await;
                // Whatever is still on its way stays in the work stream for the next owner.
                close_and_collect(&mut puller, false).await;
                ended
            })
        };
        Ok(Attached { binding, fetch })
    }
}

impl Intake {
    /// Waits until the messages of `partition` that an earlier, fenced binding of this host
    /// still held have left the executor. A new epoch's delivery of a message still held
    /// there would be taken for a duplicate of it and dropped, and the key's later messages
    /// would run before it.
    async fn await_fenced(&self, partition: u32) -> anyhow::Result<()> {
        let earlier: Vec<Arc<Binding>> = {
            let mut fenced = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
            fenced.retain(|b| b.held() > 0);
            fenced
                .iter()
                .filter(
                    |b| matches!(b.kind, Kind::Partition { partition: p, .. } if p == partition),
                )
                .cloned()
                .collect()
        };
        let deadline = tokio::time::Instant::now() + FENCED_SETTLE;
        for binding in earlier {
            if !binding.settle_until(deadline).await {
                anyhow::bail!(
                    "{} message(s) of the fenced consumer {} have not stopped yet",
                    binding.held(),
                    binding.consumer
                );
            }
        }
        Ok(())
    }

    /// Remembers a binding given up while it still holds messages (see `await_fenced`).
    fn keep_if_held(&self, binding: &Arc<Binding>) {
        if binding.held() > 0 {
            self.fenced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(binding.clone());
        }
    }
}

impl Attached {
    /// Whether the partition's consumer was found deleted (another host took it over).
    pub fn is_lost(&self) -> bool {
        self.binding.is_lost() || self.fetch.is_finished()
    }

    /// Gives the partition up gracefully: stop pulling, give up what waits, let running
    /// messages finish (until `timeout`, then cut them short), confirm every acknowledgement,
    /// and delete the consumer. The lease may be released once this returns.
    pub async fn release(self, intake: &Intake, timeout: Duration) -> Released {
        let shared = &intake.shared;
        let binding = self.binding;
        binding.stop.cancel();
        let _ = self.fetch.await;
        let given_up = give_up_waiting(intake, &binding);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut cut_short = false;
        if !binding.settle_until(deadline).await {
            cut_short = true;
            binding.abort.cancel();
            give_up_waiting(intake, &binding);
            binding
                .settle_until(tokio::time::Instant::now() + Duration::from_secs(5))
                .await;
            intake.keep_if_held(&binding);
        }
        let confirmed = match binding.confirm_settled(shared).await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(handler = %shared.name, consumer = %binding.consumer, "{err}");
                false
            }
        };
        binding.fence.revoke();
        if let Err(err) = shared
            .js
            .delete_consumer_from_stream(&binding.consumer, &*binding.stream)
            .await
        {
            tracing::debug!(consumer = %binding.consumer, "deleting a released partition's consumer: {err}");
        }
        shared.unregister(&binding);
        Released {
            given_up,
            cut_short,
            confirmed,
        }
    }

    /// Gives the partition up at once, because its lease is lost: nothing more of it runs or
    /// is acknowledged. Its consumer is left for the next owner to delete.
    pub fn fence(self, intake: &Intake) {
        let binding = &self.binding;
        binding.fence.revoke();
        binding.abort.cancel();
        binding.stop.cancel();
        let given_up = give_up_waiting(intake, binding);
        intake
            .shared
            .metrics
            .fenced_messages
            .fetch_add(given_up as u64, std::sync::atomic::Ordering::Relaxed);
        intake.shared.unregister(binding);
        // Running ones stop at their next await; the next epoch here waits for that.
        intake.keep_if_held(binding);
    }
}

/// Removes the binding's waiting messages from the executor without settling them.
fn give_up_waiting(intake: &Intake, binding: &Arc<Binding>) -> usize {
    let shared = &intake.shared;
    let taken = shared
        .executor
        .take_waiting_where(|job| Arc::ptr_eq(&job.binding, binding));
    for _ in &taken {
        binding.release_one(shared);
    }
    if !taken.is_empty() {
        HandlerMetrics::incr(&shared.metrics.handed_back);
    }
    taken.len()
}

impl StaleConsumers {
    /// The consumers of `stream` filtering on `filter`.
    async fn on(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
        name: &Arc<str>,
        filter: &str,
    ) -> Vec<String> {
        let fresh = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match &*cache {
                Some((at, cached, map)) if at.elapsed() < STALE_LIST_TTL && cached == name => {
                    Some(map.get(filter).cloned().unwrap_or_default())
                }
                _ => None,
            }
        };
        if let Some(found) = fresh {
            return found;
        }
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let Ok(info) = info else { break };
            let mut filters = info.config.filter_subjects.clone();
            if !info.config.filter_subject.is_empty() {
                filters.push(info.config.filter_subject.clone());
            }
            for f in filters {
                map.entry(f).or_default().push(info.name.clone());
            }
        }
        let found = map.get(filter).cloned().unwrap_or_default();
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), name.clone(), map));
        found
    }
}
