//! The production [`Backend`]: JetStream publishes and KV buckets over one NATS connection.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::context::{
    GetStreamError, GetStreamErrorKind, KeyValueErrorKind, PublishErrorKind,
};
use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Backend, KvError, Outbound, PendingPublish, PublishError};

/// Publishes through JetStream and reaches KV buckets by name (looked up once, then cached).
pub struct NatsBackend {
    js: jetstream::Context,
    buckets: Mutex<HashMap<String, kv::Store>>,
    max_payload: usize,
}

impl NatsBackend {
    /// A backend on `js`, whose connection's `max_payload` bounds every message.
    pub fn new(js: jetstream::Context) -> NatsBackend {
        let max_payload = js.client().server_info().max_payload;
        NatsBackend {
            js,
            buckets: Mutex::new(HashMap::new()),
            max_payload,
        }
    }

    async fn bucket(&self, bucket: &str) -> Result<kv::Store, KvError> {
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
    fn publish(&self, msg: Outbound) -> BoxFuture<'_, Result<PendingPublish, PublishError>> {
        async move {
            let mut headers = HeaderMap::new();
            for (name, value) in &msg.headers {
                headers.append(name.as_str(), value.as_str());
            }
            let publish = jetstream::message::PublishMessage::build()
                .payload(msg.payload.into())
                .headers(headers)
                .message_id(&msg.msg_id);
            let subject = msg.subject;
            match self.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => {
                    let pending: PendingPublish = async move {
                        match ack.await {
                            Ok(_) => Ok(()),
                            // No stream captures this subject: the server answered "no
                            // responders", so it has processed the message as a plain publish.
                            Err(err) if err.kind() == PublishErrorKind::StreamNotFound => Ok(()),
                            Err(err) => Err(format!("publish to {subject} not confirmed: {err}")),
                        }
                    }
                    .boxed();
                    Ok(pending)
                }
                Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    Err(PublishError::TooLarge(self.max_payload as u64))
                }
                Err(err) => Err(PublishError::Unavailable(err.to_string())),
            }
        }
        .boxed()
    }

    fn kv_get<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, KvError>> {
        async move {
            let store = self.bucket(bucket).await?;
            store
                .get(key)
                .await
                .map(|v| v.map(|b| b.to_vec()))
                .map_err(|err| KvError::Unavailable(format!("get {bucket}/{key}: {err}")))
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
            store
                .put(key, value.into())
                .await
                .map_err(|err| KvError::Unavailable(format!("put {bucket}/{key}: {err}")))
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
            store
                .delete(key)
                .await
                .map_err(|err| KvError::Unavailable(format!("delete {bucket}/{key}: {err}")))
        }
        .boxed()
    }

    fn max_payload(&self) -> usize {
        self.max_payload
    }
}
