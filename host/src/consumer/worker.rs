//! The message path: run one delivery through its handler, then settle it.
//!
//! Order of events for a message (the contract the rest of the host relies on):
//! 1. a message whose ordering key cannot be computed, or an attempt beyond `max_attempts`
//!    (the last one was cut short by a crash) goes straight to the dead-letter path without
//!    running;
//! 2. the handler runs in a fresh instance (or the worker's warm one under
//!    `isolation = "reuse"`); while it runs, a progress ack is sent every half
//!    AckWait so JetStream does not redeliver it;
//! 3. on success every publish it made is confirmed, and only then the input is acked; a
//!    publish that is not confirmed turns the success into a retry;
//! 4. otherwise [`settle::decide`] chooses retry or dead-letter-and-term. In ordered modes a
//!    retry happens in place ([`Settled::RetryAt`]): the message goes back to the head of its
//!    key's lane, so the key's later messages wait for it. Unordered, it is nak'ed with the
//!    delay. With `on_exhausted = "block"` an ordered message that used its attempts keeps
//!    being retried, at the backoff delay for its attempt (capped by the policy), and its key
//!    is reported blocked.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::delivery::{header_params, Delivery, Job};
use super::settle::{self, DeadLetterCause, Disposition};
use super::Shared;
use crate::backoff::OnExhausted;
use crate::runtime::{FailureKind, GuestMessage, Invoked, Outcome, Warm};
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
}

/// Runs and settles one attempt of a held message. `cancel` aborts a running handler at the
/// drain deadline; the message is then nak'ed so another host takes it at once.
pub async fn process(
    shared: &Shared,
    job: &mut Job,
    warm: &mut Option<Warm>,
    cancel: &CancellationToken,
) -> Settled {
    let span = tracing::info_span!(
        "message",
        handler = %shared.name,
        subject = %job.delivery.subject(),
        stream_seq = job.delivery.stream_sequence,
        attempt = job.attempt(),
    );
    process_in_span(shared, job, warm, cancel)
        .instrument(span)
        .await
}

async fn process_in_span(
    shared: &Shared,
    job: &mut Job,
    warm: &mut Option<Warm>,
    cancel: &CancellationToken,
) -> Settled {
    let m = &shared.metrics;
    let attempt = job.attempt();
    HandlerMetrics::incr(&m.received);
    if attempt > 1 {
        HandlerMetrics::incr(&m.redelivered);
    }
    let policy = &shared.config.retry;
    let ordered = shared.config.ordering.is_ordered();
    let block = ordered && shared.config.on_exhausted == OnExhausted::Block;
    if let Some(reason) = job.key_error.take() {
        let cause = DeadLetterCause {
            kind: "no-key".to_owned(),
            reason,
        };
        dead_letter_and_term(shared, &job.delivery, attempt, &cause).await;
        return Settled::Done;
    }
    let delivery = &job.delivery;
    if attempt > policy.max_attempts && !block {
        let cause = DeadLetterCause {
            kind: "exhausted".to_owned(),
            reason: format!(
                "delivered {attempt} times but max_attempts is {}: an earlier attempt did not \
                 finish (its host stopped, or its acknowledgement was lost)",
                policy.max_attempts
            ),
        };
        dead_letter_and_term(shared, delivery, attempt - 1, &cause).await;
        return Settled::Done;
    }

    let invoked = {
        let grouped = delivery.grouped_headers();
        let headers = header_params(&grouped);
        let msg = GuestMessage {
            subject: delivery.subject(),
            payload: &delivery.message.payload,
            headers: &headers,
            stream: &shared.stream,
            sequence: delivery.stream_sequence,
            attempt,
            published_unix_nanos: delivery.published_unix_nanos,
            handler: &shared.name,
        };
        let invocation = shared.module.invoke(warm, msg, shared.stream.clone());
        tokio::select! {
            biased;
            invoked = keep_alive(shared, delivery, &mut job.touched, invocation) => invoked,
            _ = cancel.cancelled() => {
                tracing::info!("drain deadline reached while the handler ran; handing the message back");
                nak_now(shared, delivery).await;
                return Settled::Done;
            }
        }
    };
    let Invoked {
        mut outcome,
        publishes,
        elapsed,
    } = invoked;

    if outcome == Outcome::Success && !publishes.is_empty() {
        let count = publishes.len() as u64;
        let results = keep_alive(
            shared,
            delivery,
            &mut job.touched,
            futures::future::join_all(publishes),
        )
        .await;
        match results.into_iter().find_map(Result::err) {
            None => {
                m.published.fetch_add(count, Ordering::Relaxed);
            }
            Some(reason) => {
                outcome = Outcome::Retry {
                    reason,
                    delay: None,
                }
            }
        }
    }
    match &outcome {
        Outcome::Failed(f) if f.kind == FailureKind::Timeout => HandlerMetrics::incr(&m.timeouts),
        Outcome::Failed(_) => HandlerMetrics::incr(&m.traps),
        _ => {}
    }

    match settle::decide(&outcome, attempt, policy, fastrand::f64()) {
        Disposition::Ack => {
            tracing::debug!(?elapsed, "handled");
            match delivery.ack(&shared.client, shared.confirm_acks()).await {
                Ok(()) => {
                    HandlerMetrics::incr(&m.succeeded);
                    m.latency.record(delivery.since_published());
                }
                Err(err) => ack_failed(shared, "ack", &err),
            }
            Settled::Done
        }
        Disposition::Retry(delay) => {
            HandlerMetrics::incr(&m.retried);
            tracing::info!(?delay, ?outcome, "attempt failed; retrying later");
            if ordered {
                job.retries += 1;
                return Settled::RetryAt {
                    at: Instant::now() + delay,
                    blocked: false,
                };
            }
            nak(shared, delivery, delay, shared.confirm_acks()).await;
            Settled::Done
        }
        Disposition::DeadLetter(cause) if block && cause.kind != "reject" => {
            HandlerMetrics::incr(&m.retried);
            if attempt == policy.max_attempts {
                tracing::error!(
                    kind = %cause.kind,
                    "key BLOCKED: the message used its {} attempts and on_exhausted = \"block\"; \
                     it is retried until it succeeds and the key's later messages wait: {}",
                    policy.max_attempts,
                    cause.reason
                );
            }
            job.retries += 1;
            Settled::RetryAt {
                at: Instant::now() + policy.base_delay(attempt),
                blocked: true,
            }
        }
        Disposition::DeadLetter(cause) => {
            dead_letter_and_term(shared, delivery, attempt, &cause).await;
            Settled::Done
        }
    }
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
/// later and runs again (or, if JetStream's delivery count is already beyond `max_attempts`,
/// goes straight to the dead-letter path).
async fn dead_letter_and_term(
    shared: &Shared,
    delivery: &Delivery,
    attempts: u32,
    cause: &DeadLetterCause,
) {
    let confirm = shared.confirm_acks();
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
            )
            .await;
            match stored {
                Ok(()) => {
                    HandlerMetrics::incr(&shared.metrics.dead_lettered);
                    tracing::warn!(
                        dead_letter = %subject,
                        kind = %cause.kind,
                        "message dead-lettered: {}",
                        cause.reason
                    );
                    if let Err(err) = delivery.term(&shared.client, &cause.reason, confirm).await {
                        ack_failed(shared, "term", &err);
                    }
                }
                Err(err) => {
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
            if let Err(err) = delivery.term(&shared.client, &cause.reason, confirm).await {
                ack_failed(shared, "term", &err);
            }
        }
    }
}

/// Hands a message back for immediate redelivery (drain), confirmed.
pub async fn nak_now(shared: &Shared, delivery: &Delivery) {
    nak(shared, delivery, Duration::ZERO, true).await;
}

/// Hands a message back to JetStream for redelivery after `delay`. The executor forgets the
/// sequence first: a redelivery that arrives before this worker calls `done` is a new delivery
/// to run, not a duplicate of the one it holds.
async fn nak(shared: &Shared, delivery: &Delivery, delay: Duration, confirm: bool) {
    shared.executor.forget(delivery.stream_sequence);
    if let Err(err) = delivery.nak(&shared.client, delay, confirm).await {
        ack_failed(shared, "nak", &err);
    }
}

fn ack_failed(shared: &Shared, what: &str, err: &super::delivery::AckError) {
    HandlerMetrics::incr(&shared.metrics.ack_failures);
    tracing::warn!("{what} failed ({err}); JetStream will redeliver the message after AckWait");
}
