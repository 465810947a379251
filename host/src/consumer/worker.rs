//! The message path: run one delivery through its handler, then settle it.
//!
//! Order of events for a message (the contract the rest of the host relies on):
//! 1. an attempt beyond `max_attempts` (the last one was cut short) goes straight to the
//!    dead-letter path without running;
//! 2. the handler runs in a fresh instance; while it runs, a progress ack is sent every half
//!    AckWait so JetStream does not redeliver it;
//! 3. on success every publish it made is confirmed, and only then the input is acked; a
//!    publish that is not confirmed turns the success into a retry;
//! 4. otherwise [`settle::decide`] chooses nak-with-delay or dead-letter-and-term.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::delivery::{header_params, Delivery};
use super::settle::{self, DeadLetterCause, Disposition};
use super::Shared;
use crate::runtime::{FailureKind, GuestMessage, Invoked, Outcome};
use crate::telemetry::HandlerMetrics;

/// Runs and settles one delivery. `cancel` aborts a running handler at the drain deadline;
/// the message is then nak'ed so another host takes it at once.
pub async fn process(shared: &Shared, delivery: Delivery, cancel: &CancellationToken) {
    let span = tracing::info_span!(
        "message",
        handler = %shared.name,
        subject = %delivery.subject(),
        stream_seq = delivery.stream_sequence,
        attempt = delivery.delivered,
    );
    process_in_span(shared, delivery, cancel)
        .instrument(span)
        .await
}

async fn process_in_span(shared: &Shared, delivery: Delivery, cancel: &CancellationToken) {
    let m = &shared.metrics;
    let attempt = delivery.delivered;
    HandlerMetrics::incr(&m.received);
    if attempt > 1 {
        HandlerMetrics::incr(&m.redelivered);
    }
    let policy = &shared.config.retry;
    if attempt > policy.max_attempts {
        let cause = DeadLetterCause {
            kind: "exhausted".to_owned(),
            reason: format!(
                "delivered {attempt} times but max_attempts is {}: an earlier attempt did not \
                 finish (its host stopped, or its acknowledgement was lost)",
                policy.max_attempts
            ),
        };
        dead_letter_and_term(shared, &delivery, attempt - 1, &cause).await;
        return;
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
        let invocation = shared.module.invoke(msg, shared.stream.clone());
        tokio::select! {
            invoked = keep_alive(shared, &delivery, invocation) => invoked,
            _ = cancel.cancelled() => {
                tracing::info!("drain deadline reached while the handler ran; handing the message back");
                nak_now(shared, &delivery).await;
                return;
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
        let results = keep_alive(shared, &delivery, futures::future::join_all(publishes)).await;
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
                Ok(()) => HandlerMetrics::incr(&m.succeeded),
                Err(err) => ack_failed(shared, "ack", &err),
            }
        }
        Disposition::Retry(delay) => {
            HandlerMetrics::incr(&m.retried);
            tracing::info!(?delay, ?outcome, "attempt failed; retrying later");
            if let Err(err) = delivery
                .nak(&shared.client, delay, shared.confirm_acks())
                .await
            {
                ack_failed(shared, "nak", &err);
            }
        }
        Disposition::DeadLetter(cause) => {
            dead_letter_and_term(shared, &delivery, attempt, &cause).await;
        }
    }
}

/// Polls `work` to completion, sending a progress ack every half AckWait meanwhile.
async fn keep_alive<F: std::future::Future>(
    shared: &Shared,
    delivery: &Delivery,
    work: F,
) -> F::Output {
    let period = shared.config.ack_wait / 2;
    tokio::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = tokio::time::sleep(period) => {
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
/// later (after its last attempt: beyond `max_attempts`, and is dead-lettered without running
/// again; after a reject: it runs again and is rejected again).
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
                    if let Err(err) = delivery.nak(&shared.client, delay, confirm).await {
                        ack_failed(shared, "nak", &err);
                    }
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
    if let Err(err) = delivery.nak(&shared.client, Duration::ZERO, true).await {
        ack_failed(shared, "nak", &err);
    }
}

fn ack_failed(shared: &Shared, what: &str, err: &super::delivery::AckError) {
    HandlerMetrics::incr(&shared.metrics.ack_failures);
    tracing::warn!("{what} failed ({err}); JetStream will redeliver the message after AckWait");
}
