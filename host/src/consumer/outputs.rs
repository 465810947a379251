//! Sending a successful attempt's staged publishes and waiting until they are stored.
//!
//! The handler's publishes were staged during the call (see `capabilities`); only an attempt
//! that returned `ok` gets here. All of them are sent at once (pipelined) and their
//! confirmations awaited together. A publish whose stream is unavailable right now (no
//! leader during an election, a disconnect) is sent again, with the same `Nats-Msg-Id`, after
//! a backoff, until it is stored or the retry budget is spent; only then does the attempt
//! count as failed. A publish the stream refuses fails the attempt at once.

use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::capabilities::{Backend, NotStored, Outbound, Stored};
use crate::telemetry::HandlerMetrics;

/// The first pause before sending an unavailable publish again; it doubles up to
/// [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// What became of a successful attempt's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Publishes a stream had already stored (same `Nats-Msg-Id`): a re-run's outputs.
    pub duplicates: u32,
}

/// Sends `outputs` and waits until every one is stored, resending unavailable ones until
/// `budget` has passed. `Err` says why the outputs are not all stored; the caller retries the
/// message.
pub async fn deliver(
    backend: &dyn Backend,
    outputs: &[Outbound],
    budget: Duration,
    metrics: &HandlerMetrics,
) -> Result<Delivered, String> {
    let give_up = Instant::now() + budget;
    let mut left: Vec<&Outbound> = outputs.iter().collect();
    let mut duplicates = 0;
    let mut pause = FIRST_PAUSE;
    loop {
        let sent = join_all(left.iter().map(|out| send(backend, out))).await;
        let mut retry = Vec::new();
        let mut last_error = String::new();
        for (out, result) in left.into_iter().zip(sent) {
            match result {
                Ok(Stored::New | Stored::Uncaptured) => {}
                Ok(Stored::Duplicate) => {
                    duplicates += 1;
                    HandlerMetrics::incr(&metrics.duplicate_publishes);
                    tracing::debug!(msg_id = %out.msg_id, subject = %out.subject, "publish was a duplicate: the stream already stored this output");
                }
                Err(NotStored::Unavailable(reason)) => {
                    last_error = reason;
                    retry.push(out);
                }
                Err(NotStored::Refused(reason)) => return Err(reason),
            }
        }
        if retry.is_empty() {
            return Ok(Delivered { duplicates });
        }
        if Instant::now() + pause > give_up {
            return Err(format!(
                "{} of {} publishes not stored within {budget:?}: {last_error}",
                retry.len(),
                outputs.len()
            ));
        }
        tracing::debug!(
            unstored = retry.len(),
            "publishes not stored yet ({last_error}); sending them again in {pause:?}"
        );
        metrics
            .publish_retries
            .fetch_add(retry.len() as u64, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
        left = retry;
    }
}

async fn send(backend: &dyn Backend, out: &Outbound) -> Result<Stored, NotStored> {
    backend.publish(out).await?.await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use futures::future::BoxFuture;
    use futures::FutureExt;

    use super::*;
    use crate::capabilities::{Expect, KvEntry, KvError, PendingPublish};

    /// Answers each publish from a script: `Unavailable` for the first `unavailable` sends of
    /// every message, then stored (or a duplicate, or refused, by subject).
    struct Scripted {
        unavailable: u32,
        sends: Mutex<Vec<String>>,
        calls: AtomicU32,
    }

    impl Backend for Scripted {
        fn publish(&self, msg: &Outbound) -> BoxFuture<'_, Result<PendingPublish, NotStored>> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.sends.lock().unwrap().push(msg.msg_id.clone());
            let subject = msg.subject.clone();
            let unavailable = self.unavailable;
            let sends_of_this = self
                .sends
                .lock()
                .unwrap()
                .iter()
                .filter(|id| **id == msg.msg_id)
                .count() as u32;
            async move {
                let result = if sends_of_this <= unavailable {
                    Err(NotStored::Unavailable("no responders".into()))
                } else if subject == "dup" {
                    Ok(Stored::Duplicate)
                } else if subject == "refused" {
                    Err(NotStored::Refused("maximum messages exceeded".into()))
                } else {
                    Ok(Stored::New)
                };
                let pending: PendingPublish = async move { result }.boxed();
                Ok(pending)
            }
            .boxed()
        }
        fn kv_get<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<Option<KvEntry>, KvError>> {
            unreachable!()
        }
        fn kv_put_if<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Vec<u8>,
            _: Expect,
            _: String,
        ) -> BoxFuture<'a, Result<u64, KvError>> {
            unreachable!()
        }
        fn kv_put<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: Vec<u8>,
        ) -> BoxFuture<'a, Result<u64, KvError>> {
            unreachable!()
        }
        fn kv_delete<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), KvError>> {
            unreachable!()
        }
        fn max_payload(&self) -> usize {
            1 << 20
        }
    }

    fn out(subject: &str, id: &str) -> Outbound {
        Outbound {
            subject: subject.into(),
            payload: bytes::Bytes::from_static(b"x"),
            headers: Vec::new(),
            msg_id: id.into(),
        }
    }

    fn scripted(unavailable: u32) -> Scripted {
        Scripted {
            unavailable,
            sends: Mutex::new(Vec::new()),
            calls: AtomicU32::new(0),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_publishes_are_sent_again_until_stored_and_counted() {
        let backend = scripted(2);
        let metrics = HandlerMetrics::default();
        let outputs = [out("a", "1"), out("dup", "2")];
        let delivered = deliver(&backend, &outputs, Duration::from_secs(30), &metrics)
            .await
            .unwrap();
        assert_eq!(delivered.duplicates, 1);
        assert_eq!(backend.calls.load(Ordering::Relaxed), 6, "3 sends each");
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.publish_retries, 4);
        assert_eq!(snapshot.duplicate_publishes, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_the_resends_and_refusals_fail_at_once() {
        let metrics = HandlerMetrics::default();
        let err = deliver(
            &scripted(u32::MAX),
            &[out("a", "1")],
            Duration::from_secs(1),
            &metrics,
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("1 of 1 publishes not stored within 1s"),
            "{err}"
        );
        let backend = scripted(0);
        let err = deliver(
            &backend,
            &[out("refused", "1"), out("a", "2")],
            Duration::from_secs(30),
            &metrics,
        )
        .await
        .unwrap_err();
        assert!(err.contains("maximum messages exceeded"), "{err}");
        assert_eq!(backend.calls.load(Ordering::Relaxed), 2);
    }
}
