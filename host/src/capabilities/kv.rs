//! The `kv` import: grant and key checks, then the [`Backend`]; conditional writes get the
//! idempotency id that makes them apply once per message.

use super::{subject, CallContext};
use crate::runtime::bindings::mailroom::handler::kv;

/// The WIT error a refused KV call returns.
pub type KvError = kv::KvError;
/// A key's value and revision, as `get` returns it.
pub type KvEntry = kv::Entry;

/// What a conditional write expects of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key's latest write has this revision (`put-if`).
    Revision(u64),
    /// The key does not exist or was deleted (`create`).
    Absent,
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

    fn check_size(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        let max = self.caps.backend.max_payload();
        if value.len() + key.len() + 64 > max {
            return Err(KvError::TooLarge(max as u64));
        }
        Ok(())
    }

    /// A conditional write on behalf of this call's message: the idempotency id is
    /// `handler:stream:seq:kv:bucket/key:n`, `n` counting this call's earlier successful
    /// conditional writes to the same key, so that a re-run making the same writes gets the
    /// same ids whatever conflicts it met on the way.
    pub(super) async fn write_if(
        &mut self,
        bucket: String,
        key: String,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64, KvError> {
        self.check_kv(&bucket, &key)?;
        self.check_fence()?;
        self.check_size(&key, &value)?;
        let path = format!("{bucket}/{key}");
        let slot = self.kv_written.iter().position(|(p, _)| *p == path);
        let n = slot.map_or(0, |i| self.kv_written[i].1);
        let once_id = format!(
            "{}:{}:{}:kv:{path}:{n}",
            self.caps.name, self.stream, self.sequence
        );
        let revision = self
            .caps
            .backend
            .kv_put_if(&bucket, &key, value, expect, once_id)
            .await?;
        match slot {
            Some(i) => self.kv_written[i].1 += 1,
            None => self.kv_written.push((path, 1)),
        }
        Ok(revision)
    }

    pub(super) async fn get_entry(
        &mut self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<KvEntry>, KvError> {
        self.check_kv(bucket, key)?;
        self.caps.backend.kv_get(bucket, key).await
    }

    pub(super) async fn put_plain(
        &mut self,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
    ) -> Result<u64, KvError> {
        self.check_kv(bucket, key)?;
        self.check_fence()?;
        self.check_size(key, &value)?;
        self.caps.backend.kv_put(bucket, key, value).await
    }

    pub(super) async fn delete_key(&mut self, bucket: &str, key: &str) -> Result<(), KvError> {
        self.check_kv(bucket, key)?;
        self.check_fence()?;
        self.caps.backend.kv_delete(bucket, key).await
    }
}

impl kv::Host for CallContext {
    async fn get(
        &mut self,
        bucket: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<KvEntry>, KvError>> {
        Ok(self.get_entry(&bucket, &key).await)
    }

    async fn put(
        &mut self,
        bucket: String,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<u64, KvError>> {
        Ok(self.put_plain(&bucket, &key, value).await)
    }

    async fn put_if(
        &mut self,
        bucket: String,
        key: String,
        value: Vec<u8>,
        revision: u64,
    ) -> wasmtime::Result<Result<u64, KvError>> {
        Ok(self
            .write_if(bucket, key, value, Expect::Revision(revision))
            .await)
    }

    async fn create(
        &mut self,
        bucket: String,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<u64, KvError>> {
        Ok(self.write_if(bucket, key, value, Expect::Absent).await)
    }

    async fn delete(
        &mut self,
        bucket: String,
        key: String,
    ) -> wasmtime::Result<Result<(), KvError>> {
        Ok(self.delete_key(&bucket, &key).await)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::capabilities::tests::caps;
    use crate::capabilities::{MemoryBackend, Recorded, Written};
    use kv::Host as _;

    #[tokio::test]
    async fn kv_checks_grant_and_key() {
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let mut call = CallContext::new(caps(backend), "S".into(), 1);
        let denied = call.get("secrets".into(), "k".into()).await.unwrap();
        assert!(matches!(denied, Err(KvError::Denied(b)) if b == "secrets"));
        let bad = call
            .put("counts".into(), "a b".into(), vec![])
            .await
            .unwrap();
        assert!(matches!(bad, Err(KvError::InvalidKey(_))));
        let revision = call
            .put("counts".into(), "a".into(), b"1".to_vec())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(revision, 1);
        let entry = call
            .get("counts".into(), "a".into())
            .await
            .unwrap()
            .unwrap()
            .expect("stored");
        assert_eq!((entry.value, entry.revision), (b"1".to_vec(), 1));
        call.delete("counts".into(), "a".into())
            .await
            .unwrap()
            .unwrap();
        let gone = call
            .get("counts".into(), "a".into())
            .await
            .unwrap()
            .unwrap();
        assert!(gone.is_none());
    }

    #[tokio::test]
    async fn conditional_writes_conflict_and_apply_once_per_message() {
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let caps = caps(backend.clone());
        let mut call = CallContext::new(caps.clone(), "S".into(), 7);
        let first = call
            .create("counts".into(), "k".into(), b"1".to_vec())
            .await
            .unwrap()
            .unwrap();
        // The key exists now: a second create (another key of logic) conflicts, typed.
        let again = call
            .create("counts".into(), "k".into(), b"x".to_vec())
            .await
            .unwrap();
        assert!(matches!(again, Err(KvError::Conflict(k)) if k == "k"));
        // A stale revision conflicts; the current one wins.
        let stale = call
            .put_if("counts".into(), "k".into(), b"2".to_vec(), first + 10)
            .await
            .unwrap();
        assert!(matches!(stale, Err(KvError::Conflict(_))));
        let second = call
            .put_if("counts".into(), "k".into(), b"2".to_vec(), first)
            .await
            .unwrap()
            .unwrap();
        assert!(second > first);

        // The same message running again (a re-run after a crash) reads "2" and writes "3"
        // with the current revision: the store recognises both writes as done.
        let mut rerun = CallContext::new(caps.clone(), "S".into(), 7);
        let dup = rerun
            .put_if("counts".into(), "k".into(), b"3".to_vec(), second)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            dup, first,
            "the re-run's first write is the original first write"
        );
        let value = rerun.get("counts".into(), "k".into()).await.unwrap();
        assert_eq!(value.unwrap().unwrap().value, b"2");

        // Another message is a different write.
        let mut next = CallContext::new(caps, "S".into(), 8);
        let third = next
            .put_if("counts".into(), "k".into(), b"3".to_vec(), second)
            .await
            .unwrap()
            .unwrap();
        assert!(third > second);
        let ids: Vec<(String, Written)> = backend
            .recorded()
            .into_iter()
            .filter_map(|r| match r {
                Recorded::KvPutIf {
                    once_id, written, ..
                } => Some((once_id, written)),
                _ => None,
            })
            .collect();
        assert_eq!(ids[0].0, "h:S:7:kv:counts/k:0");
        assert_eq!(ids[3].0, "h:S:7:kv:counts/k:1");
        assert_eq!(
            ids[4],
            ("h:S:7:kv:counts/k:0".to_owned(), Written::Duplicate(first))
        );
        assert_eq!(ids[5].0, "h:S:8:kv:counts/k:0");
    }

    #[tokio::test]
    async fn create_succeeds_over_a_deleted_key() {
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let mut call = CallContext::new(caps(backend), "S".into(), 1);
        call.put("counts".into(), "k".into(), b"1".to_vec())
            .await
            .unwrap()
            .unwrap();
        call.delete("counts".into(), "k".into())
            .await
            .unwrap()
            .unwrap();
        call.create("counts".into(), "k".into(), b"2".to_vec())
            .await
            .unwrap()
            .expect("a deleted key can be created again");
    }
}
