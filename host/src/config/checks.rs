//! Checks across tables (a handler against the streams it names, streams against each
//! other), so that `validate` catches what `run` would refuse or mishandle, and warnings for
//! settings that have no effect or forbid everything.

use anyhow::bail;

use super::{Config, HandlerConfig};
use crate::capabilities::SubjectPattern;

/// Fails on what no server could make work; returns warnings for the rest.
pub(super) fn cross_check(config: &Config) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    for (i, a) in config.streams.iter().enumerate() {
        for b in &config.streams[i + 1..] {
            for sa in &a.subjects {
                for sb in &b.subjects {
                    if pattern(sa).overlaps(&pattern(sb)) {
                        bail!(
                            "streams {:?} and {:?} both capture {sa:?} / {sb:?}: a subject may \
                             belong to one stream only; give them subjects that do not overlap",
                            a.name,
                            b.name
                        );
                    }
                }
            }
        }
    }
    if let Some(addr) = &config.host.metrics_addr {
        if addr.parse::<std::net::SocketAddr>().is_err() {
            bail!("host.metrics_addr {addr:?} is not an address; write it as 127.0.0.1:9090");
        }
    }
    for h in &config.handlers {
        if let Some(stream) = config.streams.iter().find(|s| s.name == h.stream) {
            check_against_stream(h, &stream.subjects).map_err(anyhow::Error::msg)?;
        }
        if let Some(dl) = &h.dead_letter {
            let captured = config
                .streams
                .iter()
                .any(|s| s.subjects.iter().any(|p| pattern(p).matches(dl)));
            if !captured {
                warnings.push(format!(
                    "handler {}: dead_letter {dl:?} is captured by no [[stream]] of this \
                     config; a stream on the server must capture it, or the host refuses to \
                     start the handler",
                    h.name
                ));
            }
        }
        for bucket in &h.kv_allow {
            if bucket != "*" && !config.buckets.iter().any(|b| &b.name == bucket) {
                warnings.push(format!(
                    "handler {}: kv.allow names bucket {bucket:?}, which no [[bucket]] declares; \
                     it must exist on the server, or the handler's calls fail with no-such-bucket",
                    h.name
                ));
            }
        }
        if h.ordering.is_ordered() && h.prefetch.is_some() {
            warnings.push(format!(
                "handler {}: prefetch has no effect on an ordered handler (it holds up to \
                 max_buffered); remove it, or set ordering = \"none\"",
                h.name
            ));
        }
        if h.max_publishes == 0 {
            warnings.push(format!(
                "handler {}: limits.max_publishes = 0 refuses every publish",
                h.name
            ));
        }
    }
    Ok(warnings)
}

fn pattern(text: &str) -> SubjectPattern {
    // Every subject was checked when its table was read.
    SubjectPattern::parse(text).unwrap_or_else(|_| {
        SubjectPattern::parse("invalid.subject").expect("a literal pattern is valid")
    })
}

/// Checks `handler` against the subjects of its stream (declared, or read from the server):
/// its filter must select something, and its dead-letter subject must not feed back into its
/// own input.
pub fn check_against_stream(
    handler: &HandlerConfig,
    stream_subjects: &[String],
) -> Result<(), String> {
    let subjects: Vec<SubjectPattern> = stream_subjects.iter().map(|s| pattern(s)).collect();
    for filter in &handler.filter_subjects {
        let f = pattern(filter);
        if !subjects.iter().any(|s| s.overlaps(&f)) {
            return Err(format!(
                "handler {}: subjects {filter:?} matches none of stream {}'s subjects {:?}, so \
                 it would consume nothing; use a filter inside them",
                handler.name, handler.stream, stream_subjects
            ));
        }
    }
    if let Some(dl) = &handler.dead_letter {
        let in_stream = subjects.iter().any(|s| s.matches(dl));
        let in_filter = handler.filter_subjects.is_empty()
            || handler
                .filter_subjects
                .iter()
                .any(|f| pattern(f).matches(dl));
        if in_stream && in_filter {
            return Err(format!(
                "handler {}: dead_letter {dl:?} is captured by its own stream {} and selected \
                 by its filter {}, so every dead-letter record would come back to it as input \
                 (a loop); send dead letters to a subject of another stream, e.g. dlq.{}",
                handler.name,
                handler.stream,
                if handler.filter_subjects.is_empty() {
                    "(the whole stream)".to_owned()
                } else {
                    format!("{:?}", handler.filter_subjects)
                },
                handler.name
            ));
        }
    }
    Ok(())
}
