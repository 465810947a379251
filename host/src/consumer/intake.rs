//! A handler's consumer side while it runs ([`Intake`]): its workers and background tasks,
//! the bindings that feed them, and the drain.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::binding::{self, Binding, Kind};
use super::delivery::Delivery;
use super::job::Job;
use super::puller::{self, Pulled, Puller};
use super::{partition, scale, spawn_workers, sweep, worker, Shared};
use crate::fence::Fence;

/// One handler's consumer side while it runs: the workers and background tasks, and the
/// bindings that feed them. `host` drives it: [`Intake::run_durable`] for an unpartitioned
/// handler, or the partition group attaching and releasing bindings ([`Intake::attach`]);
/// then [`Intake::drain`].
pub struct Intake {
    pub(super) shared: Arc<Shared>,
    pub(super) workers: TaskTracker,
    pub(super) fetches: TaskTracker,
    pub(super) aux: TaskTracker,
    pub(super) background: CancellationToken,
    /// Cancels running handlers at the drain deadline.
    pub(super) abort: CancellationToken,
    /// Deliveries in transit when the durable's fetch loop stopped, to hand back.
    pub(super) returned: Mutex<Vec<Delivery>>,
    pub(super) stale: partition::StaleConsumers,
    /// Partition bindings given up at once while messages of theirs were still held.
    pub(super) fenced: Mutex<Vec<Arc<Binding>>>,
}

impl Intake {
    /// Starts the workers, the scale task and the sweep.
    pub fn start(shared: Arc<Shared>) -> Intake {
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
        Intake {
            shared,
            workers,
            fetches: TaskTracker::new(),
            aux,
            background,
            abort,
            returned: Mutex::new(Vec::new()),
            stale: partition::StaleConsumers::default(),
            fenced: Mutex::new(Vec::new()),
        }
    }

    /// Forgets which messages were settled: the next bindings read another stream, whose
    /// sequences start over (a new partition generation).
    pub fn forget_settled(&self) {
        self.shared.recent.clear();
    }

    /// The handler's shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Pulls the handler's durable consumer (or receives its push deliveries) until
    /// `shutdown`.
    pub async fn run_durable(&self, shutdown: &CancellationToken) {
        let shared = &self.shared;
        let binding = Arc::new(Binding::new(
            shared.config.consumer.clone(),
            shared.stream.clone(),
            Kind::Durable,
            Arc::new(Fence::forever()),
            None,
        ));
        shared.register(&binding);
        if matches!(
            shared.config.consumer_kind,
            crate::config::ConsumerKind::PushQueue { .. }
        ) {
            let returned = super::push::receive(shared, &binding, shutdown).await;
            let mut held = self.returned.lock().unwrap_or_else(|p| p.into_inner());
            held.extend(returned);
            return;
        }
        let mut puller = loop {
            match Puller::new(&shared.client, &shared.stream, &shared.config.consumer).await {
                Ok(p) => break p,
                Err(err) => {
                    tracing::warn!(handler = %shared.name, "cannot subscribe for pull requests: {err:#}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        };
        binding::fetch(shared, &binding, &mut puller, shutdown).await;
        // Stop receiving before anything is handed back, so nothing nak'ed is redelivered to
        // this host's own requests; keep what is still on its way.
        let returned = close_and_collect(&mut puller, true).await;
        let mut held = self.returned.lock().unwrap_or_else(|p| p.into_inner());
        held.extend(returned);
    }

    /// Stops pulling, hands back what was not started, lets running messages finish until
    /// `drain_timeout` (then cancels and hands them back), and confirms the last acks.
    pub async fn drain(self, drain_timeout: Duration) {
        let shared = self.shared.clone();
        shared.draining.store(true, Ordering::Relaxed);
        shared.breaker_changed.notify_waiters();
        let held: usize = shared.bindings().iter().map(|b| b.held()).sum();
        tracing::info!(handler = %shared.name, held, "draining");
        self.background.cancel();
        self.aux.wait().await;
        self.fetches.close();
        self.fetches.wait().await;
        shared.executor.close();
        let durable = shared
            .bindings()
            .into_iter()
            .find(|b| b.kind == Kind::Durable);
        let returned =
            std::mem::take(&mut *self.returned.lock().unwrap_or_else(|p| p.into_inner()));
        let mut jobs: Vec<Job> = Vec::new();
        if let Some(binding) = &durable {
            jobs.extend(
                returned
                    .into_iter()
                    .map(|delivery| Job::new(delivery, binding.clone())),
            );
        }
        let waiting = shared.executor.take_waiting();
        let counted = waiting.len();
        jobs.extend(waiting);
        hand_back(&shared, jobs, counted).await;
        self.workers.close();
        if tokio::time::timeout(drain_timeout, self.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!(handler = %shared.name, "drain timeout reached; handing back running messages");
            self.abort.cancel();
            self.workers.wait().await;
        }
        if let Err(err) = shared.client.flush().await {
            tracing::warn!("final flush failed: {err}");
        }
        tracing::info!(handler = %shared.name, "drained");
    }
}

/// Hands `jobs` back for immediate redelivery, recording that they did not run. The first
/// `held` of them were counted as held by their binding (the rest arrived after the fetch
/// loop stopped).
async fn hand_back(shared: &Arc<Shared>, jobs: Vec<Job>, held: usize) {
    if jobs.is_empty() {
        return;
    }
    let count = jobs.len();
    // The ledger for all of them at once...
    let mut jobs: Vec<(Job, bool)> =
        futures::future::join_all(jobs.into_iter().enumerate().map(|(i, mut job)| {
            let shared = shared.clone();
            async move {
                if job.binding.kind == Kind::Durable {
                    shared.attempts.recall(&mut job, None).await;
                    shared.attempts.record_hand_back(&mut job).await;
                }
                (job, i < held)
            }
        }))
        .await;
    // ...then the naks one at a time, in stream order: JetStream redelivers nak'ed messages
    // in the order the naks arrived, and a key's messages must come back in theirs.
    jobs.sort_by_key(|(job, _)| job.delivery.stream_sequence);
    for (job, counted) in &jobs {
        if job.binding.kind == Kind::Durable {
            worker::nak(shared, &job.delivery, Duration::ZERO, true).await;
        }
        // A partition's messages need no nak: its consumer is deleted and the next owner
        // replays them.
        if *counted {
            job.binding.release_one(shared);
        }
    }
    shared
        .metrics
        .handed_back
        .fetch_add(count as u64, Ordering::Relaxed);
    tracing::info!(handler = %shared.name, count, "handed back messages that had not started");
}

/// Closes the pull subscription and waits (a few seconds at most) for what is still in
/// transit; returns it when `keep`.
///
/// With `keep` (the durable, whose consumer lives on), the subscription stays open until every
/// pull request sent has ended (filled, or expired with its 408), collecting what they still
/// deliver: a message the server sends to an inbox nobody reads any more is lost until
/// AckWait, and then comes back behind later messages of its key. Unsubscribing is not enough
/// to close the window: the client forgets the subscription once its UNSUB is written, and drops
/// what the server had sent before reading it.
pub(super) async fn close_and_collect(puller: &mut Puller, keep: bool) -> Vec<Delivery> {
    let mut out = Vec::new();
    if keep {
        let deadline = tokio::time::Instant::now() + puller::EXPIRES + puller::HEARTBEAT;
        while puller.outstanding() > 0 {
            match tokio::time::timeout_at(deadline, puller.next()).await {
                Ok(Pulled::Message(message)) => out.extend(Delivery::parse(message, false).ok()),
                Ok(Pulled::Closed) => return out,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    let deadline = tokio::time::Instant::now() + puller::EXPIRES;
    puller.close().await;
    loop {
        match tokio::time::timeout_at(deadline, puller.next()).await {
            Ok(Pulled::Message(message)) if keep => {
                out.extend(Delivery::parse(message, false).ok());
            }
            Ok(Pulled::Closed) | Err(_) => break,
            Ok(_) => {}
        }
    }
    out
}
