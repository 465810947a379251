//! `mailroom invoke`: one message through a handler, locally, with no NATS.
//!
//! The handler runs exactly as in the host (same runtime, limits and grant checks) against an
//! in-memory backend that records its publishes and KV calls, so a handler author sees what
//! the handler would do before deploying it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::capabilities::{
    Backend as _, Expect, Grants, HandlerCaps, MemoryBackend, Recorded, SubjectPattern, Written,
};
use crate::config::HandlerConfig;
use crate::runtime::{
    GuestMessage, HeaderParam, Invoked, Isolation, Limits, Outcome, Runtime, RuntimeConfig,
};
use crate::telemetry::HandlerMetrics;

/// What to run.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// The component.
    pub module: PathBuf,
    /// The message subject.
    pub subject: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Headers as `(name, value)` pairs.
    pub headers: Vec<(String, String)>,
    /// The delivery attempt to report to the handler.
    pub attempt: u32,
    /// Settings, grants and limits; without a handler config, everything is granted.
    pub handler: Option<HandlerConfig>,
    /// Extra settings (added to, or replacing, the handler config's).
    pub settings: BTreeMap<String, String>,
    /// KV values to seed: `(bucket, key, value)`.
    pub kv_seed: Vec<(String, String, Vec<u8>)>,
    /// Cache directory for compiled modules.
    pub cache_dir: Option<PathBuf>,
    /// Extra runs after the first, to time the steady state (0: just the one).
    pub repeat: u32,
}

/// What happened.
pub struct InvokeReport {
    /// The handler's name.
    pub handler: String,
    /// The call's outcome and timing.
    pub invoked: Invoked,
    /// Every publish and KV call, in order.
    pub calls: Vec<Recorded>,
    /// Refusals and drops counted during the call.
    pub metrics: crate::telemetry::MetricsSnapshot,
    /// Whether the handler runs ordered in the host (retries happen in place then).
    pub ordered: bool,
    /// With `repeat`: the runs after the first, and their mean time per message.
    pub steady: Option<(u32, Duration)>,
}

impl InvokeReport {
    /// Whether the handler succeeded.
    pub fn succeeded(&self) -> bool {
        self.invoked.outcome == Outcome::Success
    }
}

/// Checks that `subject` could be the subject of a delivered message: what `--subject` takes.
pub fn validate_message_subject(subject: &str) -> Result<(), String> {
    crate::capabilities::subject::validate_publish_subject(subject)
        .map_err(|err| format!("{subject:?} cannot be the subject of a message: {err}"))
}

/// Runs the request.
pub async fn invoke(req: InvokeRequest) -> anyhow::Result<InvokeReport> {
    validate_message_subject(&req.subject).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        req.attempt >= 1,
        "the attempt starts at 1, not {}",
        req.attempt
    );
    let ordered = req
        .handler
        .as_ref()
        .is_none_or(|h| h.ordering != crate::ordering::Ordering::None);
    let (name, limits, grants, mut settings, max_publishes, log_budget) = match &req.handler {
        Some(h) => (
            h.name.clone(),
            h.limits.clone(),
            Grants {
                publish: h.publish_allow.clone(),
                kv_buckets: h.kv_allow.clone(),
            },
            h.settings.clone(),
            h.max_publishes,
            h.log_budget,
        ),
        None => (
            req.module
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "handler".to_owned()),
            Limits::default(),
            Grants {
                publish: vec![SubjectPattern::parse(">").context("the catch-all pattern")?],
                kv_buckets: vec!["*".to_owned()],
            },
            BTreeMap::new(),
            100,
            64 << 10,
        ),
    };
    settings.extend(req.settings.clone());
    let runtime = Runtime::new(&RuntimeConfig {
        max_instances: 2,
        max_memory: limits.memory,
        epoch_tick: Duration::from_millis(10),
        cache_dir: req.cache_dir.clone(),
    })?;
    let backend = Arc::new(MemoryBackend::new(1 << 20));
    for (bucket, key, value) in &req.kv_seed {
        backend.seed(bucket, key, value.clone());
    }
    let metrics = Arc::new(HandlerMetrics::default());
    let caps = Arc::new(HandlerCaps {
        name: name.clone().into(),
        grants,
        settings,
        max_publishes,
        log_budget,
        backend: backend.clone(),
        metrics: metrics.clone(),
    });
    let module = runtime.load_handler(&req.module, limits, Isolation::Fresh, caps)?;

    let mut grouped: Vec<(&str, Vec<&str>)> = Vec::new();
    for (name, value) in &req.headers {
        match grouped.iter_mut().find(|(n, _)| n == name) {
            Some((_, values)) => values.push(value),
            None => grouped.push((name, vec![value])),
        }
    }
    let headers: Vec<HeaderParam<'_>> = grouped
        .iter()
        .map(|(name, values)| HeaderParam {
            name,
            values: values.as_slice(),
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let msg = |sequence: u64| GuestMessage {
        subject: &req.subject,
        payload: &req.payload,
        headers: &headers,
        stream: "LOCAL",
        sequence,
        attempt: req.attempt,
        published_unix_nanos: now,
        handler: &name,
    };
    let stream: Arc<str> = "LOCAL".into();
    let invoked = module.invoke(&mut None, msg(1), stream.clone()).await;
    // As the host does: a successful call's staged publishes are sent; a failed one's are
    // discarded.
    if invoked.outcome == Outcome::Success {
        for out in &invoked.publishes {
            if let Ok(pending) = backend.publish(out).await {
                let _ = pending.await;
            }
        }
    }
    let calls = backend.recorded();
    let snapshot = metrics.snapshot();
    // Each repetition is the next message of the stream (sequence 2, 3, …), so conditional KV
    // writes are new writes rather than recognised re-runs; only the first run is reported.
    let mut steady = None;
    if req.repeat > 0 {
        let start = std::time::Instant::now();
        for i in 0..req.repeat {
            // Staged publishes of the repetitions are not sent: only the first run is reported.
            let _ = module
                .invoke(&mut None, msg(2 + u64::from(i)), stream.clone())
                .await;
        }
        steady = Some((req.repeat, start.elapsed() / req.repeat));
    }
    Ok(InvokeReport {
        handler: name,
        invoked,
        calls,
        metrics: snapshot,
        ordered,
        steady,
    })
}

/// Shows bytes as text when they are printable UTF-8, else as a length and hex preview.
struct Shown<'a>(&'a [u8]);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(text)
                if !text
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t') =>
            {
                if text.len() > 2000 {
                    write!(
                        f,
                        "{}… ({} bytes)",
                        &text[..text.floor_char_boundary(2000)],
                        text.len()
                    )
                } else {
                    f.write_str(text)
                }
            }
            _ => {
                write!(f, "<{} bytes:", self.0.len())?;
                for b in self.0.iter().take(32) {
                    write!(f, " {b:02x}")?;
                }
                f.write_str(if self.0.len() > 32 { " …>" } else { ">" })
            }
        }
    }
}

impl fmt::Display for InvokeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let publishes = self
            .calls
            .iter()
            .filter(|c| matches!(c, Recorded::Publish(_)))
            .count();
        let kv = self.calls.len() - publishes;
        writeln!(
            f,
            "handler {}: {} in {:.2?} ({publishes} publishes, {kv} KV calls)",
            self.handler,
            describe(&self.invoked.outcome, self.ordered),
            self.invoked.elapsed
        )?;
        if let Some((runs, per_message)) = self.steady {
            writeln!(
                f,
                "  steady state: {per_message:.2?} per message over {runs} more run(s), each in \
                 a fresh instance"
            )?;
        }
        let m = &self.metrics;
        if m.denied > 0 {
            writeln!(f, "  {} call(s) denied by the handler's grants", m.denied)?;
        }
        if m.log_dropped > 0 {
            writeln!(
                f,
                "  output over the log budget was dropped ({} time(s))",
                m.log_dropped
            )?;
        }
        for call in &self.calls {
            match call {
                Recorded::Publish(out) => {
                    writeln!(f, "  publish {} (Nats-Msg-Id {})", out.subject, out.msg_id)?;
                    for (name, value) in &out.headers {
                        writeln!(f, "    {name}: {value}")?;
                    }
                    writeln!(f, "    {}", Shown(&out.payload))?;
                }
                Recorded::KvGet { bucket, key, found } => match found {
                    Some(e) => writeln!(
                        f,
                        "  kv get {bucket}/{key} -> {} (revision {})",
                        Shown(&e.value),
                        e.revision
                    )?,
                    None => writeln!(f, "  kv get {bucket}/{key} -> (none)")?,
                },
                Recorded::KvPutIf {
                    bucket,
                    key,
                    value,
                    expect,
                    written,
                    ..
                } => {
                    let op = match expect {
                        Expect::Revision(r) => format!("put-if revision {r}"),
                        Expect::Absent => "create".to_owned(),
                    };
                    let result = match written {
                        Written::Stored(r) => format!("stored as revision {r}"),
                        Written::Duplicate(r) => {
                            format!("already applied by this message (revision {r}), not stored")
                        }
                        Written::Conflict => "conflict, not stored".to_owned(),
                    };
                    writeln!(f, "  kv {op} {bucket}/{key} = {}: {result}", Shown(value))?
                }
                Recorded::KvPut {
                    bucket,
                    key,
                    value,
                    revision,
                } => writeln!(
                    f,
                    "  kv put {bucket}/{key} = {} (revision {revision})",
                    Shown(value)
                )?,
                Recorded::KvDelete { bucket, key } => writeln!(f, "  kv delete {bucket}/{key}")?,
            }
        }
        Ok(())
    }
}

/// A one-line description of an outcome, and what the host would do with the message: an
/// ordered handler retries in place while the message's key waits, an unordered one naks.
pub fn describe(outcome: &Outcome, ordered: bool) -> String {
    let later = |when: &str| {
        if ordered {
            format!(
                "the host would retry it in place {when}, holding back later messages of its key"
            )
        } else {
            format!("the host would nak it for redelivery {when}")
        }
    };
    match outcome {
        Outcome::Success => "ok (the host would ack the message)".to_owned(),
        Outcome::Retry {
            reason,
            delay: Some(d),
        } => format!(
            "retry after {d:?}: {reason} ({})",
            later(&format!("after {d:?}"))
        ),
        Outcome::Retry {
            reason,
            delay: None,
        } => format!("retry: {reason} ({})", later("after its backoff")),
        Outcome::Reject { reason } => {
            format!("reject: {reason} (the host would dead-letter and terminate it)")
        }
        Outcome::Failed(failure) => format!(
            "failed ({}): {} ({}; the last attempt is dead-lettered)",
            failure.kind.as_str(),
            failure.reason,
            later("after its backoff")
        ),
    }
}
