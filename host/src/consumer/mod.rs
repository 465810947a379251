//! The JetStream side of a handler: bind the durable consumer, pull as many messages as the
//! host can hold, queue them by ordering key, run them on an autoscaled worker pool, keep
//! waiting messages alive, drain on shutdown.
//!
//! Invariants:
//! - Only this module acknowledges messages (through [`delivery::Delivery`]).
//! - A message is acked only after its handler succeeded and every publish it made was
//!   confirmed ([`worker`]).
//! - The host holds at most its capacity (ordered: `max_buffered`; unordered: `prefetch` or two
//!   messages per worker, whichever is more) plus a few after a pull reset. At
//!   `max_keys` distinct keys it stops pulling (a batch already requested can go past the key
//!   cap by at most its size). At a cap it stops pulling; it never drops.
//! - No held message goes half an AckWait without JetStream hearing of it: running ones get
//!   progress acks from their worker, waiting ones from the sweeper (which looks every quarter
//!   AckWait for messages untouched for a quarter).
//! - On shutdown it stops pulling at once, hands back (nak, no delay) what it has not started,
//!   lets running messages finish until the drain deadline, confirms its final acks, and naks
//!   whatever is still running at the deadline. Nothing is left waiting for AckWait.

pub mod delivery;
mod puller;
pub mod settle;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use async_nats::Client;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HandlerConfig;
use crate::executor::{Executor, Pushed, Ticket};
use crate::ordering::MissingKey;
use crate::pool::Pool;
use crate::runtime::HandlerModule;
use crate::scaler::{Observation, Scaler, ScalerConfig};
use crate::telemetry::HandlerMetrics;
use delivery::{Delivery, Job};
use puller::{Pulled, Puller};
use worker::Settled;

/// How often the scaler looks and the gauges are refreshed.
const SCALE_TICK: Duration = Duration::from_millis(250);
/// How often the consumer's server-side backlog is read (it also comes free with messages).
const INFO_EVERY: Duration = Duration::from_secs(1);

/// Everything the fetch loop, the workers and the background tasks of one handler share.
pub struct Shared {
    /// Handler name.
    pub name: Arc<str>,
    /// The loaded module.
    pub module: HandlerModule,
    /// Its configuration.
    pub config: HandlerConfig,
    /// The NATS connection (acks go through it).
    pub client: Client,
    /// JetStream context (dead-letter publishes, consumer info).
    pub js: jetstream::Context,
    /// Name of the consumed stream.
    pub stream: Arc<str>,
    /// Counters.
    pub metrics: Arc<HandlerMetrics>,
    /// Messages waiting for or running on a worker.
    pub executor: Executor<Job>,
    /// The workers.
    pub pool: Pool,
    held: AtomicUsize,
    freed: Notify,
    /// The fetch loop wants waking once `held` drops to this (a batch's worth of room).
    wake_at: AtomicUsize,
    draining: AtomicBool,
    server_pending: AtomicU64,
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
            pool: Pool::new(config.min_workers, config.max_workers),
            executor: Executor::new(),
            module,
            config,
            client,
            js,
            metrics,
            held: AtomicUsize::new(0),
            freed: Notify::new(),
            wake_at: AtomicUsize::new(usize::MAX),
            draining: AtomicBool::new(false),
            server_pending: AtomicU64::new(0),
        }
    }

    /// During drain every acknowledgement is confirmed by the server.
    fn confirm_acks(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn ordered(&self) -> bool {
        self.config.ordering.is_ordered()
    }

    /// How many messages the host may hold now.
    fn capacity(&self) -> usize {
        if self.ordered() {
            // Messages of busy keys wait here while other keys run: buffer up to the cap.
            self.config.max_buffered
        } else {
            // Unordered messages never wait for a key, but fetching only what the workers can
            // start right away costs a pull round trip per handful of messages: keep
            // `prefetch` in hand (they are kept alive by progress acks while they wait).
            (2 * self.pool.target())
                .max(self.config.prefetch)
                .min(self.config.max_buffered)
        }
    }

    fn hold(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self) {
        let held = self.held.fetch_sub(1, Ordering::Relaxed) - 1;
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Waking the fetch loop for every settled message would cost a task switch each;
        // it only needs to hear once there is room for a batch.
        if held <= self.wake_at.load(Ordering::Relaxed) {
            self.freed.notify_one();
        }
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
        // Shared by every host of this handler: it must cover hosts × max_buffered, or hosts
        // starve each other (see the README's "Ordering and scaling").
        max_ack_pending: config.max_ack_pending,
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

/// Runs one handler until `shutdown`, then drains.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken, drain_timeout: Duration) {
    let abort = CancellationToken::new();
    let workers = TaskTracker::new();
    spawn_workers(&shared, &workers, &abort);
    let background = CancellationToken::new();
    let aux = TaskTracker::new();
    aux.spawn(scale(
        shared.clone(),
        workers.clone(),
        abort.clone(),
        background.clone(),
    ));
    aux.spawn(sweep(shared.clone(), background.clone()));
    aux.close();

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
        fetch(&shared, p, &shutdown).await;
    }

    // Drain: stop pulling, hand back what was not started, let running work finish.
    shared.draining.store(true, Ordering::Relaxed);
    tracing::info!(handler = %shared.name, held = shared.held.load(Ordering::Relaxed), "draining");
    background.cancel();
    aux.wait().await;
    shared.executor.close();
    // Close the pull subscription before handing anything back, so nothing nak'ed is
    // redelivered to this host's own pull requests; keep what is still on its way.
    let mut returned = Vec::new();
    if let Some(p) = puller.as_mut() {
        let deadline = tokio::time::Instant::now() + puller::EXPIRES;
        p.close().await;
        loop {
            match tokio::time::timeout_at(deadline, p.next()).await {
                Ok(Pulled::Message(message)) => returned.extend(Delivery::parse(message).ok()),
                Ok(Pulled::Closed) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    for delivery in &returned {
        worker::nak_now(&shared, delivery).await;
    }
    for job in shared.executor.take_waiting() {
        worker::nak_now(&shared, &job.delivery).await;
        shared.release();
    }
    workers.close();
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

/// Spawns workers until the pool reaches its target.
fn spawn_workers(shared: &Arc<Shared>, workers: &TaskTracker, abort: &CancellationToken) {
    for _ in 0..shared.pool.claim_spawns() {
        workers.spawn(work(shared.clone(), abort.clone()));
    }
}

/// One worker: takes the next runnable message, runs and settles it, until retired or closed.
async fn work(shared: Arc<Shared>, abort: CancellationToken) {
    // This worker's warm instance under `isolation = "reuse"`; always empty otherwise.
    let mut warm = None;
    loop {
        if shared.pool.try_retire() {
            return;
        }
        let ticket = tokio::select! {
            biased;
            ticket = shared.executor.next() => ticket,
            _ = shared.pool.shrunk() => continue,
        };
        let Some(Ticket {
            key,
            seq,
            item: mut job,
        }) = ticket
        else {
            shared.pool.left();
            return;
        };
        let settled = {
            let _busy = shared.pool.busy_guard();
            worker::process(&shared, &mut job, &mut warm, &abort).await
        };
        match (settled, &key) {
            (Settled::RetryAt { at, blocked }, Some(key))
                if !shared.draining.load(Ordering::Relaxed) =>
            {
                shared.executor.retry(key, seq, job, at, blocked);
            }
            (Settled::RetryAt { .. }, _) => {
                // Draining: the executor no longer runs anything, so hand it back. (`process`
                // never asks an unordered message to be retried in place; should it, the
                // message is handed back too rather than lost.)
                worker::nak_now(&shared, &job.delivery).await;
                shared.executor.done(None, seq);
                shared.release();
            }
            (Settled::Done, _) => {
                shared.executor.done(key.as_ref(), seq);
                shared.release();
            }
        }
    }
}

/// Pulls and dispatches until shutdown.
async fn fetch(shared: &Arc<Shared>, puller: &mut Puller, shutdown: &CancellationToken) {
    loop {
        let capacity = shared.capacity();
        let held = shared.held.load(Ordering::Relaxed);
        let mut free = capacity.saturating_sub(held + puller.outstanding());
        if shared.ordered() && shared.executor.stats().keys >= shared.config.max_keys {
            free = 0;
        }
        // Ask in chunks: a request per freed slot would cost a round trip per message.
        let min_batch = (capacity / 4).max(1);
        if free >= min_batch || (free > 0 && puller.outstanding() == 0) {
            if let Err(err) = puller.request(free).await {
                tracing::warn!(handler = %shared.name, "pull request failed: {err:#}");
                if sleep_or_shutdown(Duration::from_secs(1), shutdown).await {
                    return;
                }
                continue;
            }
        }
        // Wake up again once releases leave room for a batch (or for anything, when no
        // request is out).
        let room = if puller.outstanding() == 0 {
            1
        } else {
            min_batch
        };
        shared.wake_at.store(
            capacity.saturating_sub(puller.outstanding() + room),
            Ordering::Relaxed,
        );
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            pulled = puller.next() => match pulled {
                Pulled::Message(message) => match Delivery::parse(message) {
                    Ok(delivery) => dispatch(shared, delivery),
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

/// Queues a delivery under its ordering key.
fn dispatch(shared: &Shared, delivery: Delivery) {
    shared
        .server_pending
        .store(delivery.pending, Ordering::Relaxed);
    let seq = delivery.stream_sequence;
    let ordering = &shared.config.ordering;
    let mut job = Job::new(delivery);
    let fallback = shared.config.on_missing_key == MissingKey::Subject;
    if let Err(err) = ordering.key(job.delivery.subject(), |name| job.delivery.header(name)) {
        if !fallback {
            job.key_error = Some(err.0);
        }
    }
    let pushed = shared.executor.push_with(seq, job, |job| {
        if job.key_error.is_some() {
            // Straight to the dead-letter path: it needs no lane.
            return None;
        }
        let d = &job.delivery;
        match ordering.key(d.subject(), |name| d.header(name)) {
            Ok(key) => key,
            Err(_) => Some(d.subject()),
        }
    });
    match pushed {
        Pushed::Queued { late } => {
            shared.hold();
            if late {
                HandlerMetrics::incr(&shared.metrics.late_redeliveries);
                tracing::info!(
                    handler = %shared.name,
                    stream_seq = seq,
                    "redelivery of a message whose key already ran a later one; it runs as soon as its key is free"
                );
            }
        }
        Pushed::Duplicate(job) => {
            // This host already holds this message (running or waiting); the server sent it
            // again because it had not heard of it in time. Acks go by stream sequence, so the
            // held copy settles both deliveries: this one is dropped, the message is not.
            HandlerMetrics::incr(&shared.metrics.duplicate_deliveries);
            tracing::debug!(handler = %shared.name, stream_seq = seq, delivered = job.delivery.delivered, "duplicate delivery of a held message ignored");
        }
    }
}

/// Sends progress acks for held messages that are waiting (for their key, a retry, or a
/// worker), so JetStream does not redeliver them.
async fn sweep(shared: Arc<Shared>, stop: CancellationToken) {
    // Checked every quarter AckWait for messages untouched for a quarter: none goes more than
    // half an AckWait without a progress ack.
    let quarter = (shared.config.ack_wait / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(quarter) => {}
        }
        let now = Instant::now();
        let mut due = Vec::new();
        shared.executor.for_each_waiting(|job| {
            if now.duration_since(job.touched) >= quarter {
                job.touched = now;
                due.push(job.delivery.reply().clone());
            }
        });
        for reply in due {
            HandlerMetrics::incr(&shared.metrics.progress_acks);
            if let Err(err) = shared
                .client
                .publish(reply, Bytes::from_static(b"+WPI"))
                .await
            {
                tracing::warn!(handler = %shared.name, "progress ack failed: {err}");
            }
        }
    }
}

/// Refreshes gauges and, for autoscaled pools, applies the scaler's decisions.
async fn scale(
    shared: Arc<Shared>,
    workers: TaskTracker,
    abort: CancellationToken,
    stop: CancellationToken,
) {
    let autoscaled = shared.pool.min() < shared.pool.max();
    let mut scaler = Scaler::new(ScalerConfig {
        min: shared.pool.min(),
        max: shared.pool.max(),
        cooldown: shared.config.scale_cooldown,
        plateau_hold: Duration::from_secs(10),
    });
    let m = &shared.metrics;
    let mut ticker = tokio::time::interval(SCALE_TICK);
    let mut last = Instant::now();
    let mut last_info: Option<Instant> = None;
    let mut completed = m.succeeded.load(Ordering::Relaxed);
    let mut failed = m.retried.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        if last_info.is_none_or(|at| now.duration_since(at) >= INFO_EVERY) {
            last_info = Some(now);
            if let Some(pending) = server_pending(&shared).await {
                shared.server_pending.store(pending, Ordering::Relaxed);
            }
        }
        let stats = shared.executor.stats();
        let pool = &shared.pool;
        m.workers.store(pool.live() as i64, Ordering::Relaxed);
        m.busy.store(pool.busy() as i64, Ordering::Relaxed);
        m.busy_peak
            .fetch_max(pool.busy_peak() as i64, Ordering::Relaxed);
        m.buffered.store(stats.waiting as i64, Ordering::Relaxed);
        m.keys.store(stats.keys as i64, Ordering::Relaxed);
        m.blocked_keys
            .store(stats.blocked as i64, Ordering::Relaxed);
        m.set_blocked(if stats.blocked > 0 {
            shared.executor.blocked_keys(20)
        } else {
            Vec::new()
        });
        if autoscaled {
            let done_now = m.succeeded.load(Ordering::Relaxed);
            let failed_now = m.retried.load(Ordering::Relaxed);
            let observation = Observation {
                now,
                backlog: shared.server_pending.load(Ordering::Relaxed)
                    + (stats.waiting - stats.blocked.min(stats.waiting)) as u64,
                runnable_keys: shared.ordered().then_some(stats.runnable + stats.running),
                workers: pool.live(),
                busy: pool.busy(),
                completed: done_now - completed,
                failed: failed_now - failed,
                elapsed: now.duration_since(last),
            };
            (completed, failed, last) = (done_now, failed_now, now);
            let decision = scaler.decide(&observation);
            m.target_workers
                .store(decision.target as i64, Ordering::Relaxed);
            if decision.target != pool.target() {
                let grow = decision.target > pool.target();
                HandlerMetrics::incr(if grow { &m.scale_ups } else { &m.scale_downs });
                tracing::debug!(
                    handler = %shared.name,
                    from = pool.target(),
                    to = decision.target,
                    reason = decision.reason.as_str(),
                    backlog = observation.backlog,
                    busy = observation.busy,
                    "scaling"
                );
                pool.set_target(decision.target);
            }
        } else {
            m.target_workers
                .store(pool.target() as i64, Ordering::Relaxed);
        }
        spawn_workers(&shared, &workers, &abort);
    }
}

/// The consumer's `num_pending` as the server sees it.
async fn server_pending(shared: &Shared) -> Option<u64> {
    let mut consumer: consumer::PullConsumer = shared
        .js
        .get_consumer_from_stream(&shared.config.consumer, &shared.config.stream)
        .await
        .ok()?;
    consumer.info().await.ok().map(|info| info.num_pending)
}

/// Sleeps for `d`; returns true if shutdown came first.
async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}
