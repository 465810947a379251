//! The group's KV I/O: the `MR_GROUPS` bucket holding every handler's members
//! (`<handler>.<generation>.hosts.<id>`) and leases (`<handler>.<generation>.leases.<p>`;
//! the generation is `p<N>` for N partitions, `d` for the durable), with a `max_age`
//! equal to the lease TTL so that a key nobody renews disappears, and limit markers so that
//! watchers see it disappear.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The bucket.
pub const BUCKET: &str = "MR_GROUPS";

/// A member's record, renewed with its leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The host's label (`host.id` or the machine's name).
    pub name: String,
    /// The process id.
    pub pid: u32,
    /// Seconds since the Unix epoch when the host started.
    pub started: u64,
    /// The host is leaving (SIGTERM): it takes nothing and gives everything up.
    pub draining: bool,
    /// Partitions it holds.
    pub owned: Vec<u32>,
    /// The partition count it runs with.
    pub partitions: u32,
    /// The handler's partition count in this host's config (differs from `partitions` on a
    /// host draining a previous generation; 0 from hosts older than this field).
    #[serde(default)]
    pub configured: u32,
    /// Recent moves, newest last (at most a few): `"+3 12:00:01"` acquired, `"-3"` released,
    /// `"!3"` fenced.
    #[serde(default)]
    pub moves: Vec<String>,
    /// Mailroom version.
    pub version: String,
}

/// A lease's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holder's id.
    pub host: String,
    /// The lease epoch (0 in the create itself: the create's revision is the epoch).
    pub epoch: u64,
    /// Being released.
    #[serde(default)]
    pub releasing: bool,
}

/// How a lease renewal went.
#[derive(Debug)]
pub enum Renewal {
    /// Written: the lease lives `ttl` from now.
    Renewed(u64),
    /// An earlier renewal of this host had landed; this is its revision (the lease's
    /// validity is not extended by it).
    Adopted(u64),
    /// Another host holds the lease, or it expired.
    Lost,
    /// No answer: try again.
    Unavailable(String),
}

/// Why a write did not take.
#[derive(Debug)]
pub enum WriteError {
    /// Someone else wrote first (the compare-and-set failed).
    Conflict,
    /// NATS or the bucket could not be reached.
    Unavailable(String),
}

/// A handler's keys in the bucket.
#[derive(Clone)]
pub struct GroupStore {
    /// The bucket.
    pub kv: kv::Store,
    handler: String,
    /// The lease TTL: the bucket's `max_age`.
    pub ttl: Duration,
}

impl GroupStore {
    /// Opens the bucket, creating it with `ttl` and `replicas` if it does not exist. The TTL
    /// in force is the bucket's own.
    pub async fn open(
        js: &jetstream::Context,
        handler: &str,
        generation: &str,
        ttl: Duration,
        replicas: usize,
    ) -> anyhow::Result<GroupStore> {
        let store = match js.get_key_value(BUCKET).await {
            Ok(store) => store,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: BUCKET.to_owned(),
                    description: "Mailroom: partition group members and leases".into(),
                    history: 1,
                    max_age: ttl,
                    num_replicas: replicas.max(1),
                    limit_markers: Some(ttl.max(Duration::from_secs(2))),
                    ..Default::default()
                })
                .await
            {
                Ok(store) => store,
                Err(err) => js.get_key_value(BUCKET).await.map_err(|_| {
                    anyhow::anyhow!(
                        "cannot create the KV bucket {BUCKET} for partition leases: {err} \
                         (partitioned handlers need nats-server 2.11 or newer and permission \
                         to create KV buckets)"
                    )
                })?,
            },
        };
        let mut stream = store.stream.clone();
        let actual = stream.info().await?.config.max_age;
        if actual.is_zero() {
            anyhow::bail!(
                "the KV bucket {BUCKET} has no max_age, so its leases would never expire; \
                 delete it (nats kv del {BUCKET}) and let Mailroom create it"
            );
        }
        if actual != ttl {
            tracing::warn!(
                handler,
                "host.lease_ttl is {ttl:?} but the bucket {BUCKET} was created with {actual:?}; \
                 using the bucket's (every host must use the same)"
            );
        }
        Ok(GroupStore {
            kv: store,
            handler: format!("{handler}.{generation}"),
            ttl: actual,
        })
    }

    /// The prefix of this handler's keys.
    pub fn prefix(&self) -> String {
        format!("{}.", self.handler)
    }

    fn host_key(&self, id: &str) -> String {
        format!("{}.hosts.{id}", self.handler)
    }

    fn lease_key(&self, partition: u32) -> String {
        format!("{}.leases.{partition}", self.handler)
    }

    /// Writes this host's record: a create when `revision` is `None`, else a
    /// compare-and-set update. Returns the new revision.
    pub async fn put_member(
        &self,
        id: &str,
        record: &MemberRecord,
        revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        let value = Bytes::from(serde_json::to_vec(record).unwrap_or_default());
        let key = self.host_key(id);
        match revision {
            Some(revision) => self.update(&key, value, revision).await,
            None => self.create(&key, value).await,
        }
    }

    /// The member records there are now, by host id.
    pub async fn members(&self) -> anyhow::Result<Vec<(String, MemberRecord)>> {
        use futures::StreamExt as _;
        let prefix = format!("{}.hosts.", self.handler);
        let mut keys = self.kv.keys().await?;
        let mut members = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key?;
            let Some(id) = key.strip_prefix(&prefix) else {
                continue;
            };
            if let Some(value) = self.kv.get(&key).await? {
                if let Ok(record) = serde_json::from_slice(&value) {
                    members.push((id.to_owned(), record));
                }
            }
        }
        Ok(members)
    }

    /// Removes this host's record.
    pub async fn delete_member(&self, id: &str) {
        if let Err(err) = self.kv.purge(self.host_key(id)).await {
            tracing::debug!("removing member record: {err}");
        }
    }

    /// Creates the lease of `partition`; its revision is the epoch.
    pub async fn create_lease(&self, partition: u32, host: &str) -> Result<u64, WriteError> {
        let record = LeaseRecord {
            host: host.to_owned(),
            epoch: 0,
            releasing: false,
        };
        let value = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
        self.create(&self.lease_key(partition), value).await
    }

    /// Renews a held lease (compare-and-set on `revision`), waiting at most `patience` for
    /// the answer. A compare-and-set that fails because an earlier renewal of this host landed
    /// after it had given up on it is not a loss: the lease is still this epoch's.
    pub async fn renew_lease(
        &self,
        partition: u32,
        record: &LeaseRecord,
        revision: u64,
        patience: Duration,
    ) -> Renewal {
        let key = self.lease_key(partition);
        let value = Bytes::from(serde_json::to_vec(record).unwrap_or_default());
        match tokio::time::timeout(patience, self.update(&key, value, revision)).await {
            Err(_) => Renewal::Unavailable(format!("no answer within {patience:?}")),
            Ok(Ok(revision)) => Renewal::Renewed(revision),
            Ok(Err(WriteError::Unavailable(err))) => Renewal::Unavailable(err),
            Ok(Err(WriteError::Conflict)) => match self.kv.entry(key).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    let current: Option<LeaseRecord> = serde_json::from_slice(&entry.value).ok();
                    match current {
                        Some(current)
                            if current.host == record.host
                                && (current.epoch == record.epoch
                                    || entry.revision == record.epoch) =>
                        {
                            Renewal::Adopted(entry.revision)
                        }
                        _ => Renewal::Lost,
                    }
                }
                Ok(_) => Renewal::Lost,
                Err(err) => Renewal::Unavailable(err.to_string()),
            },
        }
    }

    /// Deletes a lease this host released (only if nobody wrote it since `revision`).
    pub async fn delete_lease(&self, partition: u32, revision: u64) -> Result<(), WriteError> {
        self.kv
            .delete_expect_revision(self.lease_key(partition), Some(revision))
            .await
            .map_err(|err| WriteError::Unavailable(err.to_string()))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64, WriteError> {
        self.kv
            .create(key, value)
            .await
            .map_err(|err| match err.kind() {
                kv::CreateErrorKind::AlreadyExists => WriteError::Conflict,
                _ => WriteError::Unavailable(err.to_string()),
            })
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, WriteError> {
        self.kv
            .update(key, value, revision)
            .await
            .map_err(|err| match err.kind() {
                kv::UpdateErrorKind::WrongLastRevision => WriteError::Conflict,
                _ => WriteError::Unavailable(err.to_string()),
            })
    }

    /// Watches this handler's keys: every current value first, then every change (expiries
    /// arrive as purges).
    pub async fn watch(&self) -> anyhow::Result<kv::Watch> {
        Ok(self
            .kv
            .watch_with_history(format!("{}.>", self.handler))
            .await?)
    }
}

/// What a watched entry says.
#[derive(Debug)]
pub enum Seen {
    /// A member is present.
    Member(String, MemberRecord),
    /// A member is gone.
    MemberGone(String),
    /// A lease is held.
    Lease(u32, LeaseRecord),
    /// A lease is free.
    LeaseGone(u32),
    /// Something else.
    Other,
}

/// Interprets a watched entry of this handler's keys.
pub fn read(prefix: &str, entry: &kv::Entry) -> Seen {
    let Some(rest) = entry.key.strip_prefix(prefix) else {
        return Seen::Other;
    };
    let gone = matches!(
        entry.operation,
        kv::Operation::Delete | kv::Operation::Purge
    );
    if let Some(id) = rest.strip_prefix("hosts.") {
        if gone {
            return Seen::MemberGone(id.to_owned());
        }
        return match serde_json::from_slice(&entry.value) {
            Ok(record) => Seen::Member(id.to_owned(), record),
            Err(_) => Seen::Other,
        };
    }
    if let Some(p) = rest.strip_prefix("leases.") {
        let Ok(partition) = p.parse() else {
            return Seen::Other;
        };
        if gone {
            return Seen::LeaseGone(partition);
        }
        return match serde_json::from_slice(&entry.value) {
            Ok(record) => Seen::Lease(partition, record),
            Err(_) => Seen::Other,
        };
    }
    Seen::Other
}
