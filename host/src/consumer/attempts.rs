//! The attempts ledger: how many times a message really ran, kept in a KV bucket
//! (`MR_ATTEMPTS`) so it outlives the host and the consumer that delivered it.
//!
//! JetStream counts deliveries, which overcounts (a message handed back at a drain was
//! delivered but never ran) and undercounts (in-place retries are invisible to it, and a new
//! partition consumer starts every count at 1). So the host records, per message of the
//! handler's stream, the executions that failed and the deliveries it handed back without
//! running. Writes happen only off the success path: on a failure, on a hand-back, and once
//! more to remove the record when a message that has one is settled. Reads happen only for a
//! redelivery of the durable consumer, and once per acquired partition (the whole handler's
//! records, which exist only for messages that are failing right now).
//!
//! Without the bucket (no permission to create it, say) attempts fall back to JetStream's
//! delivery count plus this host's in-place retries, as a warning at start says.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::job::Job;

/// The ledger bucket.
pub const BUCKET: &str = "MR_ATTEMPTS";
/// How long a record lives without being written (a message that nobody settles for a week
/// loses its count, and starts again from JetStream's).
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the ledger knows of one message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Executions that failed.
    #[serde(default)]
    pub failed: u32,
    /// Deliveries handed back without running.
    #[serde(default)]
    pub handed_back: u32,
}

/// One handler's view of the ledger.
pub struct Attempts {
    store: Option<kv::Store>,
    handler: String,
}

impl Attempts {
    /// Opens (creating it if needed) the ledger bucket with `replicas`.
    pub async fn open(js: &jetstream::Context, handler: &str, replicas: usize) -> Attempts {
        let store = match js.get_key_value(BUCKET).await {
            Ok(store) => Some(store),
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: BUCKET.to_owned(),
                    description: "Mailroom: failed executions and hand-backs per message".into(),
                    history: 1,
                    max_age: MAX_AGE,
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
            {
                Ok(store) => Some(store),
                // Another host created it at the same moment.
                Err(_) => match js.get_key_value(BUCKET).await {
                    Ok(store) => Some(store),
                    Err(err) => {
                        tracing::warn!(
                            handler,
                            "cannot open or create the KV bucket {BUCKET} ({err}); attempts are \
                             counted from JetStream's deliveries, so hand-backs count and \
                             in-place retries are forgotten when a host stops"
                        );
                        None
                    }
                },
            },
        };
        Attempts {
            store,
            handler: handler.to_owned(),
        }
    }

    /// A ledger that records nothing (tests, or no bucket).
    pub fn disabled(handler: &str) -> Attempts {
        Attempts {
            store: None,
            handler: handler.to_owned(),
        }
    }

    fn key(&self, origin_sequence: u64) -> String {
        format!("{}.{origin_sequence}", self.handler)
    }

    /// Fills in what the ledger knows of `job` (once per held message). `preloaded` is a
    /// partition's records read when it was acquired; without it a redelivery is looked up.
    pub async fn recall(&self, job: &mut Job, preloaded: Option<&HashMap<u64, Record>>) {
        if job.recorded.is_some() {
            return;
        }
        let found = match preloaded {
            Some(records) => records.get(&job.delivery.origin_sequence).copied(),
            None if job.delivery.delivered > 1 => self.get(job.delivery.origin_sequence).await,
            None => None,
        };
        job.recorded = Some(found.is_some());
        if let Some(record) = found {
            job.failed = job.failed.max(record.failed);
            job.handed_back = job.handed_back.max(record.handed_back);
        }
    }

    async fn get(&self, origin_sequence: u64) -> Option<Record> {
        let store = self.store.as_ref()?;
        match store.get(self.key(origin_sequence)).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
            Ok(None) => None,
            Err(err) => {
                tracing::debug!(handler = %self.handler, origin_sequence, "attempts ledger read failed: {err}");
                None
            }
        }
    }

    /// Counts a failed execution of `job` and records it.
    pub async fn record_failure(&self, job: &mut Job) {
        job.failed = job.failed.saturating_add(1);
        self.write(job).await;
    }

    /// Counts a hand-back of `job` (it never ran on this delivery) and records it.
    pub async fn record_hand_back(&self, job: &mut Job) {
        job.handed_back = job.handed_back.saturating_add(1);
        self.write(job).await;
    }

    async fn write(&self, job: &mut Job) {
        let Some(store) = &self.store else {
            return;
        };
        let record = Record {
            failed: job.failed,
            handed_back: job.handed_back,
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        match store
            .put(self.key(job.delivery.origin_sequence), value.into())
            .await
        {
            Ok(_) => job.recorded = Some(true),
            Err(err) => tracing::warn!(
                handler = %self.handler,
                origin_sequence = job.delivery.origin_sequence,
                "could not record the attempt in {BUCKET} ({err}); the next host may count \
                 attempts from JetStream's deliveries"
            ),
        }
    }

    /// Removes `job`'s record once it is settled for good (acked or dead-lettered).
    pub async fn forget(&self, job: &Job) {
        let (Some(store), Some(true)) = (&self.store, job.recorded) else {
            return;
        };
        if let Err(err) = store.purge(self.key(job.delivery.origin_sequence)).await {
            tracing::debug!(handler = %self.handler, "removing an attempts record failed: {err}");
        }
    }

    /// Every record of this handler (read when a partition is acquired).
    pub async fn load_all(&self) -> HashMap<u64, Record> {
        let mut out = HashMap::new();
        let Some(store) = &self.store else {
            return out;
        };
        let prefix = format!("{}.", self.handler);
        let filter = format!("$KV.{BUCKET}.{prefix}>");
        let stream = store.stream.clone();
        let keys: Vec<String> = match stream.info_with_subjects(&filter).await {
            Ok(subjects) => {
                subjects
                    .filter_map(|entry| async move { entry.ok().map(|(subject, _)| subject) })
                    .collect()
                    .await
            }
            Err(err) => {
                tracing::warn!(handler = %self.handler, "reading the attempts ledger failed: {err}");
                return out;
            }
        };
        for subject in keys {
            let Some(key) = subject.strip_prefix(&format!("$KV.{BUCKET}.")) else {
                continue;
            };
            let Some(seq) = key
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            if let Ok(Some(bytes)) = store.get(key).await {
                if let Ok(record) = serde_json::from_slice::<Record>(&bytes) {
                    out.insert(seq, record);
                }
            }
        }
        out
    }
}
