//! Unit-test handlers natively, with plain `cargo test`.
//!
//! Off `wasm32`, the SDK's host calls ([`publish()`](crate::publish()), [`kv`](crate::kv),
//! [`config`](crate::config), the log macros) go to a [`Harness`]: settings you give it, an
//! in-memory KV store, and a record of every publish and log line, to assert on. The harness
//! checks what the host checks (subject and key syntax, grants when you set them, the publish
//! limit) and derives the same `Nats-Msg-Id`s, and its conditional KV writes apply once per
//! message as the host's do, so running one message twice shows what a redelivery would do.
//!
//! ```
//! use mailroom_sdk::testing::Harness;
//! use mailroom_sdk::{config, publish, Message, Result};
//!
//! fn handle(msg: Message) -> Result {
//!     let out = config::require("output-subject")?;
//!     publish(&out, msg.payload())?;
//!     mailroom_sdk::info!(bytes = msg.payload().len(); "forwarded");
//!     Ok(())
//! }
//!
//! let mut harness = Harness::new().setting("output-subject", "out.copy");
//! harness.run(handle, Message::new("in.1", "hello")).unwrap();
//! harness.assert_published("out.copy", "hello");
//! assert_eq!(harness.logs()[0].field("bytes"), Some("5"));
//!
//! // Without the setting, the handler rejects the message.
//! let err = Harness::new().run(handle, Message::new("in.1", "x")).unwrap_err();
//! assert!(err.is_reject());
//! ```
//!
//! Handlers run on the calling thread; each test has its own harness, so tests run in parallel.

pub(crate) mod host;

use std::collections::{BTreeMap, HashMap};

use crate::log::Level;
use crate::{Error, Message};

/// A message the handler published, as the host would have sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The subject.
    pub subject: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Headers as `(name, value)` pairs, in order (a name may repeat).
    pub headers: Vec<(String, String)>,
    /// The `Nats-Msg-Id`: the handler's own, or `handler:stream:sequence:index` as the host
    /// derives it.
    pub msg_id: String,
}

impl Published {
    /// The payload as text (lossy for bytes that are not UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload parsed as JSON. Panics with the payload when it does not parse.
    #[cfg(feature = "json")]
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.payload).unwrap_or_else(|err| {
            panic!(
                "payload published to {} is not the expected JSON ({err}): {}",
                self.subject,
                self.text()
            )
        })
    }

    /// The first value of header `name` (names compare ASCII case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One log record the handler wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Its level.
    pub level: Level,
    /// The message.
    pub message: String,
    /// Its structured fields, `(name, value)`, in order.
    pub fields: Vec<(String, String)>,
}

impl LogRecord {
    /// The value of field `name`, if the record has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A key's latest write: a value, or a delete marker (`None`), with its revision.
#[derive(Debug, Clone)]
struct Slot {
    value: Option<Vec<u8>>,
    revision: u64,
}

/// The message being handled, for derived ids and per-call counters.
#[derive(Debug, Clone, Default)]
struct Call {
    handler: String,
    stream: String,
    sequence: u64,
    publishes: u32,
    kv_written: Vec<(String, u32)>,
}

/// Everything the harness holds; moved into the thread's slot for the duration of a run.
#[derive(Debug, Clone, Default)]
struct State {
    settings: BTreeMap<String, String>,
    publish_allow: Option<Vec<String>>,
    kv_allow: Option<Vec<String>>,
    max_publishes: u32,
    publish_failure: Option<String>,
    kv_failure: Option<String>,
    kv: HashMap<(String, String), Slot>,
    once: HashMap<(String, String), u64>,
    revision: u64,
    published: Vec<Published>,
    logs: Vec<LogRecord>,
    call: Call,
}

impl State {
    fn write(&mut self, bucket: &str, key: &str, value: Option<Vec<u8>>) -> u64 {
        self.revision += 1;
        let revision = self.revision;
        self.kv.insert(
            (bucket.to_owned(), key.to_owned()),
            Slot { value, revision },
        );
        revision
    }
}

/// A stand-in for the Mailroom host, for native unit tests of a handler. See the
/// [module documentation](self).
#[derive(Debug, Clone)]
pub struct Harness {
    state: State,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    /// A harness with no settings, an empty KV store, every subject and bucket granted and the
    /// host's default limit of 100 publishes per message.
    pub fn new() -> Harness {
        Harness {
            state: State {
                max_publishes: 100,
                ..State::default()
            },
        }
    }

    /// Adds a `[handler.config]` setting.
    pub fn setting(mut self, key: impl Into<String>, value: impl Into<String>) -> Harness {
        self.state.settings.insert(key.into(), value.into());
        self
    }

    /// Stores a KV value before the handler runs.
    pub fn kv_value(mut self, bucket: &str, key: &str, value: impl Into<Vec<u8>>) -> Harness {
        self.state.write(bucket, key, Some(value.into()));
        self
    }

    /// Grants publishing to `pattern` (`*` and a final `>` are wildcards). Once any is given,
    /// publishes outside them are denied, as with the host's `publish.allow`; without any,
    /// everything is granted.
    pub fn allow_publish(mut self, pattern: impl Into<String>) -> Harness {
        self.state
            .publish_allow
            .get_or_insert_with(Vec::new)
            .push(pattern.into());
        self
    }

    /// Grants KV bucket `bucket` (`"*"` for all). Once any is given, other buckets are denied,
    /// as with the host's `kv.allow`; without any, every bucket is granted.
    pub fn allow_kv(mut self, bucket: impl Into<String>) -> Harness {
        self.state
            .kv_allow
            .get_or_insert_with(Vec::new)
            .push(bucket.into());
        self
    }

    /// Sets the publishes allowed per message (`limits.max_publishes`; default 100).
    pub fn max_publishes(mut self, limit: u32) -> Harness {
        self.state.max_publishes = limit;
        self
    }

    /// Makes every publish fail as unavailable (NATS down), with `reason`; `None` heals it.
    pub fn fail_publishes(&mut self, reason: Option<&str>) -> &mut Harness {
        self.state.publish_failure = reason.map(str::to_owned);
        self
    }

    /// Makes every KV call fail as unavailable, with `reason`; `None` heals it.
    pub fn fail_kv(&mut self, reason: Option<&str>) -> &mut Harness {
        self.state.kv_failure = reason.map(str::to_owned);
        self
    }

    /// Runs `handler` on `msg` with this harness as its host, and returns its result. Publishes
    /// and log records add to what earlier runs left; KV writes stay.
    ///
    /// Running the same message again (same stream and sequence) is what a redelivery does:
    /// publishes get the same `Nats-Msg-Id`s, and conditional KV writes are recognised as
    /// already applied.
    pub fn run<F>(&mut self, handler: F, msg: Message) -> Result<(), Error>
    where
        F: FnOnce(Message) -> Result<(), Error>,
    {
        self.state.call = Call {
            handler: msg.handler_name().to_owned(),
            stream: msg.stream().to_owned(),
            sequence: msg.sequence(),
            ..Call::default()
        };
        let _installed = host::install(&mut self.state);
        handler(msg)
    }

    /// Every message published so far, in order.
    pub fn published(&self) -> &[Published] {
        &self.state.published
    }

    /// The messages published to `subject` so far, in order.
    pub fn published_to(&self, subject: &str) -> Vec<&Published> {
        self.state
            .published
            .iter()
            .filter(|p| p.subject == subject)
            .collect()
    }

    /// Every log record so far, in order.
    pub fn logs(&self) -> &[LogRecord] {
        &self.state.logs
    }

    /// Forgets the publishes and log records so far (KV contents stay).
    pub fn clear(&mut self) {
        self.state.published.clear();
        self.state.logs.clear();
    }

    /// The current value of a KV key, if it exists.
    pub fn kv(&self, bucket: &str, key: &str) -> Option<&[u8]> {
        self.state
            .kv
            .get(&(bucket.to_owned(), key.to_owned()))
            .and_then(|slot| slot.value.as_deref())
    }

    /// Panics unless exactly one message was published to `subject` with this payload (or,
    /// when several were, unless one of them has it), listing what was published.
    pub fn assert_published(&self, subject: &str, payload: impl AsRef<[u8]>) {
        let payload = payload.as_ref();
        if self
            .published_to(subject)
            .iter()
            .any(|p| p.payload == payload)
        {
            return;
        }
        panic!(
            "nothing published to {subject} with payload {:?}; published:\n{}",
            String::from_utf8_lossy(payload),
            self.describe_published()
        );
    }

    /// Panics if anything was published.
    pub fn assert_nothing_published(&self) {
        assert!(
            self.state.published.is_empty(),
            "expected no publishes; published:\n{}",
            self.describe_published()
        );
    }

    /// Panics unless a record at `level` contains `text`, listing the records.
    pub fn assert_logged(&self, level: Level, text: &str) {
        if self
            .state
            .logs
            .iter()
            .any(|r| r.level == level && r.message.contains(text))
        {
            return;
        }
        let records: Vec<String> = self
            .state
            .logs
            .iter()
            .map(|r| format!("  {:?} {} {:?}", r.level, r.message, r.fields))
            .collect();
        panic!(
            "no {level:?} record containing {text:?}; records:\n{}",
            records.join("\n")
        );
    }

    /// Panics unless KV `bucket/key` holds `value`.
    pub fn assert_kv(&self, bucket: &str, key: &str, value: impl AsRef<[u8]>) {
        let found = self.kv(bucket, key);
        assert!(
            found == Some(value.as_ref()),
            "KV {bucket}/{key} is {:?}, expected {:?}",
            found.map(String::from_utf8_lossy),
            String::from_utf8_lossy(value.as_ref())
        );
    }

    fn describe_published(&self) -> String {
        let lines: Vec<String> = self
            .state
            .published
            .iter()
            .map(|p| format!("  {} {}", p.subject, p.text()))
            .collect();
        if lines.is_empty() {
            "  (nothing)".to_owned()
        } else {
            lines.join("\n")
        }
    }
}

#[cfg(test)]
mod tests;
