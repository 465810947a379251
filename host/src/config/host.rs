//! `[host]`: settings of the host process as a whole.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use super::{opt_duration, raw};

/// Host-wide settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// How long shutdown waits for in-flight messages. Default 30s.
    pub drain_timeout: Duration,
    /// Where compiled modules are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Epoch tick: granularity of time limits. Default 10ms.
    pub epoch_tick: Duration,
    /// Address of the HTTP endpoint (`/healthz`, `/readyz`, `/metrics`, `/status`), if any.
    pub metrics_addr: Option<String>,
    /// A name for this host in logs, status and partition leases (default: the machine's
    /// host name). A random suffix keeps two processes with one name apart.
    pub id: Option<String>,
    /// Partition leases expire this long after their last renewal (used when the lease
    /// bucket is created; a host always follows the bucket's own setting). Default 10s.
    pub lease_ttl: Duration,
    /// What a handler that fails to start does to the host. Default: retry.
    pub on_handler_error: OnHandlerError,
    /// How often each handler's summary line is logged; `None` (written `"0s"`) turns it off.
    /// Default 30s.
    pub summary_interval: Option<Duration>,
}

/// What happens when a handler cannot start (its module does not load, its stream or
/// dead-letter stream is missing, its consumer cannot be created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHandlerError {
    /// The host exits with the error (an orchestrator restarts it).
    Exit,
    /// The handler is tried again with a backoff (1s doubling to 60s) while the others run;
    /// the host is not ready meanwhile. The default.
    Retry,
    /// The handler stays failed and the others run; the host is not ready.
    Continue,
}

pub(super) fn convert_host(
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
    if let Some(id) = &h.id {
        let ok = !id.is_empty()
            && id.len() <= 48
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            bail!("host: id {id:?} is not valid: use 1 to 48 letters, digits, '-' or '_'");
        }
    }
    let lease_ttl = opt_duration(ctx, "lease_ttl", h.lease_ttl)?.unwrap_or(Duration::from_secs(10));
    if lease_ttl < Duration::from_secs(3) || lease_ttl > Duration::from_secs(600) {
        bail!("host: lease_ttl must be between 3s and 10m, got {lease_ttl:?}");
    }
    let on_handler_error = match h.on_handler_error.as_deref() {
        None | Some("retry") => OnHandlerError::Retry,
        Some("exit") => OnHandlerError::Exit,
        Some("continue") => OnHandlerError::Continue,
        Some(other) => bail!(
            "host: on_handler_error must be \"exit\", \"retry\" or \"continue\", got {other:?}"
        ),
    };
    let summary_interval = opt_duration(ctx, "summary_interval", h.summary_interval)?
        .unwrap_or(Duration::from_secs(30));
    if !summary_interval.is_zero() && summary_interval < Duration::from_millis(100) {
        bail!(
            "host: summary_interval must be at least 100ms (or \"0s\" to turn the summary off), \
             got {summary_interval:?}"
        );
    }
    Ok(HostConfig {
        id: h.id,
        lease_ttl,
        on_handler_error,
        summary_interval: (!summary_interval.is_zero()).then_some(summary_interval),
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
