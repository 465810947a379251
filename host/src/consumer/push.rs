//! A durable push consumer with a deliver group (`consumer_kind = "push-queue"`), the kind
//! wasmCloud's JetStream plugin creates: every host of the handler subscribes the consumer's
//! deliver subject in its queue group, and the server hands each delivery to one of them.
//! Everything after the delivery is the pull path's: the keyed executor, acks after
//! completion and confirmed outputs, retries, the attempts ledger, dead letters, hand-backs.
//!
//! What push cannot do: size deliveries by this host's free slots. The server sends up to the
//! consumer's `max_ack_pending` (across the group) whatever the host is doing, and the host
//! holds what it is sent (keeping it alive with progress acks). Flow-control requests are
//! answered as they come; idle heartbeats are consumed here.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer};
use async_nats::StatusCode;
use bytes::Bytes;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::binding::{self, Binding};
use super::delivery::Delivery;
use super::Shared;
use crate::config::HandlerConfig;

/// How long in-transit deliveries are awaited after unsubscribing.
const IN_TRANSIT: Duration = Duration::from_secs(2);

/// The deliver subject of a consumer Mailroom creates.
pub fn deliver_subject(config: &HandlerConfig) -> String {
    format!("_MAILROOM.push.{}.{}", config.stream, config.consumer)
}

/// Checks the handler's push consumer, or creates it if it does not exist. An existing one is
/// used as it is (it may belong to a wasmCloud deployment being moved): only what Mailroom
/// cannot work with is refused, each with what to change.
pub async fn ensure(
    stream: &jetstream::stream::Stream,
    config: &HandlerConfig,
    group: &str,
) -> anyhow::Result<()> {
    let ctx = format!(
        "handler {}: consumer {} on stream {}",
        config.name, config.consumer, config.stream
    );
    if let Ok(info) = stream.consumer_info(&config.consumer).await {
        let c = &info.config;
        let Some(subject) = &c.deliver_subject else {
            bail!(
                "{ctx} is a pull consumer; remove consumer_kind = \"push-queue\" (pull is the \
                 default) or name a push consumer"
            );
        };
        match c.deliver_group.as_deref() {
            Some(g) if g == group => {}
            Some(g) => bail!("{ctx} delivers to queue group {g:?}; set deliver_group = {g:?}"),
            None => bail!(
                "{ctx} has no deliver group, so every host would receive every message; \
                 give the consumer a deliver_group (re-create it) or use a pull consumer"
            ),
        }
        if c.ack_policy != consumer::AckPolicy::Explicit {
            bail!(
                "{ctx} has ack policy {:?}; Mailroom acknowledges each message after it is \
                 processed and needs \"explicit\": re-create the consumer with it",
                c.ack_policy
            );
        }
        if c.ack_wait < config.ack_wait {
            bail!(
                "{ctx} has ack_wait {:?}, shorter than the handler's {:?}: messages would be \
                 redelivered while they run; set ack_wait = \"{}\" in the [[handler]] table",
                c.ack_wait,
                config.ack_wait,
                humantime::format_duration(c.ack_wait)
            );
        }
        if c.max_deliver > 0 && i64::from(config.retry.max_attempts) >= c.max_deliver {
            tracing::warn!(
                handler = %config.name,
                "{ctx} has max_deliver {}: the server stops redelivering a message after that \
                 many deliveries, silently; Mailroom dead-letters after max_attempts ({}), so \
                 keep max_attempts below it",
                c.max_deliver,
                config.retry.max_attempts
            );
        }
        tracing::info!(handler = %config.name, consumer = %config.consumer, deliver_subject = %subject, deliver_group = group, "binding the existing push consumer");
        return Ok(());
    }
    let mut cfg = consumer::push::Config {
        durable_name: Some(config.consumer.clone()),
        description: Some(format!("mailroom handler {}", config.name)),
        deliver_subject: deliver_subject(config),
        deliver_group: Some(group.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: -1,
        max_ack_pending: config.max_ack_pending,
        flow_control: true,
        idle_heartbeat: Duration::from_secs(5),
        ..Default::default()
    };
    match config.filter_subjects.as_slice() {
        [] => {}
        [one] => cfg.filter_subject = one.clone(),
        many => cfg.filter_subjects = many.to_vec(),
    }
    stream
        .create_consumer(cfg)
        .await
        .with_context(|| format!("{ctx}: cannot create the push consumer"))?;
    Ok(())
}

/// Receives the push consumer's deliveries for `binding` until `shutdown`; returns what was
/// still in transit when it stopped (to be handed back).
pub async fn receive(
    shared: &Arc<Shared>,
    binding: &Arc<Binding>,
    shutdown: &CancellationToken,
) -> Vec<Delivery> {
    let mut sub = loop {
        match subscribe(shared).await {
            Ok(sub) => break sub,
            Err(err) => {
                tracing::warn!(handler = %shared.name, "cannot subscribe to the push consumer: {err:#}; retrying in 1s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return Vec::new(),
                }
            }
        }
    };
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            message = sub.next() => message,
        };
        let Some(message) = message else {
            tracing::error!(handler = %shared.name, "the push subscription closed; stopping");
            return Vec::new();
        };
        if let Some(delivery) = accept(shared, message).await {
            binding::dispatch(shared, binding, delivery).await;
        }
    }
    // Stop receiving before anything is handed back, and keep what is on its way.
    if let Err(err) = sub.drain().await {
        tracing::debug!("draining the push subscription: {err}");
    }
    let deadline = tokio::time::Instant::now() + IN_TRANSIT;
    let mut returned = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, sub.next()).await {
        returned.extend(accept(shared, message).await);
    }
    returned
}

async fn subscribe(shared: &Shared) -> anyhow::Result<async_nats::Subscriber> {
    let crate::config::ConsumerKind::PushQueue { deliver_group } = &shared.config.consumer_kind
    else {
        bail!("handler {} has no push consumer", shared.name);
    };
    let stream = shared
        .js
        .get_stream(&*shared.stream)
        .await
        .context("looking up the stream")?;
    let info = stream
        .consumer_info(&shared.config.consumer)
        .await
        .context("looking up the push consumer")?;
    let Some(subject) = info.config.deliver_subject else {
        bail!("consumer {} is not a push consumer", shared.config.consumer);
    };
    Ok(shared
        .client
        .queue_subscribe(subject, deliver_group.clone())
        .await?)
}

/// A stream message as a delivery; status messages are answered (flow control) or dropped.
async fn accept(shared: &Shared, message: async_nats::Message) -> Option<Delivery> {
    match message.status {
        None | Some(StatusCode::OK) => match Delivery::parse(message, false) {
            Ok(delivery) => Some(delivery),
            Err(err) => {
                tracing::warn!(handler = %shared.name, "ignoring a message on the deliver subject: {}", err.0);
                None
            }
        },
        Some(StatusCode::IDLE_HEARTBEAT) => {
            // Flow-control requests carry a reply subject; plain heartbeats do not.
            if let Some(reply) = message.reply {
                if let Err(err) = shared.client.publish(reply, Bytes::new()).await {
                    tracing::debug!(handler = %shared.name, "answering a flow-control request: {err}");
                }
            }
            None
        }
        Some(other) => {
            tracing::debug!(handler = %shared.name, status = %other, description = ?message.description, "status message on the deliver subject");
            None
        }
    }
}
