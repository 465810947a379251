//! The production [`Backend`]: JetStream publishes and KV buckets over one NATS connection.
//!
//! Whether a subject is captured by a stream is decided from the streams' configurations
//! ([`NatsBackend::refresh_streams`], run at start and whenever a stream is created, updated or
//! deleted), never inferred from a publish's answer: during a stream leader election every
//! JetStream publish is answered "no responders", which must mean "try again", not "nobody
//! stores this subject".

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::context::{
    GetStreamError, GetStreamErrorKind, KeyValueErrorKind, PublishErrorKind,
};
use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use futures::future::BoxFuture;
use futures::FutureExt;

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::{
    Backend, Expect, KvEntry, KvError, NotStored, Outbound, PendingPublish, Stored, SubjectPattern,
};

/// How often the stream list is read again even when no advisory announced a change.
const STREAMS_REFRESH: Duration = Duration::from_secs(60);

/// Publishes through JetStream and reaches KV buckets by name (looked up once, then cached).
pub struct NatsBackend {
    js: jetstream::Context,
    buckets: Mutex<HashMap<String, kv::Store>>,
    /// The subjects of every stream (`None` until the first read).
    captured: RwLock<Option<Vec<SubjectPattern>>>,
    max_payload: usize,
}

impl NatsBackend {
    /// A backend on `js`, whose connection's `max_payload` bounds every message. Call
    /// [`NatsBackend::refresh_streams`] before the first publish.
    pub fn new(js: jetstream::Context) -> NatsBackend {
        let max_payload = js.client().server_info().max_payload;
        NatsBackend {
            js,
            buckets: Mutex::new(HashMap::new()),
            captured: RwLock::new(None),
            max_payload,
        }
    }

    /// Reads every stream's subjects, which decide whether a publish must be stored.
    pub async fn refresh_streams(&self) -> anyhow::Result<()> {
        let mut streams = self.js.streams();
        let mut patterns = Vec::new();
        while let Some(info) = streams.next().await {
            let info = info.map_err(|err| anyhow::anyhow!("listing streams: {err}"))?;
            for subject in &info.config.subjects {
                if let Ok(pattern) = SubjectPattern::parse(subject) {
                    patterns.push(pattern);
                }
            }
        }
        *self.captured.write().unwrap_or_else(|p| p.into_inner()) = Some(patterns);
        Ok(())
    }

    /// Keeps the stream subjects current until `stop`: re-read on every stream advisory
    /// (created, updated, deleted) and once a minute.
    pub async fn watch_streams(&self, stop: CancellationToken) {
        let client = self.js.client();
        let mut advisories = client.subscribe("$JS.EVENT.ADVISORY.STREAM.*.>").await.ok();
        let mut tick = tokio::time::interval(STREAMS_REFRESH);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                Some(advisory) = async {
                    match advisories.as_mut() {
                        Some(sub) => sub.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let kind = advisory.subject.split('.').nth(4).unwrap_or_default();
                    if !matches!(kind, "CREATED" | "UPDATED" | "DELETED") {
                        continue;
                    }
                }
            }
            if let Err(err) = self.refresh_streams().await {
                tracing::warn!("{err:#}; keeping the previous list of stream subjects");
            }
        }
    }

    /// Whether some stream captures `subject`. Before the first read every subject counts as
    /// captured, so nothing is mistaken for a plain message.
    fn is_captured(&self, subject: &str) -> bool {
        match &*self.captured.read().unwrap_or_else(|p| p.into_inner()) {
            Some(patterns) => patterns.iter().any(|p| p.matches(subject)),
            None => true,
        }
    }

    /// While NATS is disconnected a KV call fails at once (the handler sees `unavailable` and
    /// the message is retried), instead of waiting out the handler's time limit.
    fn connected(&self) -> Result<(), KvError> {
        match self.js.client().connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(KvError::Unavailable(
                "NATS is disconnected; the host is reconnecting".into(),
            )),
        }
    }

    async fn bucket(&self, bucket: &str) -> Result<kv::Store, KvError> {
        self.connected()?;
        if let Some(store) = lock(&self.buckets).get(bucket) {
            return Ok(store.clone());
        }
        match self.js.get_key_value(bucket).await {
            Ok(store) => {
                lock(&self.buckets).insert(bucket.to_owned(), store.clone());
                Ok(store)
            }
            Err(err) if err.kind() == KeyValueErrorKind::InvalidStoreName => {
                Err(KvError::NoSuchBucket(bucket.to_owned()))
            }
            Err(err) if is_stream_not_found(&err) => Err(KvError::NoSuchBucket(bucket.to_owned())),
            Err(err) => Err(KvError::Unavailable(format!("bucket {bucket}: {err}"))),
        }
    }
}

/// How long one KV call may take before the handler is told `unavailable`.
const KV_CALL_LIMIT: Duration = Duration::from_secs(3);

async fn bounded<T>(call: impl std::future::Future<Output = T>) -> Result<T, KvError> {
    tokio::time::timeout(KV_CALL_LIMIT, call).await.map_err(|_| {
        KvError::Unavailable(format!(
            "the KV call got no answer within {KV_CALL_LIMIT:?} (NATS or the bucket's leader is unavailable)"
        ))
    })
}

/// Why a conditional write did not store.
enum WriteIf {
    WrongRevision,
    Failed(String),
}

impl WriteIf {
    fn into_kv(self, bucket: &str, key: &str) -> KvError {
        match self {
            WriteIf::WrongRevision => KvError::Conflict(key.to_owned()),
            WriteIf::Failed(reason) => {
                KvError::Unavailable(format!("conditional write {bucket}/{key}: {reason}"))
            }
        }
    }
}

impl NatsBackend {
    /// Publishes `value` to the key's subject expecting its last revision to be `expected` (0:
    /// no message), with `once_id` as `Nats-Msg-Id`. The server checks the id first: a
    /// duplicate is acknowledged with the first write's sequence and stores nothing.
    async fn write_if(
        &self,
        store: &kv::Store,
        key: &str,
        value: bytes::Bytes,
        expected: u64,
        once_id: &str,
    ) -> Result<u64, WriteIf> {
        if store.use_jetstream_prefix {
            // A bucket reached through another domain's API prefix: async-nats keeps that
            // prefix private, so write through it without the idempotency id.
            return store
                .update(key, value, expected)
                .await
                .map_err(|err| match err.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => WriteIf::WrongRevision,
                    _ => WriteIf::Failed(err.to_string()),
                });
        }
        let subject = format!(
            "{}{key}",
            store.put_prefix.as_deref().unwrap_or(&store.prefix)
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        headers.insert(async_nats::header::NATS_MESSAGE_ID, once_id);
        let ack = self
            .js
            .publish_with_headers(subject, headers, value)
            .await
            .map_err(|err| WriteIf::Failed(err.to_string()))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                Err(WriteIf::WrongRevision)
            }
            Err(err) => Err(WriteIf::Failed(err.to_string())),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map holds plain clones; a panic while holding the lock cannot leave it inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_stream_not_found(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(get) = e.downcast_ref::<GetStreamError>() {
            if let GetStreamErrorKind::JetStream(js) = get.kind() {
                return js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND;
            }
        }
        source = e.source();
    }
    false
}

impl Backend for NatsBackend {
    fn publish(&self, msg: &Outbound) -> BoxFuture<'_, Result<PendingPublish, NotStored>> {
        let mut headers = HeaderMap::new();
        for (name, value) in &msg.headers {
            headers.append(name.as_str(), value.as_str());
        }
        let subject = msg.subject.clone();
        let payload = msg.payload.clone();
        let msg_id = msg.msg_id.clone();
        async move {
            if !self.is_captured(&subject) {
                // A plain NATS message: at most once, nothing to confirm.
                headers.insert("Nats-Msg-Id", msg_id.as_str());
                self.js
                    .client()
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await
                    .map_err(|err| {
                        NotStored::Unavailable(format!("publish to {subject}: {err}"))
                    })?;
                let done: PendingPublish = async { Ok(Stored::Uncaptured) }.boxed();
                return Ok(done);
            }
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload)
                .headers(headers)
                .message_id(msg_id);
            let ack = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|err| NotStored::Unavailable(format!("publish to {subject}: {err}")))?;
            let pending: PendingPublish = async move {
                match ack.await {
                    Ok(ack) if ack.duplicate => Ok(Stored::Duplicate),
                    Ok(_) => Ok(Stored::New),
                    // A stream captures this subject, so "no responders" means its leader is
                    // not there right now (an election, a restart): try again.
                    Err(err)
                        if matches!(
                            err.kind(),
                            PublishErrorKind::StreamNotFound
                                | PublishErrorKind::TimedOut
                                | PublishErrorKind::BrokenPipe
                        ) =>
                    {
                        Err(NotStored::Unavailable(format!(
                            "publish to {subject} not confirmed: {err}"
                        )))
                    }
                    Err(err) => Err(NotStored::Refused(format!(
                        "publish to {subject} refused: {err}"
                    ))),
                }
            }
            .boxed();
            Ok(pending)
        }
        .boxed()
    }

    fn kv_get<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<KvEntry>, KvError>> {
        async move {
            let store = self.bucket(bucket).await?;
            let entry = bounded(store.entry(key))
                .await?
                .map_err(|err| KvError::Unavailable(format!("get {bucket}/{key}: {err}")))?;
            Ok(entry
                .filter(|e| e.operation == kv::Operation::Put)
                .map(|e| KvEntry {
                    value: e.value.to_vec(),
                    revision: e.revision,
                }))
        }
        .boxed()
    }

    fn kv_put<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, KvError>> {
        async move {
            let store = self.bucket(bucket).await?;
            bounded(store.put(key, value.into()))
                .await?
                .map_err(|err| KvError::Unavailable(format!("put {bucket}/{key}: {err}")))
        }
        .boxed()
    }

    fn kv_put_if<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        value: Vec<u8>,
        expect: Expect,
        once_id: String,
    ) -> BoxFuture<'a, Result<u64, KvError>> {
        async move {
            let store = self.bucket(bucket).await?;
            let value = bytes::Bytes::from(value);
            let expected = match expect {
                Expect::Revision(revision) => revision,
                Expect::Absent => 0,
            };
            match bounded(self.write_if(&store, key, value.clone(), expected, &once_id)).await? {
                Err(WriteIf::WrongRevision) if expect == Expect::Absent => {
                    // A deleted or purged key still has a marker as its latest write: it is
                    // absent, and may be created over that marker's revision.
                    let latest = store.entry(key).await.map_err(|err| {
                        KvError::Unavailable(format!("create {bucket}/{key}: {err}"))
                    })?;
                    match latest {
                        Some(entry) if entry.operation != kv::Operation::Put => {
                            match bounded(self.write_if(
                                &store,
                                key,
                                value,
                                entry.revision,
                                &once_id,
                            ))
                            .await?
                            {
                                Ok(revision) => Ok(revision),
                                Err(err) => Err(err.into_kv(bucket, key)),
                            }
                        }
                        _ => Err(KvError::Conflict(key.to_owned())),
                    }
                }
                Ok(revision) => Ok(revision),
                Err(err) => Err(err.into_kv(bucket, key)),
            }
        }
        .boxed()
    }

    fn kv_delete<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), KvError>> {
        async move {
            let store = self.bucket(bucket).await?;
            bounded(store.delete(key))
                .await?
                .map_err(|err| KvError::Unavailable(format!("delete {bucket}/{key}: {err}")))
        }
        .boxed()
    }

    fn max_payload(&self) -> usize {
        self.max_payload
    }
}
