//! The `log` import: the per-message budget, and a guest's structured fields turned into real
//! `tracing` fields.
//!
//! `tracing` wants field names known at compile time; a guest's are known only when it logs.
//! Each distinct (level, field names) shape gets one callsite, built and registered on first
//! use and kept for the life of the process: the names are leaked once per shape, and at most
//! [`MAX_SHAPES`] shapes are made (a guest inventing names per message could otherwise grow
//! memory without bound). Past that, or past [`MAX_FIELDS`] fields, the extra fields are
//! appended to the message as `name=value`, so nothing a guest logs is lost.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use tracing_core::callsite::Callsite;
use tracing_core::field::{Field, FieldSet, Value};
use tracing_core::{Event, Interest, Kind, Level, Metadata};

use super::CallContext;
use crate::runtime::bindings::mailroom::handler::log;
use crate::telemetry::HandlerMetrics;

/// Structured fields per record; more are folded into the message.
pub const MAX_FIELDS: usize = 16;
/// Distinct record shapes (level and field names) per process.
pub const MAX_SHAPES: usize = 1024;
/// The two fields every guest record has before its own.
const FIXED: [&str; 2] = ["message", "handler"];

impl log::Host for CallContext {
    fn log(
        &mut self,
        level: log::Level,
        message: String,
        fields: Vec<log::Field>,
    ) -> wasmtime::Result<()> {
        let size = message.len()
            + fields
                .iter()
                .map(|f| f.name.len() + f.value.len())
                .sum::<usize>();
        if self.log_used + size > self.caps.log_budget {
            if self.log_dropped == 0 {
                tracing::warn!(
                    handler = %self.caps.name,
                    budget = self.caps.log_budget,
                    "handler log budget for this message used up; dropping further records"
                );
            }
            self.log_dropped += 1;
            HandlerMetrics::incr(&self.caps.metrics.log_dropped);
            return Ok(());
        }
        self.log_used += size;
        emit(level, &self.caps.name, message, fields);
        Ok(())
    }
}

fn level(level: log::Level) -> Level {
    match level {
        log::Level::Trace => Level::TRACE,
        log::Level::Debug => Level::DEBUG,
        log::Level::Info => Level::INFO,
        log::Level::Warn => Level::WARN,
        log::Level::Error => Level::ERROR,
    }
}

/// Dispatches one guest record with target `mailroom::guest`.
pub(super) fn emit(lvl: log::Level, handler: &str, mut message: String, fields: Vec<log::Field>) {
    let lvl = level(lvl);
    if lvl > tracing::level_filters::LevelFilter::current() {
        return;
    }
    let mut names: Vec<String> = Vec::with_capacity(fields.len().min(MAX_FIELDS));
    let mut values: Vec<String> = Vec::with_capacity(names.capacity());
    for field in fields {
        let name = field_name(&field.name);
        if names.len() < MAX_FIELDS && !names.contains(&name) {
            names.push(name);
            values.push(field.value);
        } else {
            let _ = write!(message, " {name}={}", field.value);
        }
    }
    let Some(callsite) = callsite(lvl, &names) else {
        // Out of shapes: everything goes into the message of a fixed-shape record.
        for (name, value) in names.iter().zip(&values) {
            let _ = write!(message, " {name}={value}");
        }
        fallback(lvl, handler, &message);
        return;
    };
    let meta = callsite.metadata();
    let enabled = tracing_core::dispatcher::get_default(|d| d.enabled(meta));
    if !enabled {
        return;
    }
    let set = meta.fields();
    let mut iter = set.iter();
    let (Some(message_field), Some(handler_field)) = (iter.next(), iter.next()) else {
        return;
    };
    let guest: Vec<(Field, Typed<'_>)> = iter.zip(values.iter().map(|v| typed(v))).collect();
    // `ValueSet` wants an array; unused slots repeat the message field with no value, which
    // every subscriber skips.
    let mut slots: [(&Field, Option<&dyn Value>); MAX_FIELDS + 2] =
        [(&message_field, None); MAX_FIELDS + 2];
    let message_value = tracing::field::display(&message);
    slots[0] = (&message_field, Some(&message_value as &dyn Value));
    slots[1] = (&handler_field, Some(&handler as &dyn Value));
    for (slot, (field, value)) in slots[2..].iter_mut().zip(&guest) {
        *slot = (field, Some(value.as_value()));
    }
    Event::dispatch(meta, &set.value_set(&slots));
}

fn fallback(lvl: Level, handler: &str, message: &str) {
    match lvl {
        Level::TRACE => tracing::trace!(target: "mailroom::guest", handler, "{message}"),
        Level::DEBUG => tracing::debug!(target: "mailroom::guest", handler, "{message}"),
        Level::INFO => tracing::info!(target: "mailroom::guest", handler, "{message}"),
        Level::WARN => tracing::warn!(target: "mailroom::guest", handler, "{message}"),
        _ => tracing::error!(target: "mailroom::guest", handler, "{message}"),
    }
}

/// A field name `tracing` subscribers print as is: letters, digits and `_`; `-` and anything
/// else become `_`, and the host's own names are prefixed with `guest_`.
fn field_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    if FIXED.contains(&out.as_str()) {
        out.insert_str(0, "guest_");
    }
    out
}

/// A guest value recorded with its natural type: integers and booleans as such (JSON logs
/// show `7`, not `"7"`), everything else as text.
enum Typed<'a> {
    Int(i64),
    Bool(bool),
    Text(&'a str),
}

fn typed(value: &str) -> Typed<'_> {
    if let Ok(n) = value.parse::<i64>() {
        Typed::Int(n)
    } else if let Ok(b) = value.parse::<bool>() {
        Typed::Bool(b)
    } else {
        Typed::Text(value)
    }
}

impl Typed<'_> {
    fn as_value(&self) -> &dyn Value {
        match self {
            Typed::Int(n) => n,
            Typed::Bool(b) => b,
            Typed::Text(s) => s,
        }
    }
}

/// One record shape's callsite.
struct GuestCallsite {
    meta: OnceLock<Metadata<'static>>,
}

impl Callsite for GuestCallsite {
    fn set_interest(&self, _interest: Interest) {
        // Interest is asked of the dispatcher at every record instead (`enabled`).
    }

    fn metadata(&self) -> &Metadata<'_> {
        self.meta
            .get()
            .expect("the metadata is set before registration")
    }
}

/// Callsites by shape: the level and the field names, joined by NUL characters.
type Shapes = HashMap<String, &'static GuestCallsite>;

fn shapes() -> &'static Mutex<Shapes> {
    static SHAPES: OnceLock<Mutex<Shapes>> = OnceLock::new();
    SHAPES.get_or_init(Mutex::default)
}

/// The callsite for this shape, made and registered on first use; `None` once
/// [`MAX_SHAPES`] exist.
fn callsite(lvl: Level, names: &[String]) -> Option<&'static GuestCallsite> {
    let mut key = lvl.as_str().to_owned();
    for name in names {
        key.push('\0');
        key.push_str(name);
    }
    // The map holds plain references; a panic elsewhere cannot leave it inconsistent.
    let mut shapes = shapes().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(found) = shapes.get(&key) {
        return Some(found);
    }
    if shapes.len() >= MAX_SHAPES {
        return None;
    }
    let mut all: Vec<&'static str> = FIXED.to_vec();
    all.extend(
        names
            .iter()
            .map(|n| &*Box::leak(n.clone().into_boxed_str())),
    );
    let all: &'static [&'static str] = Box::leak(all.into_boxed_slice());
    let callsite: &'static GuestCallsite = Box::leak(Box::new(GuestCallsite {
        meta: OnceLock::new(),
    }));
    let meta = Metadata::new(
        "guest log",
        "mailroom::guest",
        lvl,
        None,
        None,
        None,
        FieldSet::new(all, tracing_core::identify_callsite!(callsite)),
        Kind::EVENT,
    );
    if callsite.meta.set(meta).is_err() {
        return None;
    }
    tracing_core::callsite::register(callsite);
    shapes.insert(key, callsite);
    Some(callsite)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;
    use crate::capabilities::tests::caps;
    use crate::capabilities::MemoryBackend;
    use log::Host as _;

    #[test]
    fn log_budget_drops_and_counts() {
        let caps = caps(Arc::new(MemoryBackend::new(1)));
        let mut call = CallContext::new(caps.clone(), "S".into(), 1);
        call.log(log::Level::Info, "12345".into(), vec![]).unwrap();
        call.log(log::Level::Info, "12345".into(), vec![]).unwrap();
        call.log(log::Level::Info, "x".into(), vec![]).unwrap();
        assert_eq!(caps.metrics.snapshot().log_dropped, 1);
    }

    #[test]
    fn names_are_made_printable_and_never_shadow_the_hosts() {
        assert_eq!(field_name("order-id"), "order_id");
        assert_eq!(field_name("handler"), "guest_handler");
        assert_eq!(field_name("7up"), "_7up");
        assert_eq!(field_name(""), "_");
    }

    /// What a JSON subscriber writes, to check fields arrive as fields.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_fields_reach_tracing_as_typed_fields() {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(move || writer.clone()),
        );
        let field = |name: &str, value: &str| log::Field {
            name: name.into(),
            value: value.into(),
        };
        tracing::subscriber::with_default(subscriber, || {
            let mut many: Vec<log::Field> = (0..MAX_FIELDS + 2)
                .map(|i| field(&format!("f{i}"), "x"))
                .collect();
            many.insert(0, field("order-id", "7"));
            emit(
                log::Level::Info,
                "enrich",
                "order enriched".into(),
                vec![
                    field("order-id", "7"),
                    field("large", "true"),
                    field("customer", "ACME Corp"),
                ],
            );
            emit(log::Level::Warn, "enrich", "many".into(), many);
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = &lines[0];
        assert_eq!(first["message"], "order enriched", "{text}");
        assert_eq!(first["handler"], "enrich");
        assert_eq!(first["order_id"], 7);
        assert_eq!(first["large"], true);
        assert_eq!(first["customer"], "ACME Corp");
        assert_eq!(first["target"], "mailroom::guest");
        // Past MAX_FIELDS, fields are appended to the message instead of being lost.
        let second = &lines[1];
        assert_eq!(second["order_id"], 7);
        let message = second["message"].as_str().unwrap();
        assert!(message.ends_with("f15=x f16=x f17=x"), "{message}");
    }
}
