//! The message a handler receives.

use std::time::{Duration, SystemTime};

use crate::wit::mailroom::handler::types;
use crate::Error;

/// One JetStream message, as the host delivers it to [`handle`](crate::Handler::handle).
#[derive(Debug, Clone)]
pub struct Message {
    inner: types::Message,
}

impl Message {
    /// Builds a message by hand, for unit tests of handler logic: stream `TEST`, sequence 1,
    /// attempt 1, no headers.
    pub fn new(subject: impl Into<String>, payload: impl Into<Vec<u8>>) -> Message {
        Message {
            inner: types::Message {
                subject: subject.into(),
                payload: payload.into(),
                headers: Vec::new(),
                stream: "TEST".to_owned(),
                sequence: 1,
                attempt: 1,
                published_unix_nanos: 0,
                handler: "test".to_owned(),
            },
        }
    }

    /// Adds a header value (test helper; headers are multi-valued, so a repeated name adds a value).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        let name = name.into();
        let value = value.into();
        match self.inner.headers.iter_mut().find(|h| h.name == name) {
            Some(header) => header.values.push(value),
            None => self.inner.headers.push(types::Header {
                name,
                values: vec![value],
            }),
        }
        self
    }

    /// Sets the delivery attempt (test helper).
    pub fn with_attempt(mut self, attempt: u32) -> Message {
        self.inner.attempt = attempt;
        self
    }

    /// Sets the stream and stream sequence (test helper).
    pub fn with_sequence(mut self, stream: impl Into<String>, sequence: u64) -> Message {
        self.inner.stream = stream.into();
        self.inner.sequence = sequence;
        self
    }

    pub(crate) fn from_wit(inner: types::Message) -> Message {
        Message { inner }
    }

    /// The subject the producer published to.
    pub fn subject(&self) -> &str {
        &self.inner.subject
    }

    /// The payload bytes, unchanged.
    pub fn payload(&self) -> &[u8] {
        &self.inner.payload
    }

    /// Takes the payload without copying it.
    pub fn into_payload(self) -> Vec<u8> {
        self.inner.payload
    }

    /// The payload as UTF-8 text. A payload that is not UTF-8 is [rejected](Error::reject):
    /// another attempt cannot change it.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.inner.payload).map_err(|err| {
            Error::reject(format!(
                "payload of {} is not UTF-8 text: {err}",
                self.inner.subject
            ))
        })
    }

    /// The payload parsed as JSON into `T`. A payload that does not parse is
    /// [rejected](Error::reject) with serde's explanation.
    #[cfg(feature = "json")]
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.inner.payload).map_err(|err| {
            Error::reject(format!(
                "payload of {} is not the expected JSON: {err}",
                self.inner.subject
            ))
        })
    }

    /// The first value of header `name` (names compare ASCII case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .find_map(|h| h.values.first())
            .map(String::as_str)
    }

    /// Every value of header `name`, in order (names compare ASCII case-insensitively).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.inner
            .headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .flat_map(|h| h.values.iter().map(String::as_str))
    }

    /// Every header as `(name, value)` pairs, one pair per value.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.inner
            .headers
            .iter()
            .flat_map(|h| h.values.iter().map(move |v| (h.name.as_str(), v.as_str())))
    }

    /// The stream that stored the message.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// The message's sequence in its stream: unique and never reused, a good idempotency key.
    pub fn sequence(&self) -> u64 {
        self.inner.sequence
    }

    /// Which attempt this is, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Whether an earlier attempt at this message failed or was cut short.
    pub fn is_redelivery(&self) -> bool {
        self.inner.attempt > 1
    }

    /// When the stream stored the message.
    pub fn published(&self) -> SystemTime {
        let nanos = self.inner.published_unix_nanos;
        if nanos >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs())
        }
    }

    /// The handler's name in the host configuration.
    pub fn handler_name(&self) -> &str {
        &self.inner.handler
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_multi_valued_and_case_insensitive() {
        let msg = Message::new("orders.1", "x")
            .with_header("Trace-Id", "a")
            .with_header("Trace-Id", "b")
            .with_header("Other", "c");
        assert_eq!(msg.header("trace-id"), Some("a"));
        assert_eq!(
            msg.header_values("TRACE-ID").collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(
            msg.headers().collect::<Vec<_>>(),
            [("Trace-Id", "a"), ("Trace-Id", "b"), ("Other", "c")]
        );
        assert_eq!(msg.header("missing"), None);
    }

    #[test]
    fn text_rejects_non_utf8() {
        let ok = Message::new("s", "héllo");
        assert_eq!(ok.text().unwrap(), "héllo");
        let err = Message::new("s", vec![0xff, 0xfe]).text().unwrap_err();
        assert!(err.is_reject(), "{err}");
        assert!(err.reason().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn json_parses_or_rejects_with_the_reason() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Order {
            id: u64,
        }
        let order: Order = Message::new("s", r#"{"id":7}"#).json().unwrap();
        assert_eq!(order, Order { id: 7 });
        let err = Message::new("orders.9", r#"{"id":"x"}"#)
            .json::<Order>()
            .unwrap_err();
        assert!(err.is_reject());
        assert!(err.reason().contains("orders.9"), "{err}");
        assert!(err.reason().contains("invalid type"), "{err}");
    }

    #[test]
    fn metadata_accessors() {
        let msg = Message::new("a.b", "")
            .with_sequence("ORDERS", 42)
            .with_attempt(3);
        assert_eq!(msg.stream(), "ORDERS");
        assert_eq!(msg.sequence(), 42);
        assert_eq!(msg.attempt(), 3);
        assert!(msg.is_redelivery());
        assert_eq!(msg.published(), SystemTime::UNIX_EPOCH);
        assert!(!Message::new("a", "").is_redelivery());
    }
}
