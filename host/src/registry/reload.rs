//! `mailroom dev --watch`: a file handler's module is reloaded when its file changes on disk,
//! through the same path as a deployed revision (checked exactly as a host checks it, then a
//! hot swap), so an author sees a rebuilt handler run without restarting anything. Nothing is
//! rebuilt here.
//!
//! Files are polled (every 300 ms) rather than watched with inotify: a build writes the file
//! in several steps, and a change is acted on only once the file's size and modification time
//! stayed the same for one more poll. A file that fails the check (half written, not a
//! component) leaves the running module in place; the next change is tried again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::module;
use crate::config::HandlerConfig;
use crate::consumer::Shared;
use crate::host::HostContext;

const POLL: Duration = Duration::from_millis(300);

/// One reload: the handler, and the module's new version in its slot or why the changed file
/// was not loaded.
#[derive(Debug, Clone)]
pub struct Reloaded {
    /// The handler.
    pub handler: String,
    /// `Ok(version)`: swapped in; `Err(reason)`: the running module stays.
    pub outcome: Result<u64, String>,
}

/// What a file looked like: size and modification time.
type Stamp = Option<(u64, SystemTime)>;

fn stamp(path: &PathBuf) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Polls every handler's module file until `stop`, reloading the changed ones; tells
/// `events` of every reload (while anyone listens).
pub(crate) async fn run(
    ctx: HostContext,
    handlers: Vec<(HandlerConfig, Arc<Shared>)>,
    stop: CancellationToken,
    events: mpsc::UnboundedSender<Reloaded>,
) {
    // Per handler: the stamp last loaded (or refused), the hash last loaded, a change seen.
    let mut seen: Vec<(Stamp, String, Option<Stamp>)> = handlers
        .iter()
        .map(|(h, _)| {
            let hash = std::fs::read(&h.module)
                .map(|b| super::sha256_hex(&b))
                .unwrap_or_default();
            (stamp(&h.module), hash, None)
        })
        .collect();
    tracing::info!(
        handlers = handlers.len(),
        "watching module files for changes"
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => return,
        }
        for ((handler, shared), (loaded, hash, pending)) in handlers.iter().zip(seen.iter_mut()) {
            let now = stamp(&handler.module);
            if now == *loaded {
                *pending = None;
                continue;
            }
            if *pending != Some(now) {
                // Changed since the last poll: wait until it stays the same for one poll.
                *pending = Some(now);
                continue;
            }
            *loaded = now;
            *pending = None;
            let Ok(bytes) = std::fs::read(&handler.module) else {
                continue;
            };
            let new_hash = super::sha256_hex(&bytes);
            if new_hash == *hash {
                continue;
            }
            let metrics = ctx.metrics.handler(&handler.name);
            let outcome = match module::check(&ctx.runtime, handler, ctx.backend.clone(), metrics)
                .await
            {
                Ok(module) => {
                    let version = shared.module.swap(module);
                    *hash = new_hash;
                    tracing::info!(
                        handler = %handler.name,
                        module = %handler.module.display(),
                        version,
                        "module file changed: reloaded; messages from now on run the new module"
                    );
                    Ok(version)
                }
                Err(err) => {
                    tracing::error!(
                        handler = %handler.name,
                        module = %handler.module.display(),
                        "module file changed but is NOT reloaded, the running module stays: {err:#}"
                    );
                    Err(format!("{err:#}"))
                }
            };
            let _ = events.send(Reloaded {
                handler: handler.name.clone(),
                outcome,
            });
        }
    }
}
