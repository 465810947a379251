//! Key-value storage in JetStream KV buckets.
//!
//! Buckets must exist and be granted to the handler (`kv.allow` in the host config). Every call
//! goes to JetStream; a write returns once the value is durably stored.
//!
//! # Effectively-once state
//!
//! A message can run more than once: its host can die after the handler wrote a key and before
//! the message was acked, and the redelivery runs it again. A plain read-modify-write then
//! applies its effect twice. [`apply_once`] applies it once: it reads the key with its revision,
//! writes the new value only if nobody wrote in between ([`put_if`], [`create`]), and the host
//! gives that conditional write an idempotency id made of the message and the key, so a re-run
//! of the same message stores nothing (within the bucket's duplicate window, 2 minutes).
//!
//! ```no_run
//! # fn f(msg: &mailroom_sdk::Message) -> mailroom_sdk::Result {
//! use mailroom_sdk::{kv, Error};
//!
//! kv::apply_once("counts", msg.subject(), |current| {
//!     let count: u64 = match current {
//!         Some(bytes) => String::from_utf8_lossy(bytes)
//!             .parse()
//!             .map_err(|_| Error::reject("not a number"))?,
//!         None => 0,
//!     };
//!     Ok((count + 1).to_string().into_bytes())
//! })?;
//! # Ok(()) }
//! ```

use std::fmt;

use crate::host as sys;
use crate::wit::mailroom::handler::kv as host;
use crate::Error;

/// Why a key-value call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The bucket is outside this handler's grant (`kv.allow` in the host config).
    Denied {
        /// The refused bucket.
        bucket: String,
    },
    /// No bucket of that name exists.
    NoSuchBucket {
        /// The missing bucket.
        bucket: String,
    },
    /// The key is not a valid KV key (letters, digits and `-_=./`, not empty).
    InvalidKey {
        /// The refused key.
        key: String,
    },
    /// The value is larger than the server accepts.
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The store could not be reached or failed; retrying later may work.
    Unavailable {
        /// What went wrong.
        reason: String,
    },
    /// A conditional write ([`put_if`], [`create`]) lost: the key was written after it was
    /// read, or it exists. Nothing was stored; read it again.
    Conflict {
        /// The key.
        key: String,
    },
}

impl KvError {
    fn from_wit(err: host::KvError) -> KvError {
        match err {
            host::KvError::Denied(bucket) => KvError::Denied { bucket },
            host::KvError::NoSuchBucket(bucket) => KvError::NoSuchBucket { bucket },
            host::KvError::InvalidKey(key) => KvError::InvalidKey { key },
            host::KvError::TooLarge(limit) => KvError::TooLarge { limit },
            host::KvError::Unavailable(reason) => KvError::Unavailable { reason },
            host::KvError::Conflict(key) => KvError::Conflict { key },
        }
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Denied { bucket } => {
                write!(
                    f,
                    "KV bucket {bucket} denied: not in this handler's kv.allow"
                )
            }
            KvError::NoSuchBucket { bucket } => write!(f, "no KV bucket named {bucket}"),
            KvError::InvalidKey { key } => write!(f, "invalid KV key {key:?}"),
            KvError::TooLarge { limit } => {
                write!(
                    f,
                    "KV value too large: the server accepts at most {limit} bytes"
                )
            }
            KvError::Unavailable { reason } => write!(f, "KV unavailable: {reason}"),
            KvError::Conflict { key } => {
                write!(
                    f,
                    "conflicting write to KV key {key}: it changed since it was read"
                )
            }
        }
    }
}

impl std::error::Error for KvError {}

/// `?` on a KV call: unavailable (and a missing bucket, which an operator may still create)
/// and a conflict (read again and it may pass) retry the message; denied, bad keys and
/// oversized values reject it.
impl From<KvError> for Error {
    fn from(err: KvError) -> Error {
        match err {
            KvError::Unavailable { .. }
            | KvError::NoSuchBucket { .. }
            | KvError::Conflict { .. } => Error::retry(err.to_string()),
            _ => Error::reject(err.to_string()),
        }
    }
}

/// A key's value and the revision of the write that stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value, unchanged.
    pub value: Vec<u8>,
    /// The revision that wrote it: pass it to [`put_if`].
    pub revision: u64,
}

/// Reads the current value of `key` in `bucket`; `None` when absent or deleted.
pub fn get(bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
    Ok(entry(bucket, key)?.map(|e| e.value))
}

/// Reads the current value of `key` in `bucket` with its revision; `None` when absent or
/// deleted.
pub fn entry(bucket: &str, key: &str) -> Result<Option<Entry>, KvError> {
    sys::kv_get(bucket, key)
        .map(|found| {
            found.map(|e| Entry {
                value: e.value,
                revision: e.revision,
            })
        })
        .map_err(KvError::from_wit)
}

/// Stores `value` under `key` in `bucket` and returns the new revision once durably stored.
pub fn put(bucket: &str, key: &str, value: impl AsRef<[u8]>) -> Result<u64, KvError> {
    sys::kv_put(bucket, key, value.as_ref()).map_err(KvError::from_wit)
}

/// Stores `value` under `key` only if the key's latest revision is still `revision` (as read
/// with [`entry`]); [`KvError::Conflict`] when it was written since. Applies once per message:
/// a re-run of the same message is recognised and stores nothing.
pub fn put_if(
    bucket: &str,
    key: &str,
    value: impl AsRef<[u8]>,
    revision: u64,
) -> Result<u64, KvError> {
    sys::kv_put_if(bucket, key, value.as_ref(), revision).map_err(KvError::from_wit)
}

/// Stores `value` under `key` only if the key does not exist (or was deleted);
/// [`KvError::Conflict`] when it exists. Applies once per message, like [`put_if`].
pub fn create(bucket: &str, key: &str, value: impl AsRef<[u8]>) -> Result<u64, KvError> {
    sys::kv_create(bucket, key, value.as_ref()).map_err(KvError::from_wit)
}

/// Deletes `key` from `bucket`. Deleting a missing key succeeds.
pub fn delete(bucket: &str, key: &str) -> Result<(), KvError> {
    sys::kv_delete(bucket, key).map_err(KvError::from_wit)
}

/// Conflicting writes [`apply_once`] absorbs before it asks for a retry.
pub const APPLY_ATTEMPTS: u32 = 16;

/// Applies the current message's effect to `key` exactly once, and returns the revision that
/// holds it.
///
/// `update` gets the current value (`None` when the key is absent) and returns the new one; it
/// may run more than once (after a conflict, with the newer value), so it must only compute.
/// The write is conditional: when another writer got in between, the key is read again and
/// `update` runs again, up to [`APPLY_ATTEMPTS`] times, then the message is retried. When the
/// same message runs again (a retry, or a redelivery after its host died before acking) the
/// host recognises the write as already applied and stores nothing, within the bucket's
/// duplicate window (2 minutes by default).
///
/// An error returned by `update` is returned as is, and nothing is written.
pub fn apply_once<F>(bucket: &str, key: &str, mut update: F) -> Result<u64, Error>
where
    F: FnMut(Option<&[u8]>) -> Result<Vec<u8>, Error>,
{
    for _ in 0..APPLY_ATTEMPTS {
        let written = match entry(bucket, key)? {
            Some(current) => put_if(bucket, key, update(Some(&current.value))?, current.revision),
            None => create(bucket, key, update(None)?),
        };
        match written {
            Ok(revision) => return Ok(revision),
            Err(KvError::Conflict { .. }) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(Error::retry(format!(
        "{bucket}/{key} kept changing: {APPLY_ATTEMPTS} conflicting writes in a row"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_retry_and_permanent_ones_reject() {
        let e: Error = KvError::Unavailable {
            reason: "timeout".into(),
        }
        .into();
        assert!(e.is_retry());
        let e: Error = KvError::NoSuchBucket {
            bucket: "counts".into(),
        }
        .into();
        assert!(e.is_retry());
        assert!(e.reason().contains("counts"));
        let e: Error = KvError::Denied {
            bucket: "secrets".into(),
        }
        .into();
        assert!(e.is_reject());
        assert!(e.reason().contains("kv.allow"));
        let e: Error = KvError::from_wit(host::KvError::InvalidKey("a b".into())).into();
        assert!(e.is_reject());
        let e: Error = KvError::from_wit(host::KvError::Conflict("k".into())).into();
        assert!(e.is_retry(), "a conflict passes once the key is read again");
    }
}
