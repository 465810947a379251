//! The host functions a handler may call: `publish`, `kv`, `log` and `config`.
//!
//! Invariants:
//! - Every call is checked against the handler's [`Grants`] before anything leaves the host. A
//!   refused call returns the WIT error to the guest (the inner result), is logged and counted;
//!   it never traps. Only a broken host invariant would trap (the outer result).
//! - Publishes are sent at once but only *confirmed* later: each one leaves a
//!   [`PendingPublish`] in the [`CallContext`], and the consumer awaits all of them before it
//!   acks the input message.
//! - Publishes get a deterministic `Nats-Msg-Id` (handler, stream, sequence, index of the
//!   publish in the call), so a re-run of the same message stores nothing new within the
//!   stream's duplicate window.
//! - This module knows nothing about wasmtime stores or instances; the I/O itself goes through
//!   a [`Backend`] (NATS in production, memory in `mailroom invoke` and unit tests).

mod memory;
mod nats;
pub mod subject;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::runtime::bindings::mailroom::handler::{config, kv, log, publish, types};
use crate::telemetry::HandlerMetrics;

pub use memory::{MemoryBackend, Recorded};
pub use nats::NatsBackend;
pub use subject::SubjectPattern;

/// The WIT error a refused publish returns.
pub type PublishError = publish::PublishError;
/// The WIT error a refused KV call returns.
pub type KvError = kv::KvError;

/// A publish that was sent and whose confirmation is still to be awaited. It resolves to
/// `Err(reason)` when the message was not stored.
pub type PendingPublish = BoxFuture<'static, Result<(), String>>;

/// A message a handler publishes, after the host checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The (validated, granted) subject.
    pub subject: String,
    /// The body.
    pub payload: Vec<u8>,
    /// Headers as `(name, value)` pairs; a name may repeat.
    pub headers: Vec<(String, String)>,
    /// The `Nats-Msg-Id` to send: the guest's own, or the derived one.
    pub msg_id: String,
}

/// Where the capabilities' I/O goes. Implementations must be cheap to call concurrently.
pub trait Backend: Send + Sync + 'static {
    /// Sends `msg` and returns a future that confirms it (stored by JetStream, or accepted by
    /// the server for subjects no stream captures).
    fn publish(&self, msg: Outbound) -> BoxFuture<'_, Result<PendingPublish, PublishError>>;
    /// Reads a key; `None` when absent or deleted.
    fn kv_get<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, KvError>>;
    /// Writes a key and returns the new revision once stored.
    fn kv_put<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        value: Vec<u8>,
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

/// The capability state of one handler call: counters and the publishes still to confirm.
pub struct CallContext {
    caps: Arc<HandlerCaps>,
    stream: Arc<str>,
    sequence: u64,
    publishes: u32,
    pending: Vec<PendingPublish>,
    log_used: usize,
    log_dropped: u32,
}

impl CallContext {
    /// Starts the capability state for handling message `sequence` of `stream`.
    pub fn new(caps: Arc<HandlerCaps>, stream: Arc<str>, sequence: u64) -> CallContext {
        CallContext {
            caps,
            stream,
            sequence,
            publishes: 0,
            pending: Vec::new(),
            log_used: 0,
            log_dropped: 0,
        }
    }

    /// The publishes this call made, to be confirmed before the input is acked.
    pub fn into_pending(self) -> Vec<PendingPublish> {
        self.pending
    }

    /// Takes the publishes made so far (to confirm them), leaving none.
    pub fn take_pending(&mut self) -> Vec<PendingPublish> {
        std::mem::take(&mut self.pending)
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
        let outbound = Outbound {
            subject,
            payload,
            headers: pairs,
            msg_id,
        };
        match self.caps.backend.publish(outbound).await {
            Ok(pending) => {
                self.pending.push(pending);
                Ok(Ok(()))
            }
            Err(err) => Ok(Err(err)),
        }
    }
}

impl kv::Host for CallContext {
    async fn get(
        &mut self,
        bucket: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, KvError>> {
        if let Err(err) = self.check_kv(&bucket, &key) {
            return Ok(Err(err));
        }
        Ok(self.caps.backend.kv_get(&bucket, &key).await)
    }

    async fn put(
        &mut self,
        bucket: String,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<u64, KvError>> {
        if let Err(err) = self.check_kv(&bucket, &key) {
            return Ok(Err(err));
        }
        let max = self.caps.backend.max_payload();
        if value.len() + key.len() + 64 > max {
            return Ok(Err(KvError::TooLarge(max as u64)));
        }
        Ok(self.caps.backend.kv_put(&bucket, &key, value).await)
    }

    async fn delete(
        &mut self,
        bucket: String,
        key: String,
    ) -> wasmtime::Result<Result<(), KvError>> {
        if let Err(err) = self.check_kv(&bucket, &key) {
            return Ok(Err(err));
        }
        Ok(self.caps.backend.kv_delete(&bucket, &key).await)
    }
}

impl CallContext {
    fn check_kv(&self, bucket: &str, key: &str) -> Result<(), KvError> {
        if !self.caps.grants.may_use_bucket(bucket) {
            self.deny("KV bucket", bucket);
            return Err(KvError::Denied(bucket.to_owned()));
        }
        if !subject::is_valid_kv_key(key) {
            return Err(KvError::InvalidKey(key.to_owned()));
        }
        Ok(())
    }
}

impl log::Host for CallContext {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        if self.log_used + message.len() > self.caps.log_budget {
            if self.log_dropped == 0 {
                tracing::warn!(
                    handler = %self.caps.name,
                    budget = self.caps.log_budget,
                    "handler log budget for this message used up; dropping further records"
                );
            }
            self.log_dropped += 1;
            HandlerMetrics::incr(&self.caps.metrics.log_dropped);
            return Ok(());
        }
        self.log_used += message.len();
        let handler = &*self.caps.name;
        match level {
            log::Level::Trace => tracing::trace!(target: "mailroom::guest", handler, "{message}"),
            log::Level::Debug => tracing::debug!(target: "mailroom::guest", handler, "{message}"),
            log::Level::Info => tracing::info!(target: "mailroom::guest", handler, "{message}"),
            log::Level::Warn => tracing::warn!(target: "mailroom::guest", handler, "{message}"),
            log::Level::Error => tracing::error!(target: "mailroom::guest", handler, "{message}"),
        }
        Ok(())
    }
}

impl config::Host for CallContext {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.caps.settings.get(&key).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use publish::Host as _;

    fn caps(backend: Arc<MemoryBackend>) -> Arc<HandlerCaps> {
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
        let recorded = backend.recorded();
        assert_eq!(recorded.len(), 1);
        match &recorded[0] {
            Recorded::Publish(out) => {
                assert_eq!(out.subject, "out.a");
                assert_eq!(out.msg_id, "h:S:7:1");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(call.into_pending().len(), 1);
    }

    #[tokio::test]
    async fn guest_msg_id_wins_and_headers_flatten() {
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let mut call = CallContext::new(caps(backend.clone()), "S".into(), 1);
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
        match &backend.recorded()[0] {
            Recorded::Publish(out) => {
                assert_eq!(out.msg_id, "mine");
                assert_eq!(
                    out.headers,
                    [
                        ("X".to_owned(), "1".to_owned()),
                        ("X".to_owned(), "2".to_owned())
                    ]
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn kv_checks_grant_and_key() {
        use kv::Host as _;
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let mut call = CallContext::new(caps(backend), "S".into(), 1);
        let denied = call.get("secrets".into(), "k".into()).await.unwrap();
        assert!(matches!(denied, Err(KvError::Denied(b)) if b == "secrets"));
        let bad = call
            .put("counts".into(), "a b".into(), vec![])
            .await
            .unwrap();
        assert!(matches!(bad, Err(KvError::InvalidKey(_))));
        assert_eq!(
            call.put("counts".into(), "a".into(), b"1".to_vec())
                .await
                .unwrap()
                .unwrap(),
            1
        );
        assert_eq!(
            call.get("counts".into(), "a".into())
                .await
                .unwrap()
                .unwrap(),
            Some(b"1".to_vec())
        );
        call.delete("counts".into(), "a".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            call.get("counts".into(), "a".into())
                .await
                .unwrap()
                .unwrap(),
            None
        );
    }

    #[test]
    fn log_budget_drops_and_counts() {
        use log::Host as _;
        let caps = caps(Arc::new(MemoryBackend::new(1)));
        let mut call = CallContext::new(caps.clone(), "S".into(), 1);
        call.log(log::Level::Info, "12345".into()).unwrap();
        call.log(log::Level::Info, "12345".into()).unwrap();
        call.log(log::Level::Info, "x".into()).unwrap();
        assert_eq!(caps.metrics.snapshot().log_dropped, 1);
    }

    #[test]
    fn config_reads_settings() {
        use config::Host as _;
        let mut call = CallContext::new(caps(Arc::new(MemoryBackend::new(1))), "S".into(), 1);
        assert_eq!(call.get("k".into()).unwrap(), Some("v".into()));
        assert_eq!(call.get("missing".into()).unwrap(), None);
    }
}
