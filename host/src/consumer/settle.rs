//! From a handler's outcome to what happens to the JetStream message: ack, retry (in place,
//! or nak with a delay), or dead-letter and terminate.
//!
//! [`before_run`] and [`decide`] are pure functions (outcome, attempt, policy, mode, a jitter
//! draw), unit-tested below; the worker applies what they return. [`dead_letter`] does the
//! I/O of the dead-letter path.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;

use super::delivery::Delivery;
use crate::backoff::RetryPolicy;
use crate::runtime::{FailureKind, Outcome};

/// What to do with a message after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Done: ack it.
    Ack,
    /// Run it again after `delay` while its key waits (ordered handlers). `blocked` marks a
    /// message that used up its attempts under `on_exhausted = "block"`.
    RetryInPlace {
        /// How long to wait.
        delay: Duration,
        /// Whether the key is blocked until it succeeds.
        blocked: bool,
    },
    /// Hand it back for redelivery after this delay (unordered handlers).
    Nak(Duration),
    /// Give up: publish to the dead-letter subject, then terminate it.
    DeadLetter(DeadLetterCause),
}

/// How the handler treats failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Retries happen in place, keeping the key's order.
    pub ordered: bool,
    /// `on_exhausted = "block"`: an exhausted message keeps being retried.
    pub block: bool,
}

/// What to do with a message before running it: `Some` when it must not run (no ordering
/// key, or attempts already used up by executions that did not finish).
pub fn before_run(
    key_error: Option<String>,
    attempt: u32,
    policy: &RetryPolicy,
    mode: Mode,
) -> Option<Disposition> {
    if let Some(reason) = key_error {
        return Some(Disposition::DeadLetter(DeadLetterCause {
            kind: "no-key".to_owned(),
            reason,
        }));
    }
    if attempt > policy.max_attempts && !mode.block {
        return Some(Disposition::DeadLetter(DeadLetterCause {
            kind: "exhausted".to_owned(),
            reason: format!(
                "attempt {attempt} but max_attempts is {}: an earlier attempt did not finish \
                 (its host stopped while running it, or its acknowledgement was lost)",
                policy.max_attempts
            ),
        }));
    }
    None
}

/// Why a message is dead-lettered, for the record's headers and the term reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCause {
    /// `reject`, or the kind of the last failure (`retry`, `trap`, `timeout`, ...).
    pub kind: String,
    /// The last error.
    pub reason: String,
}

/// Decides what a finished attempt means for the message.
///
/// `attempt` is 1-based. A retryable failure on the last allowed attempt, or a reject on any
/// attempt, dead-letters the message (under `block`, an exhausted non-reject is retried in
/// place at the backoff delay instead). The handler's own retry delay wins over the backoff.
pub fn decide(
    outcome: &Outcome,
    attempt: u32,
    policy: &RetryPolicy,
    mode: Mode,
    jitter_unit: f64,
) -> Disposition {
    match decide_unordered(outcome, attempt, policy, jitter_unit) {
        Disposition::Nak(delay) if mode.ordered => Disposition::RetryInPlace {
            delay,
            blocked: false,
        },
        Disposition::DeadLetter(cause) if mode.block && cause.kind != "reject" => {
            Disposition::RetryInPlace {
                delay: policy.base_delay(attempt),
                blocked: true,
            }
        }
        other => other,
    }
}

fn decide_unordered(
    outcome: &Outcome,
    attempt: u32,
    policy: &RetryPolicy,
    jitter_unit: f64,
) -> Disposition {
    let (kind, reason, asked) = match outcome {
        Outcome::Success => return Disposition::Ack,
        Outcome::Reject { reason } => {
            return Disposition::DeadLetter(DeadLetterCause {
                kind: "reject".to_owned(),
                reason: reason.clone(),
            })
        }
        Outcome::Retry { reason, delay } => ("retry", reason.as_str(), *delay),
        Outcome::Failed(failure) => (failure.kind.as_str(), failure.reason.as_str(), None),
    };
    if policy.is_last(attempt) {
        return Disposition::DeadLetter(DeadLetterCause {
            kind: kind.to_owned(),
            reason: format!("gave up after {attempt} attempts; last error: {reason}"),
        });
    }
    Disposition::Nak(asked.unwrap_or_else(|| policy.delay_with(attempt, jitter_unit)))
}

/// A kind name for metrics of failed attempts.
pub fn failure_kind(outcome: &Outcome) -> Option<FailureKind> {
    match outcome {
        Outcome::Failed(f) => Some(f.kind),
        _ => None,
    }
}

/// Header names of a dead-letter record.
pub mod headers {
    /// The handler that gave up.
    pub const HANDLER: &str = "Mailroom-Handler";
    /// `reject`, `retry`, `trap`, `timeout`, `out-of-memory`, `stack-overflow`, `instantiate`.
    pub const ERROR_KIND: &str = "Mailroom-Error-Kind";
    /// The last error message.
    pub const ERROR: &str = "Mailroom-Error";
    /// Attempts made.
    pub const ATTEMPTS: &str = "Mailroom-Attempts";
    /// The subject the message was originally published to.
    pub const SUBJECT: &str = "Mailroom-Subject";
    /// The stream that stored it.
    pub const STREAM: &str = "Mailroom-Stream";
    /// Its sequence in that stream.
    pub const SEQUENCE: &str = "Mailroom-Sequence";
    /// Set when the payload did not fit in the record: its size in bytes. The original is
    /// still in its stream at `Mailroom-Stream` / `Mailroom-Sequence` until the stream's
    /// retention removes it.
    pub const PAYLOAD_OMITTED: &str = "Mailroom-Payload-Omitted";
}

/// Header values may not hold line breaks and should stay short.
fn header_value(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect()
}

/// How a dead-letter record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// With the payload.
    Whole,
    /// Without the payload, which would not fit under the server's `max_payload`.
    WithoutPayload,
}

/// The dead-letter record of `delivery`: its headers (less `Nats-Msg-Id` and `Mailroom-*`)
/// plus the `Mailroom-*` headers, and its payload unless record and payload together would
/// exceed `max_payload`.
pub fn record(
    handler: &str,
    stream: &str,
    delivery: &Delivery,
    attempts: u32,
    cause: &DeadLetterCause,
    max_payload: usize,
) -> (HeaderMap, Option<bytes::Bytes>) {
    let mut map = HeaderMap::new();
    let mut header_bytes = 0;
    for (name, value) in delivery.headers() {
        if name.eq_ignore_ascii_case("Nats-Msg-Id") || name.starts_with("Mailroom-") {
            continue;
        }
        header_bytes += name.len() + value.as_str().len() + 4;
        map.append(name, value.as_str());
    }
    let error = header_value(&cause.reason);
    let attempts = attempts.to_string();
    let sequence = delivery.origin_sequence.to_string();
    let ours = [
        (headers::HANDLER, handler),
        (headers::ERROR_KIND, cause.kind.as_str()),
        (headers::ERROR, error.as_str()),
        (headers::ATTEMPTS, attempts.as_str()),
        (headers::SUBJECT, delivery.subject()),
        (headers::STREAM, stream),
        (headers::SEQUENCE, sequence.as_str()),
    ];
    for (name, value) in ours {
        header_bytes += name.len() + value.len() + 4;
        map.insert(name, value);
    }
    let payload = &delivery.message.payload;
    // Room for the status line, the msg id header and the omitted-payload header.
    let overhead = 256 + handler.len() + stream.len();
    if header_bytes + payload.len() + overhead <= max_payload {
        (map, Some(payload.clone()))
    } else {
        map.insert(headers::PAYLOAD_OMITTED, payload.len().to_string().as_str());
        (map, None)
    }
}

/// Publishes `delivery`'s dead-letter record (see [`record`]) to `subject` and waits until
/// JetStream has stored it, sending it again while the stream is unavailable for up to
/// `budget`. Its `Nats-Msg-Id` is derived from the input, so repeating this after a crash
/// stores one record.
#[allow(clippy::too_many_arguments)]
pub async fn dead_letter(
    js: &jetstream::Context,
    subject: &str,
    handler: &str,
    stream: &str,
    delivery: &Delivery,
    attempts: u32,
    cause: &DeadLetterCause,
    budget: Duration,
) -> Result<Recorded, String> {
    let max_payload = js.client().server_info().max_payload;
    let (map, payload) = record(handler, stream, delivery, attempts, cause, max_payload);
    let recorded = if payload.is_some() {
        Recorded::Whole
    } else {
        Recorded::WithoutPayload
    };
    let give_up = std::time::Instant::now() + budget;
    let mut pause = Duration::from_millis(100);
    loop {
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone().unwrap_or_default())
            .headers(map.clone())
            .message_id(format!(
                "dlq:{handler}:{stream}:{}",
                delivery.origin_sequence
            ));
        let error = match js.send_publish(subject.to_owned(), publish).await {
            Ok(ack) => match ack.await {
                Ok(_) => return Ok(recorded),
                Err(err) => format!(
                    "dead-letter publish to {subject} was not stored (is it captured by a stream?): {err}"
                ),
            },
            Err(err) => format!("dead-letter publish to {subject} failed: {err}"),
        };
        if std::time::Instant::now() + pause > give_up {
            return Err(error);
        }
        tracing::debug!("{error}; trying again in {pause:?}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::Backoff;
    use crate::runtime::Failure;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::List(vec![Duration::from_secs(1), Duration::from_secs(10)]),
            jitter: 0.0,
        }
    }

    const UNORDERED: Mode = Mode {
        ordered: false,
        block: false,
    };
    const ORDERED: Mode = Mode {
        ordered: true,
        block: false,
    };
    const BLOCK: Mode = Mode {
        ordered: true,
        block: true,
    };

    #[test]
    fn success_acks() {
        for mode in [UNORDERED, ORDERED, BLOCK] {
            assert_eq!(
                decide(&Outcome::Success, 1, &policy(), mode, 0.5),
                Disposition::Ack
            );
            assert_eq!(
                decide(&Outcome::Success, 99, &policy(), mode, 0.5),
                Disposition::Ack
            );
        }
    }

    #[test]
    fn ordered_retries_in_place_and_block_keeps_retrying_all_but_rejects() {
        let retry = Outcome::Retry {
            reason: "db down".into(),
            delay: None,
        };
        assert_eq!(
            decide(&retry, 1, &policy(), ORDERED, 0.5),
            Disposition::RetryInPlace {
                delay: Duration::from_secs(1),
                blocked: false
            }
        );
        assert!(matches!(
            decide(&retry, 3, &policy(), ORDERED, 0.5),
            Disposition::DeadLetter(_)
        ));
        assert_eq!(
            decide(&retry, 3, &policy(), BLOCK, 0.5),
            Disposition::RetryInPlace {
                delay: Duration::from_secs(10),
                blocked: true
            }
        );
        let reject = Outcome::Reject {
            reason: "bad".into(),
        };
        assert!(matches!(
            decide(&reject, 1, &policy(), BLOCK, 0.5),
            Disposition::DeadLetter(c) if c.kind == "reject"
        ));
    }

    #[test]
    fn messages_without_a_key_or_attempts_do_not_run() {
        let p = policy();
        assert!(before_run(None, 3, &p, ORDERED).is_none());
        match before_run(Some("no header".into()), 1, &p, ORDERED) {
            Some(Disposition::DeadLetter(c)) => assert_eq!(c.kind, "no-key"),
            other => panic!("{other:?}"),
        }
        match before_run(None, 4, &p, UNORDERED) {
            Some(Disposition::DeadLetter(c)) => {
                assert_eq!(c.kind, "exhausted");
                assert!(
                    c.reason.contains("attempt 4 but max_attempts is 3"),
                    "{}",
                    c.reason
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            before_run(None, 4, &p, BLOCK).is_none(),
            "block keeps trying"
        );
    }

    #[test]
    fn retry_uses_backoff_then_dead_letters() {
        let retry = Outcome::Retry {
            reason: "db down".into(),
            delay: None,
        };
        assert_eq!(
            decide(&retry, 1, &policy(), UNORDERED, 0.5),
            Disposition::Nak(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&retry, 2, &policy(), UNORDERED, 0.5),
            Disposition::Nak(Duration::from_secs(10))
        );
        match decide(&retry, 3, &policy(), UNORDERED, 0.5) {
            Disposition::DeadLetter(cause) => {
                assert_eq!(cause.kind, "retry");
                assert_eq!(
                    cause.reason,
                    "gave up after 3 attempts; last error: db down"
                );
            }
            other => panic!("expected dead letter, got {other:?}"),
        }
    }

    #[test]
    fn handler_delay_wins_over_backoff() {
        let retry = Outcome::Retry {
            reason: "rate limited".into(),
            delay: Some(Duration::from_millis(1500)),
        };
        assert_eq!(
            decide(&retry, 2, &policy(), UNORDERED, 0.5),
            Disposition::Nak(Duration::from_millis(1500))
        );
    }

    #[test]
    fn reject_dead_letters_at_once() {
        let reject = Outcome::Reject {
            reason: "bad order".into(),
        };
        assert_eq!(
            decide(&reject, 1, &policy(), UNORDERED, 0.5),
            Disposition::DeadLetter(DeadLetterCause {
                kind: "reject".into(),
                reason: "bad order".into()
            })
        );
    }

    #[test]
    fn failures_are_retryable_and_named() {
        let trap = Outcome::Failed(Failure {
            kind: FailureKind::OutOfMemory,
            reason: "memory limit".into(),
        });
        assert_eq!(
            decide(&trap, 1, &policy(), UNORDERED, 0.5),
            Disposition::Nak(Duration::from_secs(1))
        );
        match decide(&trap, 3, &policy(), UNORDERED, 0.5) {
            Disposition::DeadLetter(cause) => assert_eq!(cause.kind, "out-of-memory"),
            other => panic!("expected dead letter, got {other:?}"),
        }
    }

    #[test]
    fn header_values_lose_line_breaks() {
        assert_eq!(header_value("a\r\nb"), "a  b");
        assert_eq!(header_value(&"x".repeat(5000)).len(), 1024);
    }
}
