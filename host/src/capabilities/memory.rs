//! An in-memory [`Backend`] that records every call: `mailroom invoke` prints what a handler
//! did with it, and unit tests assert on it.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Backend, KvError, Outbound, PendingPublish, PublishError};

/// One call a handler made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A publish, as it would have been sent.
    Publish(Outbound),
    /// A KV read and what it returned.
    KvGet {
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
        /// The value found.
        found: Option<Vec<u8>>,
    },
    /// A KV write and the revision it got.
    KvPut {
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
        /// The value written.
        value: Vec<u8>,
        /// The new revision.
        revision: u64,
    },
    /// A KV delete.
    KvDelete {
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
    },
}

#[derive(Default)]
struct State {
    calls: Vec<Recorded>,
    kv: HashMap<(String, String), Vec<u8>>,
    revision: u64,
}

/// Records calls; KV buckets spring into existence on first use.
pub struct MemoryBackend {
    state: Mutex<State>,
    max_payload: usize,
}

impl MemoryBackend {
    /// An empty backend accepting messages up to `max_payload` bytes.
    pub fn new(max_payload: usize) -> MemoryBackend {
        MemoryBackend {
            state: Mutex::new(State::default()),
            max_payload,
        }
    }

    /// Seeds a KV value before the handler runs.
    pub fn seed(&self, bucket: &str, key: &str, value: Vec<u8>) {
        let mut state = self.lock();
        state.revision += 1;
        state.kv.insert((bucket.to_owned(), key.to_owned()), value);
    }

    /// Every call made so far, in order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.lock().calls.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while recording cannot leave the log half-written in a way that matters.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn publish(&self, msg: Outbound) -> BoxFuture<'_, Result<PendingPublish, PublishError>> {
        self.lock().calls.push(Recorded::Publish(msg));
        let pending: PendingPublish = async { Ok(()) }.boxed();
        async move { Ok(pending) }.boxed()
    }

    fn kv_get<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, KvError>> {
        let mut state = self.lock();
        let found = state.kv.get(&(bucket.to_owned(), key.to_owned())).cloned();
        state.calls.push(Recorded::KvGet {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            found: found.clone(),
        });
        async move { Ok(found) }.boxed()
    }

    fn kv_put<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, KvError>> {
        let mut state = self.lock();
        state.revision += 1;
        let revision = state.revision;
        state
            .kv
            .insert((bucket.to_owned(), key.to_owned()), value.clone());
        state.calls.push(Recorded::KvPut {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            value,
            revision,
        });
        async move { Ok(revision) }.boxed()
    }

    fn kv_delete<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), KvError>> {
        let mut state = self.lock();
        state.kv.remove(&(bucket.to_owned(), key.to_owned()));
        state.calls.push(Recorded::KvDelete {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        });
        async move { Ok(()) }.boxed()
    }

    fn max_payload(&self) -> usize {
        self.max_payload
    }
}
