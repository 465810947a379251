//! Key-value storage in JetStream KV buckets.
//!
//! Buckets must exist and be granted to the handler (`kv.allow` in the host config). Every call
//! goes to JetStream; a `put` returns once the value is durably stored.
//!
//! ```no_run
//! # fn f() -> mailroom_sdk::Result {
//! let seen = mailroom_sdk::kv::get("counts", "orders.eu")?
//!     .map(|v| String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0))
//!     .unwrap_or(0);
//! mailroom_sdk::kv::put("counts", "orders.eu", (seen + 1).to_string())?;
//! # Ok(()) }
//! ```

use std::fmt;

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
}

impl KvError {
    fn from_wit(err: host::KvError) -> KvError {
        match err {
            host::KvError::Denied(bucket) => KvError::Denied { bucket },
            host::KvError::NoSuchBucket(bucket) => KvError::NoSuchBucket { bucket },
            host::KvError::InvalidKey(key) => KvError::InvalidKey { key },
            host::KvError::TooLarge(limit) => KvError::TooLarge { limit },
            host::KvError::Unavailable(reason) => KvError::Unavailable { reason },
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
        }
    }
}

impl std::error::Error for KvError {}

/// `?` on a KV call: unavailable (and a missing bucket, which an operator may still create)
/// retries the message; denied, bad keys and oversized values reject it.
impl From<KvError> for Error {
    fn from(err: KvError) -> Error {
        match err {
            KvError::Unavailable { .. } | KvError::NoSuchBucket { .. } => {
                Error::retry(err.to_string())
            }
            _ => Error::reject(err.to_string()),
        }
    }
}

/// Reads the current value of `key` in `bucket`; `None` when absent or deleted.
pub fn get(bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
    host::get(bucket, key).map_err(KvError::from_wit)
}

/// Stores `value` under `key` in `bucket` and returns the new revision once durably stored.
pub fn put(bucket: &str, key: &str, value: impl AsRef<[u8]>) -> Result<u64, KvError> {
    host::put(bucket, key, value.as_ref()).map_err(KvError::from_wit)
}

/// Deletes `key` from `bucket`. Deleting a missing key succeeds.
pub fn delete(bucket: &str, key: &str) -> Result<(), KvError> {
    host::delete(bucket, key).map_err(KvError::from_wit)
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
    }
}
