//! The group as this host sees it: the KV watch of the handler's members and leases, folded
//! into a [`View`].

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::lease::View;
use super::store::{self, GroupStore, Seen};

/// Whether the watch still delivers. A KV watch that stalled without ending would leave this
/// host waiting forever for leases to expire (the suspected cause of a cluster-test run, after
/// the bucket's leader was killed, in which a host never took its fenced partitions back).
/// Its own member record is written every renewal period, so once such a write succeeded,
/// an entry at or past that revision must arrive soon; if none does, the watch is stalled.
#[derive(Debug, Default)]
pub(super) struct Echo {
    /// The highest revision the watch delivered.
    seen: u64,
    /// A revision written (and when the write was confirmed) that the watch has not
    /// delivered yet.
    awaiting: Option<(u64, Instant)>,
}

impl Echo {
    /// A write of this host's was stored at `revision`.
    pub fn wrote(&mut self, revision: u64, at: Instant) {
        if revision > self.seen && self.awaiting.is_none() {
            self.awaiting = Some((revision, at));
        }
    }

    /// The watch delivered an entry at `revision`.
    pub fn saw(&mut self, revision: u64) {
        self.seen = self.seen.max(revision);
        if self.awaiting.is_some_and(|(r, _)| revision >= r) {
            self.awaiting = None;
        }
    }

    /// Whether a confirmed write has not come back within `patience`.
    pub fn stalled(&self, now: Instant, patience: Duration) -> bool {
        self.awaiting
            .is_some_and(|(_, at)| now.saturating_duration_since(at) >= patience)
    }
}

pub(super) fn apply_seen(view: &mut View, seen: Seen) {
    match seen {
        Seen::Member(id, record) => {
            view.hosts.insert(id, record.draining);
        }
        Seen::MemberGone(id) => {
            view.hosts.remove(&id);
        }
        Seen::Lease(partition, record) => {
            view.leases.insert(partition, record.host);
        }
        Seen::LeaseGone(partition) => {
            view.leases.remove(&partition);
        }
        Seen::Other => {}
    }
}

/// Opens the watch and reads the current state into `view` (retrying until it works or
/// `shutdown`).
pub(super) async fn open_watch(
    store: &GroupStore,
    view: &mut View,
    shutdown: &CancellationToken,
) -> Option<async_nats::jetstream::kv::Watch> {
    let prefix = store.prefix();
    loop {
        match store.watch().await {
            Ok(mut watch) => {
                // The first snapshot ends with the entry that has nothing after it; this
                // host's own record guarantees there is one.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                while let Ok(Some(Ok(entry))) =
                    tokio::time::timeout_at(deadline, watch.next()).await
                {
                    let last = entry.delta == 0;
                    apply_seen(view, store::read(&prefix, &entry));
                    if last {
                        break;
                    }
                }
                return Some(watch);
            }
            Err(err) => {
                tracing::warn!("cannot watch the partition group: {err:#}; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

pub(super) async fn next_entry(
    watch: &mut Option<async_nats::jetstream::kv::Watch>,
) -> Option<async_nats::jetstream::kv::Entry> {
    match watch {
        Some(w) => loop {
            match w.next().await {
                Some(Ok(entry)) => return Some(entry),
                Some(Err(err)) => {
                    tracing::debug!("partition group watch: {err}");
                    continue;
                }
                None => return None,
            }
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_that_never_comes_back_through_the_watch_means_it_stalled() {
        let t0 = Instant::now();
        let patience = Duration::from_secs(3);
        let mut echo = Echo::default();
        echo.wrote(10, t0);
        assert!(!echo.stalled(t0 + Duration::from_secs(2), patience));
        echo.saw(9);
        assert!(
            echo.stalled(t0 + patience, patience),
            "9 is before the write"
        );
        echo.saw(11);
        assert!(!echo.stalled(t0 + Duration::from_secs(60), patience));
        // The watch may deliver the write before the write's reply is handled.
        echo.saw(12);
        echo.wrote(12, t0 + Duration::from_secs(5));
        assert!(!echo.stalled(t0 + Duration::from_secs(60), patience));
    }
}
