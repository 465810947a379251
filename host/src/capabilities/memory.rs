//! An in-memory [`Backend`] that records every call: `mailroom invoke` prints what a handler
//! did with it, and unit tests assert on it.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Backend, Expect, KvEntry, KvError, NotStored, Outbound, PendingPublish, Stored};

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
        /// The value and revision found.
        found: Option<KvEntry>,
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
    /// A conditional KV write (`put-if`, `create`) and what became of it.
    KvPutIf {
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
        /// The value offered.
        value: Vec<u8>,
        /// What the write expected of the key.
        expect: Expect,
        /// The write's idempotency id.
        once_id: String,
        /// Stored, recognised as a re-run, or refused.
        written: Written,
    },
    /// A KV delete.
    KvDelete {
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
    },
}

/// What became of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored with this revision.
    Stored(u64),
    /// Its idempotency id was seen before: nothing stored; the first write's revision.
    Duplicate(u64),
    /// The key was not as expected: nothing stored.
    Conflict,
}

/// A key's latest write: a value, or a delete marker (`None`), like a JetStream KV subject.
struct Slot {
    value: Option<Vec<u8>>,
    revision: u64,
}

#[derive(Default)]
struct State {
    calls: Vec<Recorded>,
    kv: HashMap<(String, String), Slot>,
    /// Idempotency ids of stored conditional writes, per bucket, with their revisions. Kept
    /// for the backend's lifetime: it stands for a duplicate window longer than any test.
    once: HashMap<(String, String), u64>,
    revision: u64,
}

impl State {
    fn write(&mut self, bucket: &str, key: &str, value: Option<Vec<u8>>) -> u64 {
        self.revision += 1;
        let revision = self.revision;
        self.kv.insert(
            (bucket.to_owned(), key.to_owned()),
            Slot { value, revision },
        );
        revision
    }

    fn put_if(
        &mut self,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        once_id: &str,
    ) -> Written {
        // Like JetStream: the duplicate check comes before the expected-revision check.
        if let Some(&revision) = self.once.get(&(bucket.to_owned(), once_id.to_owned())) {
            return Written::Duplicate(revision);
        }
        let slot = self.kv.get(&(bucket.to_owned(), key.to_owned()));
        let matches = match (expect, slot) {
            (Expect::Absent, None) => true,
            (Expect::Absent, Some(slot)) => slot.value.is_none(),
            (Expect::Revision(r), Some(slot)) => slot.value.is_some() && slot.revision == r,
            (Expect::Revision(_), None) => false,
        };
        if !matches {
            return Written::Conflict;
        }
        let revision = self.write(bucket, key, Some(value));
        self.once
            .insert((bucket.to_owned(), once_id.to_owned()), revision);
        Written::Stored(revision)
    }
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
        self.lock().write(bucket, key, Some(value));
    }

    /// The current value of a key, if any.
    pub fn value(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let state = self.lock();
        state
            .kv
            .get(&(bucket.to_owned(), key.to_owned()))
            .and_then(|slot| slot.value.clone())
    }

    /// Forgets the calls recorded so far (the KV contents stay).
    pub fn clear_recorded(&self) {
        self.lock().calls.clear();
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
    fn publish(&self, msg: &Outbound) -> BoxFuture<'_, Result<PendingPublish, NotStored>> {
        self.lock().calls.push(Recorded::Publish(msg.clone()));
        let pending: PendingPublish = async { Ok(Stored::New) }.boxed();
        async move { Ok(pending) }.boxed()
    }

    fn kv_get<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<KvEntry>, KvError>> {
        let mut state = self.lock();
        let found = state
            .kv
            .get(&(bucket.to_owned(), key.to_owned()))
            .and_then(|slot| {
                Some(KvEntry {
                    value: slot.value.clone()?,
                    revision: slot.revision,
                })
            });
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
        let revision = state.write(bucket, key, Some(value.clone()));
        state.calls.push(Recorded::KvPut {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            value,
            revision,
        });
        async move { Ok(revision) }.boxed()
    }

    fn kv_put_if<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        value: Vec<u8>,
        expect: Expect,
        once_id: String,
    ) -> BoxFuture<'a, Result<u64, KvError>> {
        let mut state = self.lock();
        let written = state.put_if(bucket, key, value.clone(), expect, &once_id);
        state.calls.push(Recorded::KvPutIf {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            value,
            expect,
            once_id,
            written,
        });
        let result = match written {
            Written::Stored(revision) | Written::Duplicate(revision) => Ok(revision),
            Written::Conflict => Err(KvError::Conflict(key.to_owned())),
        };
        async move { result }.boxed()
    }

    fn kv_delete<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), KvError>> {
        let mut state = self.lock();
        let exists = state
            .kv
            .get(&(bucket.to_owned(), key.to_owned()))
            .is_some_and(|slot| slot.value.is_some());
        if exists {
            state.write(bucket, key, None);
        }
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
