//! The JetStream side of a handler: bind the durable consumer, pull as many messages as there
//! are free slots, hand them to the workers, drain on shutdown.
//!
//! Invariants:
//! - Only this module acknowledges messages (through [`delivery::Delivery`]).
//! - A message is acked only after its handler succeeded and every publish it made was
//!   confirmed ([`worker`]).
//! - The host holds at most `concurrency` messages (plus a few after a pull reset); it never
//!   fetches what it cannot start, so fetched messages do not sit out their AckWait.
//! - On shutdown it stops pulling at once, hands back (nak, no delay) what it has not started,
//!   lets running messages finish until the drain deadline, confirms its final acks, and naks
//!   whatever is still running at the deadline. Nothing is left waiting for AckWait.

pub mod delivery;
mod puller;
pub mod settle;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use async_nats::Client;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HandlerConfig;
use crate::executor::Executor;
use crate::runtime::HandlerModule;
use crate::telemetry::HandlerMetrics;
use delivery::Delivery;
use puller::{Pulled, Puller};

/// Everything the fetch loop and the workers of one handler share.
pub struct Shared {
    /// Handler name.
    pub name: Arc<str>,
    /// The loaded module.
    pub module: HandlerModule,
    /// Its configuration.
    pub config: HandlerConfig,
    /// The NATS connection (acks go through it).
    pub client: Client,
    /// JetStream context (dead-letter publishes).
    pub js: jetstream::Context,
    /// Name of the consumed stream.
    pub stream: Arc<str>,
    /// Counters.
    pub metrics: Arc<HandlerMetrics>,
    held: AtomicUsize,
    freed: Notify,
    draining: AtomicBool,
}

impl Shared {
    /// Bundles a handler's parts.
    pub fn new(
        module: HandlerModule,
        config: HandlerConfig,
        client: Client,
        js: jetstream::Context,
        metrics: Arc<HandlerMetrics>,
    ) -> Shared {
        Shared {
            name: config.name.as_str().into(),
            stream: config.stream.as_str().into(),
            module,
            config,
            client,
            js,
            metrics,
            held: AtomicUsize::new(0),
            freed: Notify::new(),
            draining: AtomicBool::new(false),
        }
    }

    /// During drain every acknowledgement is confirmed by the server.
    fn confirm_acks(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn hold(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.freed.notify_one();
    }
}

/// Creates or updates the handler's durable pull consumer. Every host running the handler
/// binds the same consumer, which is how they share the stream's messages.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    config: &HandlerConfig,
) -> anyhow::Result<()> {
    let stream = js.get_stream(&config.stream).await.with_context(|| {
        format!(
            "handler {}: stream {} is not available; declare it with [[stream]] in the config \
             or create it",
            config.name, config.stream
        )
    })?;
    let mut cfg = consumer::pull::Config {
        durable_name: Some(config.consumer.clone()),
        description: Some(format!("mailroom handler {}", config.name)),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        // Mailroom counts attempts itself, so a message whose last attempt was cut short
        // still reaches the dead-letter subject instead of silently stopping at max_deliver.
        max_deliver: -1,
        max_ack_pending: (config.concurrency as i64 * 64).max(1000),
        ..Default::default()
    };
    match config.filter_subjects.as_slice() {
        [] => {}
        [one] => cfg.filter_subject = one.clone(),
        many => cfg.filter_subjects = many.to_vec(),
    }
    stream.create_consumer(cfg).await.with_context(|| {
        format!(
            "handler {}: cannot create or update consumer {} on stream {}",
            config.name, config.consumer, config.stream
        )
    })?;
    Ok(())
}

/// Runs the fetch loop of one handler until `shutdown`, then drains.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken, drain_timeout: Duration) {
    let executor = Arc::new(Executor::<Delivery>::new());
    let abort = CancellationToken::new();
    let workers = TaskTracker::new();
    for _ in 0..shared.config.concurrency {
        let (shared, executor, abort) = (shared.clone(), executor.clone(), abort.clone());
        workers.spawn(async move {
            while let Some(delivery) = executor.next().await {
                worker::process(&shared, delivery, &abort).await;
                shared.release();
            }
        });
    }
    workers.close();

    let mut puller = loop {
        match Puller::new(&shared.client, &shared.stream, &shared.config.consumer).await {
            Ok(p) => break Some(p),
            Err(err) => {
                tracing::warn!(handler = %shared.name, "cannot subscribe for pull requests: {err:#}; retrying");
                if sleep_or_shutdown(Duration::from_secs(1), &shutdown).await {
                    break None;
                }
            }
        }
    };
    if let Some(p) = puller.as_mut() {
        fetch(&shared, p, &executor, &shutdown).await;
    }

    // Drain: stop pulling, hand back what was not started, let running work finish.
    shared.draining.store(true, Ordering::Relaxed);
    tracing::info!(handler = %shared.name, in_flight = shared.held.load(Ordering::Relaxed), "draining");
    executor.close();
    for delivery in executor.take_queued() {
        worker::nak_now(&shared, &delivery).await;
        shared.release();
    }
    if let Some(p) = puller.as_mut() {
        p.close().await;
        loop {
            match p.next().await {
                Pulled::Message(message) => {
                    if let Ok(delivery) = Delivery::parse(message) {
                        worker::nak_now(&shared, &delivery).await;
                    }
                }
                Pulled::Closed => break,
                Pulled::Reset | Pulled::Unavailable | Pulled::Fatal(_) => {
                    if p.outstanding() == 0 {
                        break;
                    }
                }
            }
        }
    }
    if tokio::time::timeout(drain_timeout, workers.wait())
        .await
        .is_err()
    {
        tracing::warn!(handler = %shared.name, "drain timeout reached; handing back running messages");
        abort.cancel();
        workers.wait().await;
    }
    if let Err(err) = shared.client.flush().await {
        tracing::warn!("final flush failed: {err}");
    }
    tracing::info!(handler = %shared.name, "drained");
}

/// Pulls and dispatches until shutdown.
async fn fetch(
    shared: &Arc<Shared>,
    puller: &mut Puller,
    executor: &Executor<Delivery>,
    shutdown: &CancellationToken,
) {
    let capacity = shared.config.concurrency;
    // Ask in chunks: a request per freed slot would cost a round trip per message.
    let min_batch = (capacity / 4).max(1);
    loop {
        let held = shared.held.load(Ordering::Relaxed);
        let free = capacity.saturating_sub(held + puller.outstanding());
        if free >= min_batch || (free > 0 && puller.outstanding() == 0) {
            if let Err(err) = puller.request(free).await {
                tracing::warn!(handler = %shared.name, "pull request failed: {err:#}");
                if sleep_or_shutdown(Duration::from_secs(1), shutdown).await {
                    return;
                }
                continue;
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            pulled = puller.next() => match pulled {
                Pulled::Message(message) => match Delivery::parse(message) {
                    Ok(delivery) => {
                        shared.hold();
                        executor.push(delivery);
                    }
                    Err(err) => tracing::warn!(handler = %shared.name, "ignoring a message on the pull inbox: {}", err.0),
                },
                Pulled::Reset => {}
                Pulled::Unavailable => {
                    tracing::warn!(handler = %shared.name, "JetStream did not answer the pull request; retrying in 1s");
                    if sleep_or_shutdown(Duration::from_secs(1), shutdown).await {
                        return;
                    }
                }
                Pulled::Fatal(reason) => {
                    tracing::warn!(handler = %shared.name, %reason, "consumer unusable; binding it again");
                    loop {
                        match ensure_consumer(&shared.js, &shared.config).await {
                            Ok(()) => break,
                            Err(err) => {
                                tracing::error!(handler = %shared.name, "{err:#}; retrying in 5s");
                                if sleep_or_shutdown(Duration::from_secs(5), shutdown).await {
                                    return;
                                }
                            }
                        }
                    }
                }
                Pulled::Closed => {
                    tracing::error!(handler = %shared.name, "the pull subscription closed; stopping this handler");
                    return;
                }
            },
            _ = shared.freed.notified() => {}
        }
    }
}

/// Sleeps for `d`; returns true if shutdown came first.
async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}
