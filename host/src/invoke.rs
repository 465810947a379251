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

use crate::capabilities::{Grants, HandlerCaps, MemoryBackend, Recorded, SubjectPattern};
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
}

impl InvokeReport {
    /// Whether the handler succeeded.
    pub fn succeeded(&self) -> bool {
        self.invoked.outcome == Outcome::Success
    }
}

/// Runs the request.
pub async fn invoke(req: InvokeRequest) -> anyhow::Result<InvokeReport> {
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
    let msg = GuestMessage {
        subject: &req.subject,
        payload: &req.payload,
        headers: &headers,
        stream: "LOCAL",
        sequence: 1,
        attempt: req.attempt.max(1),
        published_unix_nanos: now,
        handler: &name,
    };
    let invoked = module.invoke(&mut None, msg, "LOCAL".into()).await;
    Ok(InvokeReport {
        handler: name,
        invoked,
        calls: backend.recorded(),
        metrics: metrics.snapshot(),
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
            describe(&self.invoked.outcome),
            self.invoked.elapsed
        )?;
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
                    Some(v) => writeln!(f, "  kv get {bucket}/{key} -> {}", Shown(v))?,
                    None => writeln!(f, "  kv get {bucket}/{key} -> (none)")?,
                },
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

/// A one-line description of an outcome, and what the host would do with the message.
pub fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Success => "ok (the host would ack the message)".to_owned(),
        Outcome::Retry {
            reason,
            delay: Some(d),
        } => format!("retry after {d:?}: {reason} (the host would nak with that delay)"),
        Outcome::Retry {
            reason,
            delay: None,
        } => format!("retry: {reason} (the host would nak with its backoff)"),
        Outcome::Reject { reason } => {
            format!("reject: {reason} (the host would dead-letter and terminate it)")
        }
        Outcome::Failed(failure) => format!(
            "failed ({}): {} (the host would retry with its backoff)",
            failure.kind.as_str(),
            failure.reason
        ),
    }
}
