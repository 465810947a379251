//! How a handler reports failure.

use std::fmt;
use std::time::Duration;

use crate::wit::mailroom::handler::types;

/// `Result` with the handler [`Error`] as its default error.
pub type Result<T = (), E = Error> = std::result::Result<T, E>;

/// Why a handler did not finish: retry it later, or reject it for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Retry {
        reason: String,
        delay: Option<Duration>,
    },
    Reject {
        reason: String,
    },
}

impl Error {
    /// A transient failure: the host redelivers the message after the handler's configured
    /// backoff, and dead-letters it once the attempts run out.
    pub fn retry(reason: impl Into<String>) -> Error {
        Error {
            kind: Kind::Retry {
                reason: reason.into(),
                delay: None,
            },
        }
    }

    /// A transient failure with a delay you choose (for example a rate limit's reset time),
    /// used instead of the configured backoff. Millisecond precision.
    pub fn retry_after(reason: impl Into<String>, delay: Duration) -> Error {
        Error {
            kind: Kind::Retry {
                reason: reason.into(),
                delay: Some(delay),
            },
        }
    }

    /// A permanent failure: the host never retries the message; it publishes it to the
    /// dead-letter subject with `reason` and terminates it.
    pub fn reject(reason: impl Into<String>) -> Error {
        Error {
            kind: Kind::Reject {
                reason: reason.into(),
            },
        }
    }

    /// Whether this asks for another attempt.
    pub fn is_retry(&self) -> bool {
        matches!(self.kind, Kind::Retry { .. })
    }

    /// Whether this rejects the message for good.
    pub fn is_reject(&self) -> bool {
        matches!(self.kind, Kind::Reject { .. })
    }

    /// The reason given when the error was made.
    pub fn reason(&self) -> &str {
        match &self.kind {
            Kind::Retry { reason, .. } | Kind::Reject { reason } => reason,
        }
    }

    /// The delay asked for with [`Error::retry_after`].
    pub fn delay(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Retry { delay, .. } => *delay,
            Kind::Reject { .. } => None,
        }
    }

    pub(crate) fn into_wit(self) -> types::HandlerError {
        match self.kind {
            Kind::Retry { reason, delay } => types::HandlerError::Retry(types::RetryInfo {
                reason,
                delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            }),
            Kind::Reject { reason } => types::HandlerError::Reject(reason),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Retry {
                reason,
                delay: Some(delay),
            } => write!(f, "retry after {delay:?}: {reason}"),
            Kind::Retry {
                reason,
                delay: None,
            } => write!(f, "retry: {reason}"),
            Kind::Reject { reason } => write!(f, "reject: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_map_to_the_wit_variants() {
        match Error::retry("busy").into_wit() {
            types::HandlerError::Retry(info) => {
                assert_eq!(info.reason, "busy");
                assert_eq!(info.delay_ms, None);
            }
            other => panic!("expected retry, got {other:?}"),
        }
        match Error::retry_after("rate limited", Duration::from_millis(1500)).into_wit() {
            types::HandlerError::Retry(info) => assert_eq!(info.delay_ms, Some(1500)),
            other => panic!("expected retry, got {other:?}"),
        }
        match Error::reject("bad order").into_wit() {
            types::HandlerError::Reject(reason) => assert_eq!(reason, "bad order"),
            other => panic!("expected reject, got {other:?}"),
        }
    }

    #[test]
    fn huge_delays_saturate() {
        match Error::retry_after("x", Duration::MAX).into_wit() {
            types::HandlerError::Retry(info) => assert_eq!(info.delay_ms, Some(u64::MAX)),
            other => panic!("expected retry, got {other:?}"),
        }
    }

    #[test]
    fn accessors_and_display() {
        let e = Error::retry_after("later", Duration::from_secs(2));
        assert!(e.is_retry() && !e.is_reject());
        assert_eq!(e.delay(), Some(Duration::from_secs(2)));
        assert_eq!(e.to_string(), "retry after 2s: later");
        let e = Error::reject("never");
        assert!(e.is_reject());
        assert_eq!(e.delay(), None);
        assert_eq!(e.reason(), "never");
        assert_eq!(e.to_string(), "reject: never");
    }
}
