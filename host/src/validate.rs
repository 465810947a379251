//! `mailroom validate`: everything about a config that can be checked without running it.
//! Without a server: the config itself (parsed and cross-checked once by `config`) and every
//! module, loaded exactly as a host loads it. With `--server`: what only the server can tell
//! (streams exist, filters select something, dead letters are stored and do not loop back,
//! the server is new enough for partitions).

use std::sync::Arc;

use anyhow::bail;
use async_nats::jetstream;

use crate::capabilities::{Backend, MemoryBackend};
use crate::config::{check_against_stream, Config};
use crate::host::{load, runtime_config, server_at_least};
use crate::runtime::Runtime;

/// Checks every handler's module without connecting: each one is compiled, linked and checked
/// against the `mailroom:handler` world. Returns one summary line per handler.
pub fn validate(config: &Config) -> anyhow::Result<Vec<String>> {
    let runtime = Runtime::new(&runtime_config(config))?;
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new(1 << 20));
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for handler in &config.handlers {
        match load(&runtime, handler, backend.clone(), Arc::default()) {
            Ok(_) => lines.push(format!(
                "handler {}: {} consumes stream {} as {} (ordering {}, workers {}..={}, {} attempts, dead letter {})",
                handler.name,
                handler.module.display(),
                handler.stream,
                handler.consumer,
                handler.ordering,
                handler.min_workers,
                handler.max_workers,
                handler.retry.max_attempts,
                handler.dead_letter.as_deref().unwrap_or("none"),
            )),
            Err(err) => errors.push(format!("handler {}: {err:#}", handler.name)),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    if config.deploy.watch {
        lines.push(config.deploy.describe());
    }
    Ok(lines)
}

/// Checks `config` against the server behind `js`; returns one line per handler, or fails
/// naming every problem found.
pub async fn validate_with_server(
    config: &Config,
    js: &jetstream::Context,
) -> anyhow::Result<Vec<String>> {
    let version = js.client().server_info().version;
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for handler in &config.handlers {
        let declared = config.streams.iter().find(|s| s.name == handler.stream);
        let subjects = match js.get_stream(&handler.stream).await {
            Ok(stream) => Some(stream.cached_info().config.subjects.clone()),
            Err(_) => declared.map(|s| s.subjects.clone()),
        };
        match &subjects {
            None => errors.push(format!(
                "handler {}: stream {} exists neither on the server nor in the config",
                handler.name, handler.stream
            )),
            Some(subjects) => {
                if let Err(err) = check_against_stream(handler, subjects) {
                    errors.push(err);
                }
            }
        }
        if let Some(dl) = &handler.dead_letter {
            let on_server = js.stream_by_subject(dl.as_str()).await.is_ok();
            let declared = config.streams.iter().any(|s| {
                s.subjects.iter().any(|p| {
                    crate::capabilities::SubjectPattern::parse(p).is_ok_and(|p| p.matches(dl))
                })
            });
            if !on_server && !declared {
                errors.push(format!(
                    "handler {}: dead_letter {dl:?} is captured by no stream on the server or in \
                     the config, so dead-letter records could not be stored; add a [[stream]] \
                     whose subjects include it",
                    handler.name
                ));
            }
        }
        if handler.partitions.is_some() && !server_at_least(&version, 2, 11) {
            errors.push(format!(
                "handler {}: partitions need nats-server 2.11 or newer; the server is {version}",
                handler.name
            ));
        }
        lines.push(format!(
            "handler {}: stream {} on the server: {}",
            handler.name,
            handler.stream,
            if subjects.is_some() { "ok" } else { "missing" }
        ));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(lines)
}
