//! The JetStream side of a handler: the bindings it pulls (its durable consumer, or the
//! partitions this host holds), the keyed executor they feed, the autoscaled worker pool that
//! runs them, the keep-alive sweep, and the drain on shutdown.
//!
//! Invariants:
//! - Only this module acknowledges messages (through [`delivery::Delivery`]).
//! - A message is acked only after its handler succeeded and every publish it staged was
//!   stored ([`worker`], [`outputs`]), and only while its binding's fence holds.
//! - The host holds at most its capacity (ordered: `max_buffered`; unordered: `prefetch`, by
//!   default a few messages per worker), shared evenly by its bindings, plus a few after a
//!   pull reset. At `max_keys` distinct keys, or while the circuit breaker is open, it stops
//!   pulling; it never drops. (A push consumer, `consumer_kind = "push-queue"`, cannot be
//!   sized so: the host holds what the server sends, up to the consumer's `max_ack_pending`.)
//! - No held message goes half an AckWait without JetStream hearing of it: running ones get
//!   progress acks from their worker, waiting ones from the sweeper (which looks every quarter
//!   AckWait for messages untouched for a quarter).
//! - On shutdown it stops pulling at once, hands back (nak, no delay) what it has not started
//!   (recording in the attempts ledger that those deliveries did not run), lets running
//!   messages finish until the drain deadline, confirms its final acks, and naks whatever is
//!   still running at the deadline. Nothing is left waiting for AckWait.

mod attempts;
pub mod binding;
mod breaker;
pub mod delivery;
mod intake;
mod job;
mod outputs;
mod partition;
mod prefetch;
mod puller;
mod push;
mod recent;
pub mod settle;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use async_nats::Client;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::capabilities::Backend;
use crate::config::HandlerConfig;
use crate::executor::{Executor, Ticket};
use crate::pool::Pool;
use crate::runtime::{HandlerModule, ModuleSlot, Outcome};
use crate::scaler::{Observation, Scaler, ScalerConfig};
use crate::telemetry::HandlerMetrics;
pub use attempts::Attempts;
use binding::{Binding, Kind};
pub use breaker::BreakerConfig;
use breaker::{Admit, Breaker, Change};
pub use intake::Intake;
use job::Job;
pub use partition::{consumer_name as partition_consumer, Attached, Claim, Released};
use recent::RecentlySettled;
use worker::Settled;

/// How often the scaler looks and the gauges are refreshed: each tick is one measurement
/// window of the pool size, so a backlog takes about four of them to reach `max_workers`.
const SCALE_TICK: Duration = Duration::from_millis(100);

/// How often the consumer's server-side backlog is read (it also comes free with messages).
const INFO_EVERY: Duration = Duration::from_secs(1);
/// How long an autoscaled pool holds the size it settled at before probing a larger one.
const PLATEAU_HOLD: Duration = Duration::from_secs(10);

/// Everything the fetch loops, the workers and the background tasks of one handler share.
pub struct Shared {
    /// Handler name.
    pub name: Arc<str>,
    /// The loaded module, replaceable while messages run (a hot swap: see `runtime::slot`).
    pub module: ModuleSlot,
    /// Its configuration.
    pub config: HandlerConfig,
    /// The NATS connection (acks go through it).
    pub client: Client,
    /// JetStream context (dead-letter publishes, consumer info).
    pub js: jetstream::Context,
    /// Where staged publishes are sent.
    pub backend: Arc<dyn Backend>,
    /// Name of the handler's stream (what the guest sees).
    pub stream: Arc<str>,
    /// Counters.
    pub metrics: Arc<HandlerMetrics>,
    /// Messages waiting for or running on a worker.
    pub executor: Executor<Job>,
    /// The workers.
    pub pool: Pool,
    /// Failed executions and hand-backs per message.
    pub attempts: Attempts,
    recent: RecentlySettled,
    breaker: Mutex<Breaker>,
    breaker_open: AtomicBool,
    /// Whether the breaker has counted failures since the last success (while not, a success
    /// needs no lock).
    failing: AtomicBool,
    active_bindings: AtomicUsize,
    breaker_changed: Notify,
    draining: AtomicBool,
    bindings: Mutex<Vec<Arc<Binding>>>,
    server_pending: AtomicU64,
    /// Messages settled successfully per second, smoothed over the ticks (sizes the default
    /// prefetch, see [`Shared::capacity`]).
    completion_rate: AtomicU64,
}

impl Shared {
    /// Bundles a handler's parts.
    pub fn new(
        module: HandlerModule,
        config: HandlerConfig,
        client: Client,
        js: jetstream::Context,
        backend: Arc<dyn Backend>,
        attempts: Attempts,
        metrics: Arc<HandlerMetrics>,
    ) -> Shared {
        Shared {
            name: config.name.as_str().into(),
            stream: config.stream.as_str().into(),
            pool: Pool::new(config.min_workers, config.max_workers),
            executor: Executor::new(),
            breaker: Mutex::new(Breaker::new(config.breaker)),
            module: ModuleSlot::new(module),
            config,
            client,
            js,
            backend,
            attempts,
            metrics,
            recent: RecentlySettled::default(),
            breaker_open: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            active_bindings: AtomicUsize::new(0),
            breaker_changed: Notify::new(),
            draining: AtomicBool::new(false),
            bindings: Mutex::new(Vec::new()),
            server_pending: AtomicU64::new(0),
            completion_rate: AtomicU64::new(0),
        }
    }

    /// Acknowledgements are confirmed by the server while draining, for a binding whose
    /// fetch loop stopped (a partition being released: its consumer is deleted next), and
    /// always on a partition: a plain ack can be lost (a dropped connection, a consumer
    /// leader change), and if its partition then moves, the next owner runs the message
    /// again after the key's later ones. A confirmed ack is replicated before the reply, and
    /// the key's next message starts only after it.
    fn confirm_acks(&self, binding: &Binding) -> bool {
        binding.sourced() || self.draining.load(Ordering::Relaxed) || binding.stop.is_cancelled()
    }

    fn ordered(&self) -> bool {
        self.config.ordering.is_ordered()
    }

    /// How many messages the host may hold now, over all its bindings.
    fn capacity(&self) -> usize {
        if self.ordered() {
            // Messages of busy keys wait here while other keys run: buffer up to the cap.
            return self.config.max_buffered;
        }
        // Unordered messages never wait for a key; holding a few per worker, or what the pool
        // completes in `prefetch::HORIZON` when that is more, hides a pull round trip without
        // hoarding (another host can take what this one could not start soon). A fast handler
        // needs the horizon: a pull per handful of messages costs more than the handler.
        let target = self.pool.target();
        let wanted = match self.config.prefetch {
            Some(prefetch) => (2 * target).max(prefetch),
            None => prefetch::default(target, self.completion_rate.load(Ordering::Relaxed)),
        };
        wanted.min(self.config.max_buffered)
    }

    fn bindings_active(&self) -> usize {
        self.active_bindings.load(Ordering::Relaxed)
    }

    fn lock_bindings(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Binding>>> {
        self.bindings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, binding: &Arc<Binding>) {
        let mut bindings = self.lock_bindings();
        bindings.push(binding.clone());
        self.active_bindings
            .store(bindings.len(), Ordering::Relaxed);
    }

    fn unregister(&self, binding: &Arc<Binding>) {
        let mut bindings = self.lock_bindings();
        bindings.retain(|b| !Arc::ptr_eq(b, binding));
        self.active_bindings
            .store(bindings.len(), Ordering::Relaxed);
    }

    /// The bindings pulled now (for status and gauges).
    pub fn bindings(&self) -> Vec<Arc<Binding>> {
        self.lock_bindings().clone()
    }

    /// How many messages a binding may request while the breaker is open: none, except one
    /// when the handler holds nothing (the next probe needs a message).
    fn breaker_pull_limit(&self) -> Option<usize> {
        if !self.breaker_open.load(Ordering::Relaxed) {
            return None;
        }
        let held: usize = self.lock_bindings().iter().map(|b| b.held()).sum();
        Some(usize::from(held == 0))
    }

    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the breaker lets this worker start a message (at once while it is closed).
    async fn breaker_admits(&self) {
        while self.breaker_open.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed) {
            let changed = self.breaker_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let admit = self.lock_breaker().admit(Instant::now());
            match admit {
                Admit::Run => return,
                Admit::WaitUntil(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = changed => {}
                    }
                }
                Admit::Hold => changed.await,
            }
        }
    }

    /// Tells the breaker how an execution ended. A failure counts toward tripping only when
    /// `counts` (a message's second or later failed attempt, or its last); while the breaker
    /// is open every result counts (it is a probe's).
    fn record_execution(&self, outcome: &Outcome, counts: bool) {
        let ok = *outcome == Outcome::Success;
        if !ok && !counts && !self.breaker_open.load(Ordering::Relaxed) {
            return;
        }
        if ok && !self.breaker_open.load(Ordering::Relaxed) {
            // The common case: a success with the breaker closed only resets the count, and
            // with no failure counted since the last success there is nothing to reset.
            if self.failing.swap(false, Ordering::Relaxed) {
                self.lock_breaker().record(true, Instant::now());
            }
            return;
        }
        if !ok {
            self.failing.store(true, Ordering::Relaxed);
        }
        let change = self.lock_breaker().record(ok, Instant::now());
        match change {
            Some(Change::Opened {
                next_probe,
                tripped,
            }) => {
                self.breaker_open.store(true, Ordering::Relaxed);
                self.metrics.breaker_open.store(1, Ordering::Relaxed);
                self.metrics.lifecycle.trip(format!(
                    "circuit breaker open after {} failed executions in a row; last error: {}",
                    self.config.breaker.trip_after,
                    describe(outcome)
                ));
                if tripped {
                    HandlerMetrics::incr(&self.metrics.breaker_trips);
                    tracing::error!(
                        handler = %self.name,
                        last_error = %describe(outcome),
                        "circuit breaker OPEN: the last {} executions all failed; pulling stops, \
                         held messages wait, and one message is tried again in {next_probe:?} \
                         (then at doubling intervals) until one succeeds",
                        self.config.breaker.trip_after
                    );
                } else {
                    tracing::warn!(handler = %self.name, last_error = %describe(outcome), "circuit breaker probe failed; next probe in {next_probe:?}");
                }
            }
            Some(Change::Closed) => {
                self.breaker_open.store(false, Ordering::Relaxed);
                self.metrics.breaker_open.store(0, Ordering::Relaxed);
                if !self.draining.load(Ordering::Relaxed) {
                    self.metrics
                        .lifecycle
                        .set(crate::health::HandlerState::Running);
                }
                tracing::info!(handler = %self.name, "circuit breaker closed: a probe succeeded; pulling again");
            }
            None => return,
        }
        self.breaker_changed.notify_waiters();
    }

    /// A message admitted as the breaker's probe ended without running.
    fn probe_abandoned(&self) {
        if self.breaker_open.load(Ordering::Relaxed) {
            self.lock_breaker().probe_abandoned(Instant::now());
            self.breaker_changed.notify_waiters();
        }
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Success => "none".to_owned(),
        Outcome::Retry { reason, .. } => format!("retry: {reason}"),
        Outcome::Reject { reason } => format!("reject: {reason}"),
        Outcome::Failed(f) => format!("{}: {}", f.kind.as_str(), f.reason),
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
    if let crate::config::ConsumerKind::PushQueue { deliver_group } = &config.consumer_kind {
        return push::ensure(&stream, config, deliver_group).await;
    }
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

/// Spawns workers until the pool reaches its target.
fn spawn_workers(shared: &Arc<Shared>, workers: &TaskTracker, abort: &CancellationToken) {
    for _ in 0..shared.pool.claim_spawns() {
        workers.spawn(work(shared.clone(), abort.clone(), workers.clone()));
    }
}

/// One worker: takes the next runnable message, runs and settles it, until retired or closed.
async fn work(shared: Arc<Shared>, abort: CancellationToken, tasks: TaskTracker) {
    // This worker's copy of the module, with its warm instance under `isolation = "reuse"`.
    let mut module = shared.module.load();
    loop {
        if shared.pool.try_retire() {
            return;
        }
        shared.breaker_admits().await;
        let ticket = tokio::select! {
            biased;
            ticket = shared.executor.next() => ticket,
            _ = shared.pool.shrunk() => {
                shared.probe_abandoned();
                continue;
            }
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
        // After a swap, this message and the later ones run on the new module.
        shared.module.refresh(&mut module);
        let settled = {
            let _busy = shared.pool.busy_guard();
            worker::process(&shared, &mut job, &mut module, &abort).await
        };
        let binding = job.binding.clone();
        match (settled, &key) {
            (Settled::RetryAt { .. }, _) if binding.stop.is_cancelled() && binding.sourced() => {
                // Its partition is being released or was fenced: the next owner runs it.
                shared.executor.done(key.as_ref(), seq);
                binding.release_one(&shared);
            }
            (Settled::RetryAt { at, blocked }, Some(key))
                if !shared.draining.load(Ordering::Relaxed) =>
            {
                shared.executor.retry(key, seq, job, at, blocked);
            }
            (Settled::RetryAt { .. }, _) => {
                // Draining: the executor no longer runs anything, so hand it back. (`process`
                // never asks an unordered message to be retried in place; should it, the
                // message is handed back too rather than lost.)
                if binding.kind == Kind::Durable {
                    worker::nak(&shared, &job.delivery, Duration::ZERO, true).await;
                }
                shared.executor.done(None, seq);
                binding.release_one(&shared);
            }
            (Settled::Confirming, _) => {
                // The key stays taken until the ack is confirmed; the worker moves on. The
                // workers' tracker owns the task, so a drain waits for it.
                let (shared, key) = (shared.clone(), key.clone());
                tasks.spawn(async move {
                    worker::confirm(&shared, &mut job).await;
                    shared.executor.done(key.as_ref(), seq);
                    binding.release_one(&shared);
                });
            }
            (Settled::Done | Settled::Dropped, _) => {
                shared.executor.done(key.as_ref(), seq);
                binding.release_one(&shared);
            }
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
            if now.duration_since(job.touched) >= quarter && job.binding.fence.holds(now) {
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
        plateau_hold: PLATEAU_HOLD,
        cores: crate::cpu::cores(),
    });
    let m = &shared.metrics;
    let mut ticker = tokio::time::interval(SCALE_TICK);
    let mut last = Instant::now();
    let mut last_info: Option<Instant> = None;
    let mut completed = m.succeeded.load(Ordering::Relaxed);
    let mut failed = m.retried.load(Ordering::Relaxed);
    // Process-wide: the scaler compares it with the cores to see a CPU-bound pool.
    let mut cpu = autoscaled.then(crate::cpu::process_time).flatten();
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
        // One reading per tick serves the prefetch default and the autoscaler alike.
        let done_now = m.succeeded.load(Ordering::Relaxed);
        let done = done_now.saturating_sub(completed);
        let elapsed = now.duration_since(last);
        let rate = prefetch::smoothed(
            shared.completion_rate.load(Ordering::Relaxed),
            done,
            elapsed,
        );
        shared.completion_rate.store(rate, Ordering::Relaxed);
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
            let failed_now = m.retried.load(Ordering::Relaxed);
            let cpu_now = crate::cpu::process_time();
            let observation = Observation {
                now,
                backlog: backlog(&shared)
                    + (stats.waiting - stats.blocked.min(stats.waiting)) as u64,
                runnable_keys: shared.ordered().then_some(stats.runnable + stats.running),
                workers: pool.live(),
                busy: pool.busy(),
                ready: stats.runnable,
                completed: done,
                failed: failed_now - failed,
                elapsed,
                cpu: cpu.zip(cpu_now).map(|(a, b)| b.saturating_sub(a)),
            };
            (failed, cpu) = (failed_now, cpu_now);
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
        (completed, last) = (done_now, now);
        spawn_workers(&shared, &workers, &abort);
        // Spawned workers count as live at once: show the new size now, not a tick later.
        m.workers.store(pool.live() as i64, Ordering::Relaxed);
    }
}

/// The backlog on the server for this host: the durable consumer's pending count, or the sum
/// of the owned partitions' pending counts at their last deliveries.
fn backlog(shared: &Shared) -> u64 {
    let bindings = shared.bindings();
    if bindings.iter().any(|b| b.kind == Kind::Durable) {
        return shared.server_pending.load(Ordering::Relaxed);
    }
    bindings
        .iter()
        .map(|b| b.pending.load(Ordering::Relaxed))
        .sum()
}

/// The durable consumer's `num_pending` as the server sees it (partitions report theirs with
/// every delivery).
async fn server_pending(shared: &Shared) -> Option<u64> {
    if !shared.bindings().iter().any(|b| b.kind == Kind::Durable) {
        return None;
    }
    let mut consumer: consumer::PullConsumer = shared
        .js
        .get_consumer_from_stream(&shared.config.consumer, &shared.config.stream)
        .await
        .ok()?;
    consumer.info().await.ok().map(|info| info.num_pending)
}
