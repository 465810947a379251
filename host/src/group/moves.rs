//! The moves of a partition on this host, as the group loop (`super::run`) starts them:
//! acquire (create the lease, attach), release (drain, then the loop deletes the lease) and
//! fence (give it up at once).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::consumer::{Attached, Claim, Intake};
use crate::fence::Fence;
use crate::telemetry::HandlerMetrics;

use super::lease::{FenceReason, Held, Local, Timing};
use super::store::{GroupStore, LeaseRecord, MemberRecord, Renewal};
use super::{Done, Op, MOVES_KEPT};

/// Creates the lease of `partition` and attaches the partition.
pub(super) async fn acquire(
    intake: &Intake,
    store: &GroupStore,
    me: &str,
    stream: Arc<str>,
    partition: u32,
    timing: Timing,
    cutover: Option<u64>,
) -> Done {
    let sent = Instant::now();
    let epoch = match store.create_lease(partition, me).await {
        Ok(revision) => revision,
        Err(err) => {
            return Done::AcquireFailed {
                partition,
                error: format!("{err:?}"),
            }
        }
    };
    let mut held = Held::created(epoch, sent);
    let claim = Claim {
        stream,
        partition,
        epoch,
        fence: Arc::new(Fence::until(held.valid_until(&timing))),
        skip_above: cutover,
    };
    match intake.attach(claim).await {
        Ok(attached) => {
            // Attaching can take a while (deleting the previous owner's consumer, creating
            // this one): renew once, so the partition does not start with a lease that is
            // about to need renewing already.
            let sent = Instant::now();
            let lease = LeaseRecord {
                host: me.to_owned(),
                epoch,
                releasing: false,
            };
            match store
                .renew_lease(partition, &lease, held.revision, timing.renew_every)
                .await
            {
                Renewal::Renewed(revision) => {
                    held.renewed(sent, revision);
                    // If attaching outlasted the fence, the loop gives the partition up.
                    let _ = attached.binding.fence.extend(held.valid_until(&timing));
                }
                Renewal::Adopted(revision) => held.revision = revision,
                Renewal::Lost | Renewal::Unavailable(_) => {}
            }
            Done::Acquired {
                partition,
                held,
                attached,
            }
        }
        Err(err) => {
            // Give the lease back at once rather than sit on a partition nobody pulls.
            let _ = store.delete_lease(partition, epoch).await;
            tracing::warn!(partition, "could not attach the partition: {err:#}");
            Done::AcquireFailed {
                partition,
                error: format!("{err:#}"),
            }
        }
    }
}

/// Starts giving `partition` up gracefully (see `Attached::release`); the loop deletes the
/// lease once it is drained.
pub(super) fn release<'a>(
    intake: &'a Intake,
    local: &mut Local,
    attached: Attached,
    partition: u32,
    timeout: Duration,
) -> Op<'a> {
    local.busy.insert(partition);
    if let Some(held) = local.held.get_mut(&partition) {
        held.releasing = true;
    }
    Box::pin(async move {
        let started = Instant::now();
        let released = attached.release(intake, timeout).await;
        Done::Drained {
            partition,
            started,
            released,
        }
    })
}

/// Gives `partition` up at once.
#[allow(clippy::too_many_arguments)]
pub(super) fn fence(
    intake: &Intake,
    local: &mut Local,
    attached: &mut HashMap<u32, Attached>,
    record: &mut MemberRecord,
    partition: u32,
    reason: FenceReason,
    m: &HandlerMetrics,
    handler: &str,
) {
    local.held.remove(&partition);
    if let Some(a) = attached.remove(&partition) {
        a.fence(intake);
    }
    HandlerMetrics::incr(&m.self_fences);
    note_move(record, '!', partition);
    match reason {
        FenceReason::Expired => tracing::error!(
            handler,
            partition,
            "partition FENCED: its lease could not be renewed in time, so this host stopped \
             running it before another host could take it"
        ),
        FenceReason::TakenOver => tracing::warn!(
            handler,
            partition,
            "partition FENCED: another host holds its lease now"
        ),
    }
}

pub(super) fn note_move(record: &mut MemberRecord, sign: char, partition: u32) {
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    record.moves.push(format!("{sign}{partition}@{at}"));
    if record.moves.len() > MOVES_KEPT {
        record.moves.remove(0);
    }
}
