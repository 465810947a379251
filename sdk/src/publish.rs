//! Publishing messages from a handler.

use std::fmt;

use crate::host as sys;
use crate::wit::mailroom::handler::{publish as host, types};
use crate::Error;

/// Why the host refused a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// The subject is outside this handler's publish grant (`publish.allow` in the host config).
    Denied {
        /// The refused subject.
        subject: String,
    },
    /// The message is larger than the server accepts.
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// This call already published as many messages as one message may cause.
    LimitReached {
        /// The per-message publish limit.
        limit: u32,
    },
    /// The subject cannot be published to (empty, whitespace or wildcards).
    InvalidSubject {
        /// The refused subject.
        subject: String,
    },
    /// NATS could not take the message now; retrying later may work.
    Unavailable {
        /// What went wrong.
        reason: String,
    },
}

impl PublishError {
    pub(crate) fn from_wit(err: host::PublishError) -> PublishError {
        match err {
            host::PublishError::Denied(subject) => PublishError::Denied { subject },
            host::PublishError::TooLarge(limit) => PublishError::TooLarge { limit },
            host::PublishError::LimitReached(limit) => PublishError::LimitReached { limit },
            host::PublishError::InvalidSubject(subject) => PublishError::InvalidSubject { subject },
            host::PublishError::Unavailable(reason) => PublishError::Unavailable { reason },
        }
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Denied { subject } => {
                write!(
                    f,
                    "publish to {subject} denied: not in this handler's publish.allow"
                )
            }
            PublishError::TooLarge { limit } => {
                write!(
                    f,
                    "message too large: the server accepts at most {limit} bytes"
                )
            }
            PublishError::LimitReached { limit } => {
                write!(
                    f,
                    "publish limit reached: at most {limit} publishes per message"
                )
            }
            PublishError::InvalidSubject { subject } => {
                write!(f, "invalid subject {subject:?}")
            }
            PublishError::Unavailable { reason } => write!(f, "NATS unavailable: {reason}"),
        }
    }
}

impl std::error::Error for PublishError {}

/// `?` on a publish: a passing failure (NATS unavailable) retries the message; a refusal that
/// another attempt would meet again (denied, too large, limit, bad subject) rejects it.
impl From<PublishError> for Error {
    fn from(err: PublishError) -> Error {
        match err {
            PublishError::Unavailable { .. } => Error::retry(err.to_string()),
            _ => Error::reject(err.to_string()),
        }
    }
}

/// Publishes `payload` to `subject`.
///
/// The host acks the input message only after this message is confirmed: stored by JetStream
/// when a stream captures `subject`, accepted by the server otherwise. On stream subjects the
/// host adds a `Nats-Msg-Id` derived from the input message, so a retried handler does not
/// store the message twice.
pub fn publish(subject: &str, payload: impl AsRef<[u8]>) -> Result<(), PublishError> {
    publish_with_headers(subject, payload, &[])
}

/// Publishes `payload` to `subject` with headers, given as `(name, value)` pairs (a name may
/// repeat). A `Nats-Msg-Id` header given here replaces the one the host would derive.
pub fn publish_with_headers(
    subject: &str,
    payload: impl AsRef<[u8]>,
    headers: &[(&str, &str)],
) -> Result<(), PublishError> {
    let headers: Vec<types::Header> = headers
        .iter()
        .map(|(name, value)| types::Header {
            name: (*name).to_owned(),
            values: vec![(*value).to_owned()],
        })
        .collect();
    sys::publish(subject, payload.as_ref(), &headers).map_err(PublishError::from_wit)
}

/// Serializes `value` as JSON and publishes it to `subject` with
/// `Content-Type: application/json`. A value that does not serialize is rejected.
#[cfg(feature = "json")]
pub fn publish_json<T: serde::Serialize + ?Sized>(subject: &str, value: &T) -> Result<(), Error> {
    let payload = serde_json::to_vec(value)
        .map_err(|err| Error::reject(format!("cannot serialize JSON for {subject}: {err}")))?;
    publish_with_headers(subject, payload, &[("Content-Type", "application/json")])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_is_retried() {
        let retry: Error = PublishError::Unavailable {
            reason: "connection closed".into(),
        }
        .into();
        assert!(retry.is_retry());
        assert!(retry.reason().contains("connection closed"));
        for err in [
            PublishError::Denied {
                subject: "secret.x".into(),
            },
            PublishError::TooLarge { limit: 1024 },
            PublishError::LimitReached { limit: 10 },
            PublishError::InvalidSubject {
                subject: "a b".into(),
            },
        ] {
            let text = err.to_string();
            let converted: Error = err.into();
            assert!(converted.is_reject(), "{text}");
            assert_eq!(converted.reason(), text);
        }
    }

    #[test]
    fn wit_errors_convert() {
        assert_eq!(
            PublishError::from_wit(host::PublishError::Denied("a.b".into())),
            PublishError::Denied {
                subject: "a.b".into()
            }
        );
        assert_eq!(
            PublishError::from_wit(host::PublishError::TooLarge(9)),
            PublishError::TooLarge { limit: 9 }
        );
    }
}
