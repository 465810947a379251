//! The message path: run one held message through its handler, decide what that means, and
//! apply the decision.
//!
//! Order of events for a message (the contract the rest of the host relies on):
//! 1. nothing runs unless its binding's fence holds (a partition whose lease this host lost
//!    is given up without a word to JetStream: the next owner replays it);
//! 2. the attempts ledger is consulted, then [`settle::before_run`] sends a message whose
//!    ordering key cannot be computed, or whose attempts executions that did not finish used
//!    up, straight to the dead-letter path;
//! 3. the handler runs in a fresh instance (or the worker's warm one under
//!    `isolation = "reuse"`); while it runs, a progress ack is sent every half AckWait;
//! 4. on success its staged publishes are sent and confirmed ([`outputs::deliver`]); one that
//!    is not stored turns the success into a retry;
//! 5. [`settle::decide`] chooses ack, retry (in place when ordered, else nak with the delay)
//!    or dead-letter and term; [`apply`] carries it out: the fence is checked once more before
//!    anything is acknowledged, failures are recorded in the ledger, and the breaker hears of
//!    every execution's result.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::delivery::{header_params, AckError, Delivery};
use super::job::Job;
use super::settle::{self, DeadLetterCause, Disposition, Mode, Recorded};
use super::{outputs, Shared};
use crate::backoff::OnExhausted;
use crate::runtime::{FailureKind, GuestMessage, Invoked, Loaded, Outcome};
use crate::telemetry::HandlerMetrics;

/// What became of a message after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acked, nak'ed or dead-lettered: JetStream has it back; the host lets go.
    Done,
    /// Run it again in place at this instant, its key blocked meanwhile. `blocked` marks a
    /// message that used up its attempts under `on_exhausted = "block"`.
    RetryAt {
        /// When.
        at: Instant,
        /// Whether the key is blocked for good (until a success).
        blocked: bool,
    },
    /// Given up without settling: its binding's fence no longer holds (the partition's next
    /// owner replays it), or the binding is being released and the message did not finish.
    Dropped,
    /// Succeeded on a partition: its ack must be confirmed before the key's next message
    /// starts, which [`confirm`] does apart, so the worker can take another key meanwhile.
    Confirming,
}

/// Runs and settles one attempt of a held message. `drain` aborts a running handler at the
/// drain deadline; the message is then nak'ed so another host takes it at once.
pub async fn process(
    shared: &Shared,
    job: &mut Job,
    module: &mut Loaded,
    drain: &CancellationToken,
) -> Settled {
    let span = tracing::info_span!(
        "message",
        handler = %shared.name,
        subject = %job.delivery.subject(),
        stream_seq = job.delivery.origin_sequence,
        attempt = tracing::field::Empty,
    );
    // Trace context: the input's traceparent parents this span; publishes carry it on.
    let outgoing = crate::trace::adopt(&span, job.delivery.message.headers.as_ref());
    crate::trace::scope(outgoing, process_in_span(shared, job, module, drain))
        .instrument(span)
        .await
}

/// What running the handler came to.
enum Ran {
    /// It finished (outputs stored, if it succeeded).
    Finished { outcome: Outcome, elapsed: Duration },
    /// The drain deadline cut it short: hand it back.
    Drained,
    /// Its binding was fenced or released past its deadline: drop it.
    Aborted,
}

async fn process_in_span(
    shared: &Shared,
    job: &mut Job,
    module: &mut Loaded,
    drain: &CancellationToken,
) -> Settled {
    if !job.binding.fence.holds(Instant::now()) {
        HandlerMetrics::incr(&shared.metrics.fenced_messages);
        return Settled::Dropped;
    }
    let binding = job.binding.clone();
    shared.attempts.recall(job, binding.recalled.as_ref()).await;
    let attempt = job.attempt();
    tracing::Span::current().record("attempt", attempt);
    let m = &shared.metrics;
    m.record_queue_wait(job.queued.elapsed());
    HandlerMetrics::incr(&m.received);
    if attempt > 1 {
        HandlerMetrics::incr(&m.redelivered);
    }
    let policy = &shared.config.retry;
    let mode = Mode {
        ordered: shared.ordered(),
        block: shared.ordered() && shared.config.on_exhausted == OnExhausted::Block,
    };
    if let Some(disposition) = settle::before_run(job.key_error.take(), attempt, policy, mode) {
        return apply(shared, job, attempt, disposition, None).await;
    }
    match run(shared, job, attempt, module, drain).await {
        Ran::Finished { outcome, elapsed } => {
            m.record_handler_duration(elapsed);
            // A retry in place waits in the executor again: its next queue wait starts now.
            job.queued = Instant::now();
            match &outcome {
                Outcome::Failed(f) if f.kind == FailureKind::Timeout => {
                    HandlerMetrics::incr(&m.timeouts)
                }
                Outcome::Failed(_) => HandlerMetrics::incr(&m.traps),
                _ => {}
            }
            tracing::debug!(?elapsed, "handled");
            let disposition = settle::decide(&outcome, attempt, policy, mode, fastrand::f64());
            apply(shared, job, attempt, disposition, Some(&outcome)).await
        }
        Ran::Drained => {
            tracing::info!(
                "drain deadline reached while the handler ran; handing the message back"
            );
            nak(shared, &job.delivery, Duration::ZERO, true).await;
            shared.probe_abandoned();
            Settled::Done
        }
        Ran::Aborted => {
            HandlerMetrics::incr(&m.fenced_messages);
            shared.probe_abandoned();
            Settled::Dropped
        }
    }
}

/// Runs the handler and, if it succeeded, stores its outputs.
async fn run(
    shared: &Shared,
    job: &mut Job,
    attempt: u32,
    module: &mut Loaded,
    drain: &CancellationToken,
) -> Ran {
    let delivery = &job.delivery;
    let abort = &job.binding.abort;
    let invoked = {
        let grouped = delivery.grouped_headers();
        let headers = header_params(&grouped);
        let msg = GuestMessage {
            subject: delivery.subject(),
            payload: &delivery.message.payload,
            headers: &headers,
            stream: &shared.stream,
            sequence: delivery.origin_sequence,
            attempt,
            published_unix_nanos: delivery.published_unix_nanos,
            handler: &shared.name,
        };
        let fence = job.binding.sourced().then(|| job.binding.fence.clone());
        let invocation = module.invoke_fenced(msg, shared.stream.clone(), fence);
        tokio::select! {
            biased;
            invoked = keep_alive(shared, delivery, &mut job.touched, invocation) => invoked,
            _ = drain.cancelled() => return Ran::Drained,
            _ = abort.cancelled() => return Ran::Aborted,
        }
    };
    let Invoked {
        mut outcome,
        publishes,
        elapsed,
    } = invoked;
    if outcome == Outcome::Success && !publishes.is_empty() {
        if !job.binding.fence.holds(Instant::now()) {
            // The lease was lost while the handler ran: its outputs must not land.
            return Ran::Aborted;
        }
        let delivering = outputs::deliver(
            shared.backend.as_ref(),
            &publishes,
            shared.config.limits.timeout,
            &shared.metrics,
        );
        let delivered = tokio::select! {
            biased;
            delivered = keep_alive(shared, delivery, &mut job.touched, delivering) => delivered,
            _ = drain.cancelled() => return Ran::Drained,
            _ = abort.cancelled() => return Ran::Aborted,
        };
        match delivered {
            Ok(_) => {
                shared
                    .metrics
                    .published
                    .fetch_add(publishes.len() as u64, Ordering::Relaxed);
            }
            Err(reason) => {
                outcome = Outcome::Retry {
                    reason,
                    delay: None,
                }
            }
        }
    }
    Ran::Finished { outcome, elapsed }
}

/// Carries out `disposition` for `job`. `outcome` is the execution's, when the handler ran
/// (the breaker hears of it).
async fn apply(
    shared: &Shared,
    job: &mut Job,
    attempt: u32,
    disposition: Disposition,
    outcome: Option<&Outcome>,
) -> Settled {
    if let Some(outcome) = outcome {
        // A first failure that will be retried says little (a message that fails once and
        // then succeeds is not a broken handler): the breaker counts repeated and final ones.
        let counts = attempt > 1 || matches!(disposition, Disposition::DeadLetter(_));
        shared.record_execution(outcome, counts);
    }
    let m = &shared.metrics;
    if !job.binding.fence.holds(Instant::now()) {
        // The lease was lost while the handler ran: nothing of this run may land.
        HandlerMetrics::incr(&m.fenced_messages);
        return Settled::Dropped;
    }
    let confirm = shared.confirm_acks(&job.binding);
    match disposition {
        Disposition::Ack if job.binding.sourced() => Settled::Confirming,
        Disposition::Ack => {
            acked(shared, job, confirm).await;
            Settled::Done
        }
        Disposition::RetryInPlace { delay, blocked } => {
            HandlerMetrics::incr(&m.retried);
            if blocked && attempt == shared.config.retry.max_attempts {
                tracing::error!(
                    "key BLOCKED: the message used its {} attempts and on_exhausted = \"block\"; \
                     it is retried until it succeeds and the key's later messages wait",
                    shared.config.retry.max_attempts,
                );
            }
            warn_failed(outcome, delay, "in place, its key waiting");
            shared.attempts.record_failure(job).await;
            Settled::RetryAt {
                at: Instant::now() + delay,
                blocked,
            }
        }
        Disposition::Nak(delay) => {
            HandlerMetrics::incr(&m.retried);
            warn_failed(outcome, delay, "after a nak");
            shared.attempts.record_failure(job).await;
            nak(shared, &job.delivery, delay, confirm).await;
            Settled::Done
        }
        Disposition::DeadLetter(cause) => {
            dead_letter_and_term(shared, job, attempt, &cause, confirm).await;
            Settled::Done
        }
    }
}

/// Acknowledges a message that succeeded on a partition, confirmed (after
/// [`Settled::Confirming`]); the caller frees its key afterwards.
pub async fn confirm(shared: &Shared, job: &mut Job) {
    acked(shared, job, true).await;
}

/// Acknowledges a message that succeeded and records it.
async fn acked(shared: &Shared, job: &mut Job, confirm: bool) {
    let m = &shared.metrics;
    match ack(shared, job, confirm).await {
        Ok(()) => {
            HandlerMetrics::incr(&m.succeeded);
            m.latency.record(job.delivery.since_published());
            settled(shared, job);
        }
        Err(err) => {
            // It ran and its outputs are stored: when JetStream sends it again, it is
            // acknowledged again, not run again.
            shared.recent.insert(job.delivery.stream_sequence);
            ack_failed(shared, "ack", &err)
        }
    }
    shared.attempts.forget(job).await;
}

/// Acknowledges a message that succeeded. On a partition the key's next message must not
/// start before this ack is durable, so a confirmation that fails (no consumer leader for a
/// moment) is sent again while the fence holds and the binding is not aborted.
async fn ack(shared: &Shared, job: &Job, confirm: bool) -> Result<(), AckError> {
    let mut delay = Duration::from_millis(50);
    loop {
        match job.delivery.ack(&shared.client, confirm).await {
            Ok(()) => return Ok(()),
            Err(err)
                if job.binding.sourced()
                    && job.binding.fence.holds(Instant::now())
                    && !job.binding.abort.is_cancelled() =>
            {
                HandlerMetrics::incr(&shared.metrics.ack_failures);
                tracing::debug!("ack not confirmed ({err}); sending it again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(err) => return Err(err),
        }
    }
}

fn warn_failed(outcome: Option<&Outcome>, delay: Duration, how: &str) {
    let (kind, reason) = match outcome {
        Some(Outcome::Retry { reason, .. }) => ("retry", reason.as_str()),
        Some(Outcome::Failed(f)) => (f.kind.as_str(), f.reason.as_str()),
        Some(Outcome::Reject { reason }) => ("reject", reason.as_str()),
        Some(Outcome::Success) | None => ("retry", "outputs not stored"),
    };
    tracing::warn!(
        kind,
        %reason,
        "attempt failed; retrying in {} {how}",
        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
    );
}

/// Records a final settlement: the release barrier's reference and the recently-settled
/// table (so a redelivery of this message is recognised).
fn settled(shared: &Shared, job: &Job) {
    job.binding.note_settled(&job.delivery);
    shared.recent.insert(job.delivery.stream_sequence);
}

/// Polls `work` to completion, sending a progress ack whenever half an AckWait has passed
/// since JetStream last heard of the message (`touched`, which it updates).
async fn keep_alive<F: std::future::Future>(
    shared: &Shared,
    delivery: &Delivery,
    touched: &mut Instant,
    work: F,
) -> F::Output {
    let half = shared.config.ack_wait / 2;
    tokio::pin!(work);
    loop {
        let due = tokio::time::Instant::from_std(*touched + half);
        tokio::select! {
            // Work first: a call that finishes at once never registers the timer.
            biased;
            output = &mut work => return output,
            _ = tokio::time::sleep_until(due) => {
                *touched = Instant::now();
                HandlerMetrics::incr(&shared.metrics.progress_acks);
                if let Err(err) = delivery.progress(&shared.client).await {
                    tracing::warn!("progress ack failed: {err}");
                }
            }
        }
    }
}

/// Publishes to the dead-letter subject (when configured) and terminates the message. If the
/// record cannot be stored the message is nak'ed instead, so it is never lost: it comes back
/// later and is dead-lettered then (its attempts are used up, so it does not run again).
/// A record too large for the server is stored without the payload rather than never.
async fn dead_letter_and_term(
    shared: &Shared,
    job: &mut Job,
    attempts: u32,
    cause: &DeadLetterCause,
    confirm: bool,
) {
    let delivery = &job.delivery;
    match &shared.config.dead_letter {
        Some(subject) => {
            let stored = settle::dead_letter(
                &shared.js,
                subject,
                &shared.name,
                &shared.stream,
                delivery,
                attempts,
                cause,
                shared.config.limits.timeout,
            )
            .await;
            match stored {
                Ok(recorded) => {
                    HandlerMetrics::incr(&shared.metrics.dead_lettered);
                    if recorded == Recorded::WithoutPayload {
                        HandlerMetrics::incr(&shared.metrics.dead_letter_failures);
                        tracing::error!(
                            dead_letter = %subject,
                            payload_bytes = delivery.message.payload.len(),
                            "the dead-letter record with the payload would exceed the server's \
                             max_payload; it was stored WITHOUT the payload (the original stays \
                             in its stream at the sequence the record names, until the stream's \
                             retention removes it)"
                        );
                    }
                    tracing::warn!(
                        dead_letter = %subject,
                        kind = %cause.kind,
                        "message dead-lettered: {}",
                        cause.reason
                    );
                    match delivery.term(&shared.client, &cause.reason, confirm).await {
                        Ok(()) => settled(shared, job),
                        Err(err) => {
                            // Its dead letter is stored: a redelivery is settled, not re-run.
                            shared.recent.insert(job.delivery.stream_sequence);
                            ack_failed(shared, "term", &err)
                        }
                    }
                    shared.attempts.forget(job).await;
                }
                Err(err) => {
                    HandlerMetrics::incr(&shared.metrics.dead_letter_failures);
                    tracing::error!("{err}; the message will be tried again later");
                    let delay = shared.config.retry.delay(attempts);
                    nak(shared, delivery, delay, confirm).await;
                }
            }
        }
        None => {
            HandlerMetrics::incr(&shared.metrics.dead_lettered);
            tracing::error!(
                kind = %cause.kind,
                payload_bytes = delivery.message.payload.len(),
                "message TERMINATED without a dead-letter record (no dead_letter subject is \
                 configured for this handler): {}",
                cause.reason
            );
            match delivery.term(&shared.client, &cause.reason, confirm).await {
                Ok(()) => settled(shared, job),
                Err(err) => ack_failed(shared, "term", &err),
            }
            shared.attempts.forget(job).await;
        }
    }
}

/// Hands a message back to JetStream for redelivery after `delay`. The executor forgets the
/// sequence first: a redelivery that arrives before this worker calls `done` is a new delivery
/// to run, not a duplicate of the one it holds.
pub async fn nak(shared: &Shared, delivery: &Delivery, delay: Duration, confirm: bool) {
    shared.executor.forget(delivery.stream_sequence);
    if let Err(err) = delivery.nak(&shared.client, delay, confirm).await {
        ack_failed(shared, "nak", &err);
    }
}

fn ack_failed(shared: &Shared, what: &str, err: &super::delivery::AckError) {
    HandlerMetrics::incr(&shared.metrics.ack_failures);
    tracing::warn!("{what} failed ({err}); JetStream will redeliver the message after AckWait");
}
