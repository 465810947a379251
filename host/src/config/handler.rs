//! `[[handler]]`: one handler, the stream it consumes, and how it runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use super::{check_name, opt_duration, opt_size, parse_duration, raw};
use crate::backoff::{Backoff, OnExhausted, RetryPolicy};
use crate::capabilities::SubjectPattern;
use crate::consumer::BreakerConfig;
use crate::ordering::{MissingKey, Ordering};
use crate::runtime::{Isolation, Limits};

/// One handler: a module, the stream it consumes, and how it runs.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Unique name; also the default durable consumer name.
    pub name: String,
    /// The `.wasm` component.
    pub module: PathBuf,
    /// The stream to consume.
    pub stream: String,
    /// The durable consumer shared by every host running this handler.
    pub consumer: String,
    /// Pull (the default), or an existing push consumer with a deliver group.
    pub consumer_kind: ConsumerKind,
    /// Subjects of the stream to consume; empty means all.
    pub filter_subjects: Vec<String>,
    /// Which messages run in order: by subject (default), none, subject tokens, or a header.
    pub ordering: Ordering,
    /// What to do with a message whose key cannot be computed.
    pub on_missing_key: MissingKey,
    /// What to do when an ordered message fails its last attempt.
    pub on_exhausted: OnExhausted,
    /// Fewest workers (messages handled at once) on this host.
    pub min_workers: usize,
    /// Most workers on this host; the autoscaler moves between the two.
    pub max_workers: usize,
    /// Most messages this host holds for the handler (running or waiting for their key).
    pub max_buffered: usize,
    /// Unordered handlers: messages held, running or fetched ahead of the workers (at least two
    /// per worker). `None` (the default): eight per worker of the pool's current size, at
    /// least 32, so that a slow host does not hoard what another could run.
    pub prefetch: Option<usize>,
    /// Most distinct ordering keys held; at the cap the host stops pulling.
    pub max_keys: usize,
    /// The consumer's `max_ack_pending`, shared by every host: cover hosts × `max_buffered`.
    pub max_ack_pending: i64,
    /// How long the backlog must stay drained before the pool shrinks.
    pub scale_cooldown: Duration,
    /// A fresh instance per message (default), or warm instances reused by each worker.
    pub isolation: Isolation,
    /// JetStream AckWait; progress acks are sent every half of it.
    pub ack_wait: Duration,
    /// Where rejected and exhausted messages go.
    pub dead_letter: Option<String>,
    /// Attempts and backoff.
    pub retry: RetryPolicy,
    /// When to stop pulling because every execution fails.
    pub breaker: BreakerConfig,
    /// Partitioned consumer groups: the number of partitions, or `None` for one durable
    /// consumer shared by every host.
    pub partitions: Option<u32>,
    /// Per-call limits.
    pub limits: Limits,
    /// Publishes allowed per message.
    pub max_publishes: u32,
    /// Bytes of `log` output allowed per message.
    pub log_budget: usize,
    /// Subjects the handler may publish to.
    pub publish_allow: Vec<SubjectPattern>,
    /// KV buckets the handler may use (`*` for all).
    pub kv_allow: Vec<String>,
    /// Free-form settings the handler reads with `config::get`.
    pub settings: BTreeMap<String, String>,
}

/// How the host receives a durable consumer's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerKind {
    /// Pull requests sized by the host's free slots (`consumer_kind = "pull"`, the default).
    Pull,
    /// A push consumer's deliveries to a queue group (`consumer_kind = "push-queue"`), as
    /// wasmCloud's JetStream plugin creates it: bound as it is, or created if missing.
    PushQueue {
        /// The consumer's `deliver_group`.
        deliver_group: String,
    },
}

pub(super) fn convert_handler(
    h: raw::RawHandler,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> anyhow::Result<HandlerConfig> {
    check_name("handler", &h.name)?;
    let ctx = format!("handler {:?}", h.name);
    check_name(&format!("{ctx}: stream"), &h.stream)?;
    let consumer = h.consumer.unwrap_or_else(|| h.name.clone());
    check_name(&format!("{ctx}: consumer"), &consumer)?;
    let filter_subjects = h.subjects.unwrap_or_default();
    for subject in &filter_subjects {
        SubjectPattern::parse(subject).map_err(|e| anyhow::anyhow!("{ctx}: subjects: {e}"))?;
    }
    let (min_workers, max_workers) = match (h.concurrency, h.min_workers, h.max_workers) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => bail!(
            "{ctx}: concurrency (a fixed pool) cannot be combined with min_workers/max_workers \
             (an autoscaled one); use one or the other"
        ),
        (Some(n), None, None) => (n, n),
        (None, min, max) => (min.unwrap_or(1), max.unwrap_or(16)),
    };
    for (field, n) in [
        ("concurrency/min_workers", min_workers),
        ("max_workers", max_workers),
    ] {
        if !(1..=4096).contains(&n) {
            bail!("{ctx}: {field} must be between 1 and 4096, got {n}");
        }
    }
    if min_workers > max_workers {
        bail!("{ctx}: min_workers ({min_workers}) is above max_workers ({max_workers})");
    }
    let ordering = match &h.ordering {
        Some(text) => Ordering::parse(text).map_err(|e| anyhow::anyhow!("{ctx}: ordering: {e}"))?,
        None => Ordering::Subject,
    };
    let on_missing_key = match h.on_missing_key.as_deref() {
        None | Some("dead-letter") => MissingKey::DeadLetter,
        Some("subject") => MissingKey::Subject,
        Some(other) => {
            bail!("{ctx}: on_missing_key must be \"dead-letter\" or \"subject\", got {other:?}")
        }
    };
    let on_exhausted = match h.on_exhausted.as_deref() {
        None | Some("dead-letter") => OnExhausted::DeadLetter,
        Some("block") => OnExhausted::Block,
        Some(other) => {
            bail!("{ctx}: on_exhausted must be \"dead-letter\" or \"block\", got {other:?}")
        }
    };
    if on_exhausted == OnExhausted::Block && !ordering.is_ordered() {
        bail!("{ctx}: on_exhausted = \"block\" needs an ordering; with ordering = \"none\" failures are naked");
    }
    let max_buffered = h.max_buffered.unwrap_or(1000) as usize;
    if max_buffered < max_workers as usize {
        bail!(
            "{ctx}: max_buffered ({max_buffered}) is below max_workers ({max_workers}); the \
             workers could not all be fed"
        );
    }
    let prefetch = h.prefetch.map(|p| p as usize);
    if let Some(prefetch) = prefetch {
        if prefetch == 0 || prefetch > max_buffered {
            bail!(
                "{ctx}: prefetch must be between 1 and max_buffered ({max_buffered}), got {prefetch}"
            );
        }
    }
    let partitions = match h.partitions {
        None => None,
        Some(n) if !(1..=1024).contains(&n) => {
            bail!("{ctx}: partitions must be between 1 and 1024, got {n}")
        }
        Some(n) => {
            match &ordering {
                Ordering::Subject | Ordering::SubjectTokens { .. } => {}
                Ordering::Header(name) => bail!(
                    "{ctx}: partitions needs ordering by subject or subject tokens, not \
                     \"header:{name}\": the server computes a message's partition from its \
                     subject, so the key must be in the subject; put the key in a subject token \
                     and use ordering = \"subject-tokens:A..B\" (or \"subject\")"
                ),
                Ordering::None => bail!(
                    "{ctx}: partitions keeps per-key order across hosts, which ordering = \
                     \"none\" does not want; remove partitions (several hosts then share one \
                     durable consumer), or choose ordering = \"subject\" or \
                     \"subject-tokens:A..B\""
                ),
            }
            Some(n)
        }
    };
    let consumer_kind = match (h.consumer_kind.as_deref(), h.deliver_group) {
        (None | Some("pull"), None) => ConsumerKind::Pull,
        (None | Some("pull"), Some(_)) => bail!(
            "{ctx}: deliver_group is for push consumers; add consumer_kind = \"push-queue\" \
             or remove deliver_group"
        ),
        (Some("push-queue"), None) => bail!(
            "{ctx}: consumer_kind = \"push-queue\" needs deliver_group, the queue group of \
             the push consumer (wasmCloud's is the consumer's deliver_group; see nats consumer \
             info)"
        ),
        (Some("push-queue"), Some(group)) => {
            if group.is_empty() || group.contains([' ', '.', '*', '>']) {
                bail!("{ctx}: deliver_group must be one token without spaces, dots or wildcards, got {group:?}");
            }
            if partitions.is_some() {
                bail!(
                    "{ctx}: partitions pulls one consumer per partition; it cannot use a push \
                     consumer: remove consumer_kind = \"push-queue\" (and deliver_group), or \
                     remove partitions"
                );
            }
            ConsumerKind::PushQueue {
                deliver_group: group,
            }
        }
        (Some(other), _) => {
            bail!("{ctx}: consumer_kind must be \"pull\" or \"push-queue\", got {other:?}")
        }
    };
    let max_keys = h.max_keys.map_or(max_buffered, |k| k as usize);
    if max_keys == 0 {
        bail!("{ctx}: max_keys must be at least 1");
    }
    let max_ack_pending = h
        .max_ack_pending
        .unwrap_or((max_buffered as i64 * 10).max(1000));
    if max_ack_pending < max_buffered as i64 {
        bail!(
            "{ctx}: max_ack_pending ({max_ack_pending}) is below max_buffered ({max_buffered}); \
             set it to at least hosts × max_buffered"
        );
    }
    let isolation = match (h.isolation.as_deref(), h.reuse_limit) {
        (None | Some("fresh"), None) => Isolation::Fresh,
        (None | Some("fresh"), Some(_)) => {
            bail!("{ctx}: reuse_limit only applies with isolation = \"reuse\"")
        }
        (Some("reuse"), limit) => {
            let max_uses = limit.unwrap_or(1000);
            if max_uses == 0 {
                bail!("{ctx}: reuse_limit must be at least 1");
            }
            Isolation::Reuse { max_uses }
        }
        (Some(other), _) => bail!(
            "{ctx}: isolation must be \"fresh\" (a new instance per message) or \"reuse\" \
             (warm instances, for trusted stateless handlers), got {other:?}"
        ),
    };
    let scale_cooldown =
        opt_duration(&ctx, "scale_cooldown", h.scale_cooldown)?.unwrap_or(Duration::from_secs(10));
    let ack_wait = opt_duration(&ctx, "ack_wait", h.ack_wait)?.unwrap_or(Duration::from_secs(30));
    if ack_wait < Duration::from_secs(1) {
        bail!("{ctx}: ack_wait must be at least 1s, got {ack_wait:?}");
    }
    if let Some(dl) = &h.dead_letter {
        crate::capabilities::subject::validate_publish_subject(dl)
            .map_err(|e| anyhow::anyhow!("{ctx}: dead_letter: {e}"))?;
    }

    let retry = convert_retry(&ctx, h.retry)?;
    let breaker = convert_breaker(&ctx, h.breaker)?;

    let l = h.limits;
    let defaults = Limits::default();
    let memory = opt_size(&ctx, "limits.memory", l.memory)?.unwrap_or(defaults.memory as u64);
    if !((1 << 20)..=(4 << 30)).contains(&memory) {
        bail!("{ctx}: limits.memory must be between 1MiB and 4GiB, got {memory} bytes");
    }
    let timeout = opt_duration(&ctx, "limits.timeout", l.timeout)?.unwrap_or(defaults.timeout);
    if timeout.is_zero() {
        bail!("{ctx}: limits.timeout must be above zero");
    }
    let output = opt_size(&ctx, "limits.output", l.output)?.unwrap_or(defaults.output_bytes as u64);
    let log = opt_size(&ctx, "limits.log", l.log)?.unwrap_or(64 << 10);

    let mut publish_allow = Vec::new();
    for pattern in &h.publish.allow {
        publish_allow.push(
            SubjectPattern::parse(pattern)
                .map_err(|e| anyhow::anyhow!("{ctx}: publish.allow: {e}"))?,
        );
    }
    for bucket in &h.kv.allow {
        if bucket != "*" {
            check_name(&format!("{ctx}: kv.allow"), bucket)?;
        }
    }

    Ok(HandlerConfig {
        module: resolve(h.module),
        stream: h.stream,
        consumer,
        consumer_kind,
        filter_subjects,
        ordering,
        on_missing_key,
        on_exhausted,
        min_workers: min_workers as usize,
        max_workers: max_workers as usize,
        max_buffered,
        prefetch,
        max_keys,
        max_ack_pending,
        scale_cooldown,
        isolation,
        ack_wait,
        dead_letter: h.dead_letter,
        retry,
        breaker,
        partitions,
        limits: Limits {
            memory: memory as usize,
            timeout,
            output_bytes: output as usize,
        },
        max_publishes: l.max_publishes.unwrap_or(100),
        log_budget: log as usize,
        publish_allow,
        kv_allow: h.kv.allow,
        settings: h.config,
        name: h.name,
    })
}

fn convert_breaker(ctx: &str, b: raw::RawBreaker) -> anyhow::Result<BreakerConfig> {
    let defaults = BreakerConfig::default();
    let first_probe =
        opt_duration(ctx, "breaker.first_probe", b.first_probe)?.unwrap_or(defaults.first_probe);
    let max_probe =
        opt_duration(ctx, "breaker.max_probe", b.max_probe)?.unwrap_or(defaults.max_probe);
    if first_probe.is_zero() || max_probe < first_probe {
        bail!(
            "{ctx}: breaker.first_probe must be above zero and at most breaker.max_probe \
             ({first_probe:?} and {max_probe:?})"
        );
    }
    Ok(BreakerConfig {
        trip_after: b.trip_after.unwrap_or(defaults.trip_after),
        first_probe,
        max_probe,
    })
}

fn convert_retry(ctx: &str, r: raw::RawRetry) -> anyhow::Result<RetryPolicy> {
    let defaults = RetryPolicy::default();
    let max_attempts = r.max_attempts.unwrap_or(defaults.max_attempts);
    if max_attempts == 0 {
        bail!("{ctx}: retry.max_attempts must be at least 1 (1 means no retries)");
    }
    let jitter = r.jitter.unwrap_or(defaults.jitter);
    if !(0.0..=1.0).contains(&jitter) {
        bail!("{ctx}: retry.jitter must be between 0 and 1, got {jitter}");
    }
    let backoff = match r.backoff {
        Some(list) => {
            if r.initial.is_some() || r.max.is_some() || r.multiplier.is_some() {
                bail!(
                    "{ctx}: retry.backoff (a list) cannot be combined with initial/max/multiplier"
                );
            }
            if list.is_empty() {
                bail!("{ctx}: retry.backoff is empty; give at least one delay, e.g. [\"1s\", \"10s\"]");
            }
            let delays = list
                .iter()
                .map(|d| {
                    parse_duration(d).map_err(|e| anyhow::anyhow!("{ctx}: retry.backoff: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Backoff::List(delays)
        }
        None => {
            let Backoff::Exponential {
                initial,
                multiplier,
                max,
            } = defaults.backoff
            else {
                unreachable!("the default backoff is exponential")
            };
            let initial = opt_duration(ctx, "retry.initial", r.initial)?.unwrap_or(initial);
            let max = opt_duration(ctx, "retry.max", r.max)?.unwrap_or(max);
            let multiplier = r.multiplier.unwrap_or(multiplier);
            if !(1.0..=100.0).contains(&multiplier) {
                bail!("{ctx}: retry.multiplier must be between 1 and 100, got {multiplier}");
            }
            if max < initial {
                bail!("{ctx}: retry.max ({max:?}) is below retry.initial ({initial:?})");
            }
            Backoff::Exponential {
                initial,
                multiplier,
                max,
            }
        }
    };
    Ok(RetryPolicy {
        max_attempts,
        backoff,
        jitter,
    })
}
