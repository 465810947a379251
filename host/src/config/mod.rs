//! The host configuration: a TOML file, parsed into [`raw`] types and converted once into a
//! validated [`Config`].
//!
//! Invariant: a `Config` that exists is valid. Every check that does not need the network
//! (names, subjects, durations, sizes, limits) happens in [`Config::parse`], and its errors
//! name the handler and the field and say how to fix it. Paths are resolved against the
//! configuration file's directory.

mod raw;
mod units;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::backoff::{Backoff, OnExhausted, RetryPolicy};
use crate::capabilities::SubjectPattern;
use crate::ordering::{MissingKey, Ordering};
use crate::runtime::{Isolation, Limits};

pub use units::{parse_duration, parse_size};

/// A validated host configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// How to reach NATS.
    pub nats: NatsConfig,
    /// Host-wide settings.
    pub host: HostConfig,
    /// Streams the host creates when missing.
    pub streams: Vec<StreamSpec>,
    /// KV buckets the host creates when missing.
    pub buckets: Vec<BucketSpec>,
    /// The handlers to run.
    pub handlers: Vec<HandlerConfig>,
}

/// How to connect to NATS. Secrets are never logged (`Debug` redacts them).
#[derive(Clone, Default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// Connection name shown by the server.
    pub name: String,
    /// A `.creds` file (JWT and nkey seed).
    pub credentials: Option<PathBuf>,
    /// A file holding an nkey seed.
    pub nkey_seed_file: Option<PathBuf>,
    /// Token authentication.
    pub token: Option<String>,
    /// User and password authentication.
    pub user_password: Option<(String, String)>,
    /// TLS settings.
    pub tls: Option<TlsConfig>,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("name", &self.name)
            .field("credentials", &self.credentials)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "user_password",
                &self.user_password.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

/// TLS for the NATS connection.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// A CA certificate (PEM) to trust in addition to the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub key: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub required: bool,
}

/// Host-wide settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// How long shutdown waits for in-flight messages. Default 30s.
    pub drain_timeout: Duration,
    /// Where compiled modules are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Epoch tick: granularity of time limits. Default 10ms.
    pub epoch_tick: Duration,
    /// Address of the Prometheus `/metrics` endpoint, if any.
    pub metrics_addr: Option<String>,
}

/// A stream to create when missing.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Stream name.
    pub name: String,
    /// Subjects it captures.
    pub subjects: Vec<String>,
    /// File storage (default) or memory.
    pub memory_storage: bool,
    /// Deduplication window for `Nats-Msg-Id`. Default 2 minutes.
    pub duplicate_window: Duration,
    /// Maximum message age; zero keeps messages forever.
    pub max_age: Duration,
    /// Replicas. Default 1.
    pub replicas: usize,
}

/// A KV bucket to create when missing.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    /// Bucket name.
    pub name: String,
    /// Values kept per key. Default 1.
    pub history: i64,
    /// File storage (default) or memory.
    pub memory_storage: bool,
    /// Replicas. Default 1.
    pub replicas: usize,
}

/// One handler: a module, the stream it consumes, and how it runs.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Unique name; also the default durable consumer name.
    pub name: String,
    /// The `.wasm` component.
    pub module: PathBuf,
    /// The stream to consume.
    pub stream: String,
    /// The durable pull consumer shared by every host running this handler.
    pub consumer: String,
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
    /// per worker; default `max_buffered`).
    pub prefetch: usize,
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

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Config::parse(&text, base).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses and validates TOML `text`; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|err| anyhow::anyhow!("{err}"))?;
        convert(raw, base)
    }
}

fn convert(raw: raw::RawConfig, base: &Path) -> anyhow::Result<Config> {
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let nats = convert_nats(raw.nats, &resolve)?;
    let host = convert_host(raw.host, &resolve)?;

    let mut streams = Vec::new();
    for s in raw.streams {
        check_name("stream", &s.name)?;
        let ctx = format!("stream {:?}", s.name);
        if s.subjects.is_empty() {
            bail!("{ctx}: subjects is empty; list the subjects it captures, e.g. [\"orders.>\"]");
        }
        for subject in &s.subjects {
            SubjectPattern::parse(subject).map_err(|e| anyhow::anyhow!("{ctx}: subjects: {e}"))?;
        }
        streams.push(StreamSpec {
            subjects: s.subjects,
            memory_storage: storage(&ctx, s.storage.as_deref())?,
            duplicate_window: opt_duration(&ctx, "duplicate_window", s.duplicate_window)?
                .unwrap_or(Duration::from_secs(120)),
            max_age: opt_duration(&ctx, "max_age", s.max_age)?.unwrap_or_default(),
            replicas: s.replicas.unwrap_or(1).max(1),
            name: s.name,
        });
    }

    let mut buckets = Vec::new();
    for b in raw.buckets {
        check_name("bucket", &b.name)?;
        let ctx = format!("bucket {:?}", b.name);
        let history = b.history.unwrap_or(1);
        if !(1..=64).contains(&history) {
            bail!("{ctx}: history must be between 1 and 64, got {history}");
        }
        buckets.push(BucketSpec {
            memory_storage: storage(&ctx, b.storage.as_deref())?,
            history,
            replicas: b.replicas.unwrap_or(1).max(1),
            name: b.name,
        });
    }

    if raw.handlers.is_empty() {
        bail!("no handlers: add at least one [[handler]] with name, module and stream");
    }
    let mut names = HashSet::new();
    let mut handlers = Vec::new();
    for h in raw.handlers {
        if !names.insert(h.name.clone()) {
            bail!(
                "two handlers are named {:?}; handler names must be unique",
                h.name
            );
        }
        handlers.push(convert_handler(h, &resolve)?);
    }
    Ok(Config {
        nats,
        host,
        streams,
        buckets,
        handlers,
    })
}

fn convert_nats(
    n: raw::RawNats,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> anyhow::Result<NatsConfig> {
    let user_password = match (n.user, n.password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => bail!("nats: user and password go together; set both or neither"),
    };
    let auth_methods = [
        n.credentials.is_some(),
        n.nkey_seed_file.is_some(),
        n.token.is_some(),
        user_password.is_some(),
    ];
    if auth_methods.iter().filter(|x| **x).count() > 1 {
        bail!("nats: choose one of credentials, nkey_seed_file, token, or user/password");
    }
    if let Some(tls) = &n.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            bail!("nats.tls: cert and key go together; set both or neither");
        }
    }
    Ok(NatsConfig {
        url: n.url.unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned()),
        name: n.name.unwrap_or_else(|| "mailroom".to_owned()),
        credentials: n.credentials.map(resolve),
        nkey_seed_file: n.nkey_seed_file.map(resolve),
        token: n.token,
        user_password,
        tls: n.tls.map(|t| TlsConfig {
            ca: t.ca.map(resolve),
            cert: t.cert.map(resolve),
            key: t.key.map(resolve),
            required: t.required.unwrap_or(true),
        }),
    })
}

fn convert_host(
    h: raw::RawHost,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> anyhow::Result<HostConfig> {
    let ctx = "host";
    let epoch_tick =
        opt_duration(ctx, "epoch_tick", h.epoch_tick)?.unwrap_or(Duration::from_millis(10));
    if epoch_tick < Duration::from_millis(1) || epoch_tick > Duration::from_secs(1) {
        bail!("host: epoch_tick must be between 1ms and 1s, got {epoch_tick:?}");
    }
    let cache_dir = match (h.cache.unwrap_or(true), h.cache_dir) {
        (false, _) => None,
        (true, Some(dir)) => Some(resolve(dir)),
        (true, None) => default_cache_dir(),
    };
    Ok(HostConfig {
        drain_timeout: opt_duration(ctx, "drain_timeout", h.drain_timeout)?
            .unwrap_or(Duration::from_secs(30)),
        cache_dir,
        epoch_tick,
        metrics_addr: h.metrics_addr,
    })
}

/// `$XDG_CACHE_HOME/mailroom`, else `$HOME/.cache/mailroom`, else no cache.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("mailroom"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("mailroom"))
}

fn convert_handler(
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
    let prefetch = h.prefetch.map_or(max_buffered, |p| p as usize);
    if prefetch == 0 || prefetch > max_buffered {
        bail!(
            "{ctx}: prefetch must be between 1 and max_buffered ({max_buffered}), got {prefetch}"
        );
    }
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

fn storage(ctx: &str, storage: Option<&str>) -> anyhow::Result<bool> {
    match storage {
        None | Some("file") => Ok(false),
        Some("memory") => Ok(true),
        Some(other) => bail!("{ctx}: storage must be \"file\" or \"memory\", got {other:?}"),
    }
}

fn opt_duration(ctx: &str, field: &str, value: Option<String>) -> anyhow::Result<Option<Duration>> {
    value
        .map(|v| parse_duration(&v).map_err(|e| anyhow::anyhow!("{ctx}: {field}: {e}")))
        .transpose()
}

fn opt_size(ctx: &str, field: &str, value: Option<String>) -> anyhow::Result<Option<u64>> {
    value
        .map(|v| parse_size(&v).map_err(|e| anyhow::anyhow!("{ctx}: {field}: {e}")))
        .transpose()
}

/// Names of handlers, streams, consumers and buckets end up in NATS subjects and API calls.
fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        bail!(
            "{what} name {name:?} is not valid: use 1 to 64 letters, digits, '-' or '_' \
             (no dots, spaces or wildcards)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
