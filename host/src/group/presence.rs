//! Presence of hosts on a handler without partitions: each host registers in the group
//! bucket, so that `mailroom status` lists it and, for an ordered handler, so that a host that
//! finds another live host on the same handler warns that per-key order across hosts is not
//! kept, and names the fix.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::store::{self, GroupStore, MemberRecord, Seen};

/// Registers this host for `handler` until `shutdown`; for an `ordered` one, warns once per
/// other host seen.
pub async fn run(
    store: GroupStore,
    handler: String,
    ordered: bool,
    id: String,
    name: String,
    stop: CancellationToken,
) {
    let renew = store.ttl / 4;
    let record = MemberRecord {
        name,
        pid: std::process::id(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..MemberRecord::default()
    };
    let mut revision = None;
    let mut warned: BTreeSet<String> = BTreeSet::new();
    let prefix = store.prefix();
    let mut watch = store.watch().await.ok();
    let mut tick = tokio::time::interval(renew.max(Duration::from_millis(500)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                revision = store.put_member(&id, &record, revision).await.ok();
            }
            Some(Ok(entry)) = async {
                match watch.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Seen::Member(other, _) = store::read(&prefix, &entry) {
                    if ordered && other != id && warned.insert(other.clone()) {
                        tracing::warn!(
                            handler = %handler,
                            other_host = %other,
                            "another host runs this ordered handler too, without partitions: \
                             the two can run messages of one key at the same time and out of \
                             order. Set partitions (e.g. partitions = 16) in this handler's \
                             [[handler]] table on every host to keep per-key order across hosts"
                        );
                    }
                }
            }
        }
    }
    store.delete_member(&id).await;
}
