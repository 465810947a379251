//! The host configuration: a TOML file, parsed into [`raw`] types and converted once into a
//! validated [`Config`].
//!
//! Invariant: a `Config` that exists is valid. Every check that does not need the network
//! (names, subjects, durations, sizes, limits) happens in [`Config::parse`], and its errors
//! name the handler and the field and say how to fix it. Paths are resolved against the
//! configuration file's directory.

mod checks;
mod deploy;
mod handler;
mod host;
mod nats;
mod raw;
mod telemetry;
mod units;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::capabilities::SubjectPattern;

pub use units::{parse_duration, parse_size};

pub use checks::check_against_stream;
pub use deploy::{
    check_label, default_connection, handler_from_table, load_connection, DeployConfig,
};
pub use handler::{ConsumerKind, HandlerConfig};
pub use host::{default_cache_dir, HostConfig, OnHandlerError};
pub use nats::{server_addrs, NatsConfig, TlsConfig};
pub use telemetry::{traces_url, TelemetryConfig};

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
    /// Handlers deployed through NATS that this host runs too.
    pub deploy: DeployConfig,
    /// Settings that have no effect or look wrong, but do not stop the host (printed by
    /// `validate`, logged by `run`).
    pub warnings: Vec<String>,
    /// Where trace spans are exported.
    pub telemetry: TelemetryConfig,
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

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        Config::load_with(path, false)
    }

    /// Reads and validates the file at `path`; with `watch`, as if it said
    /// `[deploy] watch = true` (`mailroom run --watch`).
    pub fn load_with(path: &Path, watch: bool) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Config::parse_with(&text, base, watch)
            .with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses and validates TOML `text`; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        Config::parse_with(text, base, false)
    }

    /// [`Config::parse`]; with `watch`, as if the text said `[deploy] watch = true`.
    pub fn parse_with(text: &str, base: &Path, watch: bool) -> anyhow::Result<Config> {
        let mut raw: raw::RawConfig =
            toml::from_str(text).map_err(|err| anyhow::anyhow!("{err}"))?;
        if watch {
            raw.deploy.watch = Some(true);
        }
        convert(raw, base)
    }
}

fn convert(raw: raw::RawConfig, base: &Path) -> anyhow::Result<Config> {
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let nats = nats::convert_nats(raw.nats, &resolve)?;
    let host = host::convert_host(raw.host, &resolve)?;
    let telemetry = telemetry::convert_telemetry(raw.telemetry)?;
    let deploy = deploy::convert_deploy(raw.deploy)?;

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

    if raw.handlers.is_empty() && !deploy.watch {
        bail!(
            "no handlers: add at least one [[handler]] with name, module and stream, or run \
             the handlers deployed through NATS with [deploy] watch = true (or `run --watch`)"
        );
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
        handlers.push(handler::convert_handler(h, &resolve)?);
    }
    let mut config = Config {
        nats,
        host,
        streams,
        buckets,
        handlers,
        telemetry,
        deploy,
        warnings: Vec::new(),
    };
    config.warnings = checks::cross_check(&config)?;
    config.warnings.extend(deploy::warnings(&config.deploy));
    Ok(config)
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
