//! Dead letters from the operator's side: list them, show one, and redrive them (republish the
//! original message to its original subject), like SQS's redrive.
//!
//! The records are the ones `consumer::settle::dead_letter` writes: the original payload and
//! headers plus `Mailroom-Handler`, `-Error-Kind`, `-Error`, `-Attempts`, `-Subject`, `-Stream`
//! and `-Sequence`. The handlers' `dead_letter` subjects in the config say where to look; the
//! streams that capture them are asked of the server.
//!
//! Redrive is idempotent. Each record is republished with the `Nats-Msg-Id`
//! `redrive:<dead-letter stream>:<sequence>`, and only after the target stream stored it is the
//! record deleted. Run twice, the second run finds nothing; interrupted between the publish
//! and the delete, the next run's publish is dropped as a duplicate (within the target
//! stream's duplicate window) and the record is deleted then.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;

use crate::capabilities::SubjectPattern;
use crate::config::Config;
use crate::consumer::settle::headers;

/// One dead-letter record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The stream that stores it.
    pub stream: String,
    /// Its sequence there (what `dlq show` takes).
    pub sequence: u64,
    /// The dead-letter subject it was published to.
    pub subject: String,
    /// When it was stored.
    pub stored: SystemTime,
    /// All headers, `Mailroom-*` included.
    pub headers: HeaderMap,
    /// The original payload.
    pub payload: Bytes,
}

impl Record {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    /// The handler that gave up (`Mailroom-Handler`).
    pub fn handler(&self) -> &str {
        self.header(headers::HANDLER).unwrap_or("?")
    }

    /// Why (`Mailroom-Error-Kind`): `reject`, `trap`, `timeout`, `exhausted`, ...
    pub fn kind(&self) -> &str {
        self.header(headers::ERROR_KIND).unwrap_or("?")
    }

    /// The last error (`Mailroom-Error`).
    pub fn error(&self) -> &str {
        self.header(headers::ERROR).unwrap_or("")
    }

    /// Attempts made (`Mailroom-Attempts`).
    pub fn attempts(&self) -> &str {
        self.header(headers::ATTEMPTS).unwrap_or("?")
    }

    /// The subject the message was first published to (`Mailroom-Subject`).
    pub fn original_subject(&self) -> Option<&str> {
        self.header(headers::SUBJECT)
    }

    /// The stream and sequence it had there.
    pub fn original(&self) -> (Option<&str>, Option<&str>) {
        (self.header(headers::STREAM), self.header(headers::SEQUENCE))
    }

    /// The headers a redriven message carries: the original ones, without `Mailroom-*` and
    /// without the `Nats-*` headers the server interprets (the record's own `Nats-Msg-Id`).
    pub fn original_headers(&self) -> HeaderMap {
        let mut out = HeaderMap::new();
        for (name, values) in self.headers.iter() {
            let name: &str = name.as_ref();
            if name.starts_with("Mailroom-") || name.starts_with("Nats-") {
                continue;
            }
            for value in values {
                out.append(name, value.as_str());
            }
        }
        out
    }
}

/// Which records a command touches.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this handler's records (and only its `dead_letter` subject is read).
    pub handler: Option<String>,
    /// Only records of this error kind.
    pub kind: Option<String>,
}

impl Filter {
    fn matches(&self, record: &Record) -> bool {
        self.handler
            .as_deref()
            .is_none_or(|h| record.handler() == h)
            && self.kind.as_deref().is_none_or(|k| record.kind() == k)
    }
}

impl Filter {
    /// Checks the filter against the config (no server needed): the handler exists and has a
    /// dead-letter subject.
    pub fn check(&self, config: &Config) -> anyhow::Result<()> {
        if let Some(name) = &self.handler {
            let Some(h) = config.handlers.iter().find(|h| &h.name == name) else {
                bail!(
                    "the config has no handler named {name:?}; its handlers: {}",
                    names(config)
                );
            };
            if h.dead_letter.is_none() {
                bail!(
                    "handler {name} has no dead_letter subject, so it has no dead-letter records"
                );
            }
        }
        Ok(())
    }
}

/// The dead-letter streams of `config` and, per stream, the subjects to read.
async fn sources(
    js: &jetstream::Context,
    config: &Config,
    filter: &Filter,
) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    filter.check(config)?;
    let mut streams: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in &config.handlers {
        if filter.handler.as_ref().is_some_and(|n| n != &h.name) {
            continue;
        }
        let Some(subject) = &h.dead_letter else {
            continue;
        };
        let stream = js
            .stream_by_subject(subject.as_str())
            .await
            .with_context(|| {
                format!(
                    "handler {}: no stream captures its dead_letter subject {subject}",
                    h.name
                )
            })?;
        let subjects = streams.entry(stream).or_default();
        if !subjects.contains(subject) {
            subjects.push(subject.clone());
        }
    }
    if streams.is_empty() {
        bail!("no handler in the config has a dead_letter subject");
    }
    Ok(streams)
}

fn names(config: &Config) -> String {
    let names: Vec<&str> = config.handlers.iter().map(|h| h.name.as_str()).collect();
    names.join(", ")
}

/// Every record matching `filter`, by stream, in stream order.
pub async fn list(
    js: &jetstream::Context,
    config: &Config,
    filter: &Filter,
) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    for (stream, subjects) in sources(js, config, filter).await? {
        out.extend(
            read(js, &stream, subjects)
                .await?
                .into_iter()
                .filter(|r| filter.matches(r)),
        );
    }
    Ok(out)
}

/// Reads the messages of `subjects` in `stream` with an ordered consumer (no state is left on
/// the server).
async fn read(
    js: &jetstream::Context,
    stream: &str,
    subjects: Vec<String>,
) -> anyhow::Result<Vec<Record>> {
    let s = js
        .get_stream(stream)
        .await
        .with_context(|| format!("reading dead-letter stream {stream}"))?;
    let ordered = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subjects: subjects,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .with_context(|| format!("reading dead-letter stream {stream}"))?;
    let mut records = Vec::new();
    if ordered.cached_info().num_pending == 0 {
        return Ok(records);
    }
    let mut messages = ordered
        .messages()
        .await
        .with_context(|| format!("reading dead-letter stream {stream}"))?;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .with_context(|| format!("dead-letter stream {stream} stopped answering"))?
    {
        let message = message.with_context(|| format!("reading dead-letter stream {stream}"))?;
        let info = message
            .info()
            .map_err(|err| anyhow::anyhow!("dead-letter stream {stream}: {err}"))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        let stored = unix_time(info.published.unix_timestamp_nanos());
        records.push(Record {
            stream: stream.to_owned(),
            sequence,
            subject: message.subject.to_string(),
            stored,
            headers: message.headers.clone().unwrap_or_default(),
            payload: message.payload.clone(),
        });
        if pending == 0 {
            break;
        }
    }
    Ok(records)
}

fn unix_time(nanos: i128) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos.clamp(0, u64::MAX as i128) as u64)
}

/// Record `sequence` of the dead-letter stream: `stream`, or the only one the config uses.
pub async fn show(
    js: &jetstream::Context,
    config: &Config,
    sequence: u64,
    stream: Option<&str>,
) -> anyhow::Result<Record> {
    let streams = sources(js, config, &Filter::default()).await?;
    let stream = match stream {
        Some(s) => s.to_owned(),
        None if streams.len() == 1 => streams.keys().next().cloned().unwrap_or_default(),
        None => bail!(
            "the handlers' dead letters are in several streams ({}); say which with --stream",
            streams.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    };
    let s = js
        .get_stream(&stream)
        .await
        .with_context(|| format!("no stream {stream}"))?;
    let m = s.get_raw_message(sequence).await.with_context(|| {
        format!("stream {stream} has no message {sequence} (deleted, or redriven already?)")
    })?;
    let record = Record {
        stream,
        sequence: m.sequence,
        subject: m.subject.to_string(),
        stored: unix_time(m.time.unix_timestamp_nanos()),
        headers: m.headers,
        payload: m.payload,
    };
    if record.original_subject().is_none() {
        bail!(
            "message {sequence} of stream {} (subject {}) is not a Mailroom dead-letter record: \
             it has no {} header",
            record.stream,
            record.subject,
            headers::SUBJECT
        );
    }
    Ok(record)
}

/// What a redrive did.
#[derive(Debug, Default)]
pub struct Redriven {
    /// `(record, target subject, whether the target stream already had it)`, in order.
    pub records: Vec<(Record, String, bool)>,
    /// Records that matched but could not be redriven, with the reason.
    pub skipped: Vec<(Record, String)>,
    /// Handlers other than the records' own that also consume the target subjects, and so
    /// will see the redriven messages too.
    pub also_consumed_by: Vec<String>,
}

/// Republishes up to `max` matching records to their original subjects and deletes them (or
/// only lists what it would do, with `dry_run`).
pub async fn redrive(
    js: &jetstream::Context,
    config: &Config,
    filter: &Filter,
    max: Option<usize>,
    dry_run: bool,
) -> anyhow::Result<Redriven> {
    let mut report = Redriven::default();
    let records = list(js, config, filter).await?;
    for record in records.into_iter().take(max.unwrap_or(usize::MAX)) {
        let Some(target) = record.original_subject().map(str::to_owned) else {
            let reason = format!("no {} header", headers::SUBJECT);
            report.skipped.push((record, reason));
            continue;
        };
        note_other_consumers(config, &record, &target, &mut report.also_consumed_by);
        if dry_run {
            report.records.push((record, target, false));
            continue;
        }
        let msg_id = format!("redrive:{}:{}", record.stream, record.sequence);
        let publish = jetstream::message::PublishMessage::build()
            .payload(record.payload.clone())
            .headers(record.original_headers())
            .message_id(msg_id);
        let ack = js
            .send_publish(target.clone(), publish)
            .await
            .with_context(|| format!("republishing record {} to {target}", record.sequence))?
            .await
            .with_context(|| {
                format!(
                    "republishing record {} to {target}: not stored (is {target} captured by a \
                     stream?)",
                    record.sequence
                )
            })?;
        delete(js, &record).await?;
        report.records.push((record, target, ack.duplicate));
    }
    Ok(report)
}

async fn delete(js: &jetstream::Context, record: &Record) -> anyhow::Result<()> {
    let s: stream::Stream = js.get_stream(&record.stream).await?;
    s.delete_message(record.sequence).await.with_context(|| {
        format!(
            "record {} was republished but could not be deleted from {} (does the stream deny \
             deletes?); running redrive again deletes it without publishing twice within the \
             target stream's duplicate window",
            record.sequence, record.stream
        )
    })?;
    Ok(())
}

fn note_other_consumers(config: &Config, record: &Record, target: &str, seen: &mut Vec<String>) {
    let (stream, _) = record.original();
    for h in &config.handlers {
        let same_stream = stream.is_none_or(|s| s == h.stream);
        let filtered_in = h.filter_subjects.is_empty()
            || h.filter_subjects.iter().any(|f| {
                SubjectPattern::parse(f)
                    .map(|p| p.matches(target))
                    .unwrap_or(false)
            });
        if h.name != record.handler() && same_stream && filtered_in && !seen.contains(&h.name) {
            seen.push(h.name.clone());
        }
    }
}
