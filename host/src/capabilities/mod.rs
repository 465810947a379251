//! The host functions a handler may call: `publish`, `kv`, `log` and `config`.
//!
//! Invariants:
//! - Every call is checked against the handler's [`Grants`] before anything leaves the host. A
//!   refused call returns the WIT error to the guest (the inner result), is logged and counted;
//!   it never traps. Only a broken host invariant would trap (the outer result).
//! - Publishes are *staged*: a checked publish is kept in the [`CallContext`] as an
//!   [`Outbound`] and nothing leaves the host during the call. Only when the handler returns
//!   `ok` does the consumer send the staged publishes (all at once, pipelined) and await their
//!   confirmations before it acks the input message; a failed attempt's publishes are
//!   discarded. So the outputs stored for a message are those of the attempt that succeeded.
//! - Publishes get a deterministic `Nats-Msg-Id` (handler, stream, sequence, index of the
//!   publish in the call), so a re-run of the same message stores nothing new within the
//!   stream's duplicate window.
//! - Conditional KV writes (`put-if`, `create`) get a deterministic idempotency id too (handler,
//!   stream, sequence, bucket/key, count of earlier such writes to that key in the call), so a
//!   re-run's read-modify-write of a key it already applied stores nothing (`kv.rs`).
//! - This module knows nothing about wasmtime stores or instances; the I/O itself goes through
//!   a [`Backend`] (NATS in production, memory in `mailroom invoke` and unit tests).

mod kv;
mod log;
mod memory;
mod nats;
pub mod subject;
mod v0_1;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::fence::Fence;
use crate::runtime::bindings::mailroom::handler::{config, publish, types};
use crate::telemetry::HandlerMetrics;

pub use kv::{Expect, KvEntry, KvError};
pub use memory::{MemoryBackend, Recorded, Written};
pub use nats::NatsBackend;
pub use subject::SubjectPattern;

/// The WIT error a refused publish returns.
pub type PublishError = publish::PublishError;

/// A publish that was sent and whose confirmation is still to be awaited.
pub type PendingPublish = BoxFuture<'static, Result<Stored, NotStored>>;

/// How a sent publish ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A stream stored it.
    New,
    /// A stream had already stored a message with this `Nats-Msg-Id` within its duplicate
    /// window, so this one was dropped (a re-run of a message that was already processed).
    Duplicate,
    /// No stream captures the subject: it was handed to the server as a plain NATS message.
    Uncaptured,
}

/// Why a publish was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStored {
    /// NATS or the stream could not be reached (disconnected, no stream leader during an
    /// election): sending the same publish again later may succeed.
    Unavailable(String),
    /// The stream answered with an error (limits, a refused message): retrying the same
    /// publish at once will not help.
    Refused(String),
}

impl std::fmt::Display for NotStored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotStored::Unavailable(reason) | NotStored::Refused(reason) => f.write_str(reason),
        }
    }
}

/// A message a handler publishes, after the host checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The (validated, granted) subject.
    pub subject: String,
    /// The body.
    pub payload: bytes::Bytes,
    /// Headers as `(name, value)` pairs; a name may repeat.
    pub headers: Vec<(String, String)>,
    /// The `Nats-Msg-Id` to send: the guest's own, or the derived one.
    pub msg_id: String,
}

/// Where the capabilities' I/O goes. Implementations must be cheap to call concurrently.
pub trait Backend: Send + Sync + 'static {
    /// Sends `msg` and returns a future that confirms it (stored by a stream, or handed to
    /// the server when no stream captures its subject). Sending it again is safe: its
    /// `Nats-Msg-Id` makes a stream store it once.
    fn publish(&self, msg: &Outbound) -> BoxFuture<'_, Result<PendingPublish, NotStored>>;
    /// Reads a key and its revision; `None` when absent or deleted.
    fn kv_get<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<KvEntry>, KvError>>;
    /// Writes a key and returns the new revision once stored.
    fn kv_put<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, KvError>>;
    /// Writes a key only if it is as `expect` says, and returns the new revision once stored,
    /// or `KvError::Conflict`. `once_id` is the write's idempotency id: a second write with the
    /// same id (within the bucket's duplicate window) stores nothing and returns the revision
    /// of the first.
    fn kv_put_if<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        value: Vec<u8>,
        expect: Expect,
        once_id: String,
    ) -> BoxFuture<'a, Result<u64, KvError>>;
    /// Deletes a key.
    fn kv_delete<'a>(&'a self, bucket: &'a str, key: &'a str)
        -> BoxFuture<'a, Result<(), KvError>>;
    /// The largest message (payload plus headers) the server accepts.
    fn max_payload(&self) -> usize;
}

/// What a handler may touch.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Subjects the handler may publish to.
    pub publish: Vec<SubjectPattern>,
    /// KV buckets the handler may use; `"*"` grants every bucket.
    pub kv_buckets: Vec<String>,
}

impl Grants {
    /// Whether `subject` is inside the publish grant.
    pub fn may_publish(&self, subject: &str) -> bool {
        self.publish.iter().any(|p| p.matches(subject))
    }

    /// Whether `bucket` is inside the KV grant.
    pub fn may_use_bucket(&self, bucket: &str) -> bool {
        self.kv_buckets.iter().any(|b| b == "*" || b == bucket)
    }
}

/// Everything the capabilities of one handler share across its calls.
pub struct HandlerCaps {
    /// The handler's name (logs, `Nats-Msg-Id`).
    pub name: Arc<str>,
    /// What it may touch.
    pub grants: Grants,
    /// Its `[handler.config]` settings.
    pub settings: BTreeMap<String, String>,
    /// Publishes allowed per message.
    pub max_publishes: u32,
    /// Bytes of `log` output allowed per message.
    pub log_budget: usize,
    /// Where I/O goes.
    pub backend: Arc<dyn Backend>,
    /// Where refusals and drops are counted.
    pub metrics: Arc<HandlerMetrics>,
}

impl std::fmt::Debug for HandlerCaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerCaps")
            .field("name", &self.name)
            .field("grants", &self.grants)
            .field("max_publishes", &self.max_publishes)
            .finish_non_exhaustive()
    }
}

/// The capability state of one handler call: counters and the staged publishes.
pub struct CallContext {
    caps: Arc<HandlerCaps>,
    /// Until when this call's KV writes may land (a partition's lease; `None`: always).
    fence: Option<Arc<Fence>>,
    stream: Arc<str>,
    sequence: u64,
    publishes: u32,
    staged: Vec<Outbound>,
    log_used: usize,
    log_dropped: u32,
    /// Successful conditional KV writes per `bucket/key` in this call, for their idempotency
    /// ids. Empty (and unallocated) unless the handler makes conditional writes.
    kv_written: Vec<(String, u32)>,
}

impl CallContext {
    /// Starts the capability state for handling message `sequence` of `stream`.
    pub fn new(caps: Arc<HandlerCaps>, stream: Arc<str>, sequence: u64) -> CallContext {
        CallContext {
            caps,
            fence: None,
            stream,
            sequence,
            publishes: 0,
            staged: Vec::new(),
            log_used: 0,
            log_dropped: 0,
            kv_written: Vec::new(),
        }
    }

    /// Refuses this call's KV writes once `fence` stops holding (the host lost the lease of
    /// the message's partition: another host may be running the key now).
    pub fn fenced_by(mut self, fence: Option<Arc<Fence>>) -> CallContext {
        self.fence = fence;
        self
    }

    /// `Err` once the fence stopped holding.
    pub(super) fn check_fence(&self) -> Result<(), KvError> {
        match &self.fence {
            Some(fence) if !fence.holds(std::time::Instant::now()) => Err(KvError::Unavailable(
                "this host lost the lease of the message's partition; the write was not made"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// The publishes this call staged, to be sent if it succeeds.
    pub fn into_staged(self) -> Vec<Outbound> {
        self.staged
    }

    /// Takes the publishes staged so far, leaving none.
    pub fn take_staged(&mut self) -> Vec<Outbound> {
        std::mem::take(&mut self.staged)
    }

    /// How many publishes this call made.
    pub fn publish_count(&self) -> u32 {
        self.publishes
    }

    fn deny(&self, what: &str, name: &str) {
        HandlerMetrics::incr(&self.caps.metrics.denied);
        tracing::warn!(
            handler = %self.caps.name,
            "denied: {what} {name} is not granted to this handler"
        );
    }
}

/// The bytes NATS puts on the wire for a header block, to check the size limit up front.
fn header_bytes(headers: &[(String, String)]) -> usize {
    if headers.is_empty() {
        0
    } else {
        // "NATS/1.0\r\n", each "name: value\r\n", and the closing "\r\n".
        10 + headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>()
            + 2
    }
}

impl types::Host for CallContext {}

impl publish::Host for CallContext {
    async fn publish(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<publish::Header>,
    ) -> wasmtime::Result<Result<(), PublishError>> {
        if subject::validate_publish_subject(&subject).is_err() {
            return Ok(Err(PublishError::InvalidSubject(subject)));
        }
        if !self.caps.grants.may_publish(&subject) {
            self.deny("publish to", &subject);
            return Ok(Err(PublishError::Denied(subject)));
        }
        if self.publishes >= self.caps.max_publishes {
            return Ok(Err(PublishError::LimitReached(self.caps.max_publishes)));
        }
        let mut pairs = Vec::with_capacity(headers.len());
        let mut msg_id = None;
        for header in headers {
            for value in header.values {
                if header.name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    msg_id = Some(value);
                } else {
                    pairs.push((header.name.clone(), value));
                }
            }
        }
        // Carry the handler call's trace context on, unless the guest set its own.
        if !pairs
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(crate::trace::TRACEPARENT))
        {
            crate::trace::outgoing(|o| {
                pairs.push((crate::trace::TRACEPARENT.to_owned(), o.traceparent.clone()));
                if let Some(state) = &o.tracestate {
                    pairs.push((crate::trace::TRACESTATE.to_owned(), state.clone()));
                }
            });
        }
        let index = self.publishes;
        self.publishes += 1;
        let msg_id = msg_id.unwrap_or_else(|| {
            format!(
                "{}:{}:{}:{}",
                self.caps.name, self.stream, self.sequence, index
            )
        });
        let max = self.caps.backend.max_payload();
        let size = payload.len() + header_bytes(&pairs) + msg_id.len() + 16;
        if size > max {
            return Ok(Err(PublishError::TooLarge(max as u64)));
        }
        self.staged.push(Outbound {
            subject,
            payload: payload.into(),
            headers: pairs,
            msg_id,
        });
        Ok(Ok(()))
    }
}

impl config::Host for CallContext {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.caps.settings.get(&key).cloned())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use publish::Host as _;

    pub(super) fn caps(backend: Arc<MemoryBackend>) -> Arc<HandlerCaps> {
        Arc::new(HandlerCaps {
            name: "h".into(),
            grants: Grants {
                publish: vec![SubjectPattern::parse("out.>").unwrap()],
                kv_buckets: vec!["counts".into()],
            },
            settings: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            max_publishes: 2,
            log_budget: 10,
            backend,
            metrics: Arc::default(),
        })
    }

    #[tokio::test]
    async fn publish_checks_grant_subject_limit_and_size() {
        let backend = Arc::new(MemoryBackend::new(100));
        let caps = caps(backend.clone());
        let mut call = CallContext::new(caps.clone(), "S".into(), 7);
        let denied = call
            .publish("secret.x".into(), vec![], vec![])
            .await
            .unwrap();
        assert!(matches!(denied, Err(PublishError::Denied(s)) if s == "secret.x"));
        assert_eq!(caps.metrics.snapshot().denied, 1);
        let invalid = call.publish("out.*".into(), vec![], vec![]).await.unwrap();
        assert!(matches!(invalid, Err(PublishError::InvalidSubject(_))));
        let big = call
            .publish("out.a".into(), vec![0; 200], vec![])
            .await
            .unwrap();
        assert!(matches!(big, Err(PublishError::TooLarge(100))));
        // The oversized publish used up index 0: ids stay tied to the call order.
        call.publish("out.a".into(), b"1".to_vec(), vec![])
            .await
            .unwrap()
            .unwrap();
        let limited = call.publish("out.b".into(), vec![], vec![]).await.unwrap();
        assert!(matches!(limited, Err(PublishError::LimitReached(2))));
        assert_eq!(call.publish_count(), 2);
        assert!(
            backend.recorded().is_empty(),
            "nothing leaves the host during the call"
        );
        let staged = call.into_staged();
        assert_eq!(staged.len(), 1);
        assert_eq!(staged[0].subject, "out.a");
        assert_eq!(staged[0].msg_id, "h:S:7:1");
    }

    #[tokio::test]
    async fn guest_msg_id_wins_and_headers_flatten() {
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let mut call = CallContext::new(caps(backend), "S".into(), 1);
        let headers = vec![
            publish::Header {
                name: "Nats-Msg-Id".into(),
                values: vec!["mine".into()],
            },
            publish::Header {
                name: "X".into(),
                values: vec!["1".into(), "2".into()],
            },
        ];
        call.publish("out.a".into(), vec![], headers)
            .await
            .unwrap()
            .unwrap();
        let out = &call.into_staged()[0];
        assert_eq!(out.msg_id, "mine");
        assert_eq!(
            out.headers,
            [
                ("X".to_owned(), "1".to_owned()),
                ("X".to_owned(), "2".to_owned())
            ]
        );
    }

    #[test]
    fn config_reads_settings() {
        use config::Host as _;
        let mut call = CallContext::new(caps(Arc::new(MemoryBackend::new(1))), "S".into(), 1);
        assert_eq!(call.get("k".into()).unwrap(), Some("v".into()));
        assert_eq!(call.get("missing".into()).unwrap(), None);
    }
}
