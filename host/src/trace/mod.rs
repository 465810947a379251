//! Trace context across handlers: a message's `traceparent` becomes the parent of the span
//! that handles it, and every publish of that handler carries the context on, so one trace
//! follows a message through a chain of handlers.
//!
//! - [`context`]: W3C Trace Context, pure (parse, child span id, format).
//! - [`export`]: the OTLP layer, installed by the binary when an endpoint is configured.
//! - [`adopt`] (called by the consumer for each attempt) decides the context its publishes
//!   carry: with export on, the message span's own OpenTelemetry context (child of the
//!   input's, or a new trace); with export off, the input's trace with a fresh span id when
//!   the input had one, and nothing when it had none. [`scope`] makes it visible to the
//!   `publish` capability ([`outgoing`]) for the duration of the handler call, through a
//!   tokio task-local: no lock and no allocation when a message carries no context.

pub mod context;
pub mod export;

use std::future::Future;

use async_nats::HeaderMap;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use context::TraceParent;

/// The header names.
pub const TRACEPARENT: &str = "traceparent";
/// See [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// The trace context a handler's publishes carry, formatted once per attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The `traceparent` value.
    pub traceparent: String,
    /// The `tracestate` value, passed on unchanged.
    pub tracestate: Option<String>,
}

tokio::task_local! {
    static OUTGOING: Outgoing;
}

/// The `traceparent` (and `tracestate`) of a message's headers, when valid. Header names are
/// matched without regard to case, as HTTP does.
pub fn incoming(headers: &HeaderMap) -> Option<(TraceParent, Option<String>)> {
    let mut parent = None;
    let mut states = Vec::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(TRACEPARENT) {
            // More than one traceparent is invalid: W3C says to ignore them all.
            if parent.is_some() || values.len() != 1 {
                return None;
            }
            parent = Some(TraceParent::parse(values[0].as_str())?);
        } else if name.eq_ignore_ascii_case(TRACESTATE) {
            states.extend(values.iter().map(|v| v.as_str()));
        }
    }
    parent.map(|p| (p, context::tracestate(states)))
}

/// Makes `span` (a message's span, not yet entered) a child of the message's trace context
/// and returns the context its publishes should carry; see the module documentation.
pub fn adopt(span: &tracing::Span, headers: Option<&HeaderMap>) -> Option<Outgoing> {
    let incoming = headers.and_then(incoming);
    if export::enabled() {
        if let Some((parent, state)) = &incoming {
            let remote = SpanContext::new(
                TraceId::from_bytes(parent.trace_id),
                SpanId::from_bytes(parent.parent_id),
                TraceFlags::new(parent.flags),
                true,
                state
                    .as_deref()
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default(),
            );
            // Fails only for a span no layer records (its level is filtered out); it then
            // gets no OpenTelemetry context and the fallback below applies.
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let cx = span.context();
        let own = cx.span().span_context().clone();
        if own.is_valid() {
            let traceparent = TraceParent {
                trace_id: own.trace_id().to_bytes(),
                parent_id: own.span_id().to_bytes(),
                flags: own.trace_flags().to_u8(),
            };
            return Some(Outgoing {
                traceparent: traceparent.to_string(),
                tracestate: incoming.and_then(|(_, state)| state),
            });
        }
    }
    incoming.map(|(parent, tracestate)| Outgoing {
        traceparent: parent.child(context::new_span_id()).to_string(),
        tracestate,
    })
}

/// Runs `work` (a handler call) with `outgoing` visible to [`outgoing`].
pub async fn scope<F: Future>(outgoing: Option<Outgoing>, work: F) -> F::Output {
    match outgoing {
        Some(o) => OUTGOING.scope(o, work).await,
        None => work.await,
    }
}

/// Calls `f` with the trace context of the handler call running on this task, if it has one.
pub fn outgoing<R>(f: impl FnOnce(&Outgoing) -> R) -> Option<R> {
    OUTGOING.try_with(f).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn incoming_context_is_found_case_insensitively() {
        let mut h = HeaderMap::new();
        h.insert("TraceParent", PARENT);
        h.insert("tracestate", "congo=t61rcWkgMzE");
        let (tp, state) = incoming(&h).unwrap();
        assert_eq!(tp.to_string(), PARENT);
        assert_eq!(state.as_deref(), Some("congo=t61rcWkgMzE"));

        let mut twice = HeaderMap::new();
        twice.append("traceparent", PARENT);
        twice.append("traceparent", PARENT);
        assert_eq!(incoming(&twice), None, "several traceparents are ignored");

        let mut bad = HeaderMap::new();
        bad.insert("traceparent", "garbage");
        bad.insert("tracestate", "congo=t61rcWkgMzE");
        assert_eq!(incoming(&bad), None);
    }

    #[tokio::test]
    async fn without_export_a_child_of_the_input_is_propagated() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", PARENT);
        let span = tracing::Span::none();
        let out = adopt(&span, Some(&h)).unwrap();
        let sent = TraceParent::parse(&out.traceparent).unwrap();
        let input = TraceParent::parse(PARENT).unwrap();
        assert_eq!(sent.trace_id, input.trace_id);
        assert_ne!(sent.parent_id, input.parent_id, "a span id of our own");
        assert_eq!(adopt(&span, None), None, "no context in, none out");

        assert_eq!(outgoing(|o| o.clone()), None, "outside a handler call");
        let seen = scope(Some(out.clone()), async {
            tokio::task::yield_now().await;
            outgoing(|o| o.clone())
        })
        .await;
        assert_eq!(seen, Some(out));
    }

    #[tokio::test]
    async fn publishes_in_a_traced_call_carry_the_context_unless_the_guest_set_one() {
        use crate::capabilities::SubjectPattern;
        use crate::capabilities::{CallContext, Grants, HandlerCaps, MemoryBackend};
        use crate::runtime::bindings::mailroom::handler::publish::{self, Host as _};
        use std::sync::Arc;

        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let caps = Arc::new(HandlerCaps {
            name: "h".into(),
            grants: Grants {
                publish: vec![SubjectPattern::parse("out.>").unwrap()],
                kv_buckets: vec![],
            },
            settings: Default::default(),
            max_publishes: 10,
            log_budget: 100,
            backend: backend.clone(),
            metrics: Arc::default(),
        });
        let out = Outgoing {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01".into(),
            tracestate: Some("congo=t61rcWkgMzE".into()),
        };
        let mut call = CallContext::new(caps, "S".into(), 1);
        scope(Some(out.clone()), async {
            call.publish("out.a".into(), vec![], vec![])
                .await
                .unwrap()
                .unwrap();
            let own = publish::Header {
                name: "TraceParent".into(),
                values: vec![PARENT.into()],
            };
            call.publish("out.b".into(), vec![], vec![own])
                .await
                .unwrap()
                .unwrap();
        })
        .await;
        call.publish("out.c".into(), vec![], vec![])
            .await
            .unwrap()
            .unwrap();
        // Publishes are staged during the call; the context is in the staged headers.
        let headers: Vec<Vec<(String, String)>> =
            call.into_staged().into_iter().map(|o| o.headers).collect();
        assert_eq!(
            headers[0],
            [
                ("traceparent".to_owned(), out.traceparent.clone()),
                ("tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned()),
            ]
        );
        assert_eq!(
            headers[1],
            [("TraceParent".to_owned(), PARENT.to_owned())],
            "the guest's own context wins"
        );
        assert!(headers[2].is_empty(), "no context outside a traced call");
    }
}
