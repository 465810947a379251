//! From a handler's outcome to what happens to the JetStream message: ack, nak with a delay,
//! or dead-letter and terminate.
//!
//! [`decide`] is a pure function (outcome, attempt, policy, a jitter draw), unit-tested below;
//! [`dead_letter`] does the I/O of the dead-letter path.

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
    /// Try again after this delay: nak with it.
    Retry(Duration),
    /// Give up: publish to the dead-letter subject, then terminate it.
    DeadLetter(DeadLetterCause),
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
/// attempt, dead-letters the message. The handler's own retry delay wins over the backoff.
pub fn decide(
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
    Disposition::Retry(asked.unwrap_or_else(|| policy.delay_with(attempt, jitter_unit)))
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
}

/// Header values may not hold line breaks and should stay short.
fn header_value(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect()
}

/// Publishes `delivery`'s payload and headers to `subject` with the dead-letter headers and
/// waits until JetStream has stored it. Its `Nats-Msg-Id` is derived from the input, so
/// repeating this after a crash stores one record.
pub async fn dead_letter(
    js: &jetstream::Context,
    subject: &str,
    handler: &str,
    stream: &str,
    delivery: &Delivery,
    attempts: u32,
    cause: &DeadLetterCause,
) -> Result<(), String> {
    let mut map = HeaderMap::new();
    if let Some(original) = &delivery.message.headers {
        for (name, values) in original.iter() {
            let name: &str = name.as_ref();
            if name.eq_ignore_ascii_case("Nats-Msg-Id") || name.starts_with("Mailroom-") {
                continue;
            }
            for value in values {
                map.append(name, value.as_str());
            }
        }
    }
    map.insert(headers::HANDLER, handler);
    map.insert(headers::ERROR_KIND, cause.kind.as_str());
    map.insert(headers::ERROR, header_value(&cause.reason).as_str());
    map.insert(headers::ATTEMPTS, attempts.to_string().as_str());
    map.insert(headers::SUBJECT, delivery.subject());
    map.insert(headers::STREAM, stream);
    map.insert(
        headers::SEQUENCE,
        delivery.stream_sequence.to_string().as_str(),
    );
    let publish = jetstream::message::PublishMessage::build()
        .payload(delivery.message.payload.clone())
        .headers(map)
        .message_id(format!(
            "dlq:{handler}:{stream}:{}",
            delivery.stream_sequence
        ));
    let ack = js
        .send_publish(subject.to_owned(), publish)
        .await
        .map_err(|err| format!("dead-letter publish to {subject} failed: {err}"))?;
    match ack.await {
        Ok(_) => Ok(()),
        Err(err) => Err(format!(
            "dead-letter publish to {subject} was not stored (is it captured by a stream?): {err}"
        )),
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

    #[test]
    fn success_acks() {
        assert_eq!(
            decide(&Outcome::Success, 1, &policy(), 0.5),
            Disposition::Ack
        );
        assert_eq!(
            decide(&Outcome::Success, 99, &policy(), 0.5),
            Disposition::Ack
        );
    }

    #[test]
    fn retry_uses_backoff_then_dead_letters() {
        let retry = Outcome::Retry {
            reason: "db down".into(),
            delay: None,
        };
        assert_eq!(
            decide(&retry, 1, &policy(), 0.5),
            Disposition::Retry(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&retry, 2, &policy(), 0.5),
            Disposition::Retry(Duration::from_secs(10))
        );
        match decide(&retry, 3, &policy(), 0.5) {
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
            decide(&retry, 2, &policy(), 0.5),
            Disposition::Retry(Duration::from_millis(1500))
        );
    }

    #[test]
    fn reject_dead_letters_at_once() {
        let reject = Outcome::Reject {
            reason: "bad order".into(),
        };
        assert_eq!(
            decide(&reject, 1, &policy(), 0.5),
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
            decide(&trap, 1, &policy(), 0.5),
            Disposition::Retry(Duration::from_secs(1))
        );
        match decide(&trap, 3, &policy(), 0.5) {
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
