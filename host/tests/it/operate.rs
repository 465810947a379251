//! Operating a host: health and readiness, `/status`, Prometheus metrics, handler start
//! failures (`on_handler_error`), trace context through a chain of handlers with an OTLP
//! receiver stand-in, the summary line, and shell completions.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{header, target_dir, wasm, Env};

/// A GET over a fresh connection: `(status code, body)`.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const JOBS: &str = r#"
[host]
metrics_addr = "127.0.0.1:0"

[[stream]]
name = "JOBS"
subjects = ["jobs.>"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_whose_stream_is_missing_is_failed_not_ready_and_retried_until_it_starts() {
    let env = Env::new().await;
    let config = env.config(&format!(
        r#"{JOBS}
[[handler]]
name = "jobs"
module = "{{noop}}"
stream = "JOBS"

[[handler]]
name = "late"
module = "{{noop}}"
stream = "LATER"
"#
    ));
    let host = env.start(config).await;
    let addr = host.running.admin_addr().expect("endpoint bound");

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("handler late: failed:"), "{body}");
    assert!(
        body.contains("LATER"),
        "the reason names the stream: {body}"
    );
    assert!(!body.contains("handler jobs"), "{body}");

    let (code, status) = get(addr, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ready"], false);
    assert_eq!(status["nats"]["state"], "connected");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].is_u64());
    let handler = |name: &str| {
        status["handlers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["handler"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(handler("jobs")["state"], "running");
    assert_eq!(handler("jobs")["backlog"], 0);
    assert_eq!(handler("late")["state"], "failed");
    assert!(handler("late")["error"]
        .as_str()
        .unwrap()
        .contains("stream LATER is not available"));

    let (_, metrics) = get(addr, "/metrics").await;
    assert!(
        metrics.contains("mailroom_handler_up{handler=\"jobs\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailroom_handler_up{handler=\"late\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("mailroom_nats_connected 1"), "{metrics}");

    // The stream appears: the retry (1s, then 2s, ±20%) starts the handler.
    env.js
        .create_stream(stream::Config {
            name: "LATER".into(),
            subjects: vec!["later.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for("readiness", Duration::from_secs(10), async || {
        get(addr, "/readyz").await == (200, "ready\n".to_owned())
    })
    .await;
    assert!(host.running.failed_handlers().is_empty());
    env.publish("later.x", "anything").await;
    env.settled("LATER", "late", Duration::from_secs(10)).await;
    assert_eq!(host.metrics("late").succeeded, 1);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_handler_error_exit_fails_the_start_and_continue_does_not_retry() {
    let env = Env::new().await;
    let config = |policy: &str| {
        env.config(&format!(
            r#"[host]
on_handler_error = "{policy}"

[[stream]]
name = "JOBS"
subjects = ["jobs.>"]

[[handler]]
name = "jobs"
module = "{{noop}}"
stream = "JOBS"

[[handler]]
name = "late"
module = "{{noop}}"
stream = "LATER"
"#
        ))
    };

    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = match mailroom::start(config("exit"), env.client.clone(), shutdown.clone()).await {
        Ok(_) => panic!("start succeeded although handler late cannot start"),
        Err(err) => format!("{err:#}"),
    };
    assert!(err.contains("late: handler late: stream LATER"), "{err}");
    shutdown.cancel();

    let host = env.start(config("continue")).await;
    assert_eq!(host.running.failed_handlers().len(), 1);
    env.js
        .create_stream(stream::Config {
            name: "LATER".into(),
            subjects: vec!["later.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // A retry would have come after 1s (at most 1.2s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = host.running.metrics().get("late").unwrap().clone();
    assert_eq!(m.lifecycle.get(), mailroom::health::HandlerState::Failed);
    assert!(
        env.js
            .get_consumer_from_stream::<async_nats::jetstream::consumer::Config, _, _>(
                "late", "LATER"
            )
            .await
            .is_err(),
        "continue does not try again"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_real_histograms_and_trace_context_is_carried_without_an_exporter() {
    let env = Env::new().await;
    let config = env.config(&format!(
        r#"{JOBS}
[[stream]]
name = "OUT"
subjects = ["out.>"]

[[handler]]
name = "flaky"
module = "{{flaky}}"
stream = "JOBS"
publish = {{ allow = ["out.>"] }}
"#
    ));
    let host = env.start(config).await;
    let addr = host.running.admin_addr().unwrap();
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", parent);
    headers.insert("tracestate", "rojo=00f067aa0ba902b7");
    env.js
        .publish_with_headers("jobs.a", headers, "publish:out.a".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for _ in 0..4 {
        env.publish("jobs.b", "publish:out.b").await;
    }
    env.settled("JOBS", "flaky", Duration::from_secs(10)).await;

    let mut out = env.stream_messages("OUT").await;
    assert_eq!(out.len(), 5);
    // By input sequence: the traced input was stored first.
    out.sort_by_key(|m| header(m, "Nats-Msg-Id"));
    assert_eq!(header(&out[0], "Nats-Msg-Id"), "flaky:JOBS:1:0");
    let traced = header(&out[0], "traceparent");
    assert!(
        traced.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "same trace: {traced}"
    );
    assert!(
        !traced.contains("b7ad6b7169203331"),
        "a span id of the host's own: {traced}"
    );
    assert_eq!(header(&out[0], "tracestate"), "rojo=00f067aa0ba902b7");
    assert!(
        out[1].headers.get("traceparent").is_none(),
        "no context in, none out (no exporter)"
    );

    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for expected in [
        "# HELP mailroom_succeeded_total",
        "mailroom_succeeded_total{handler=\"flaky\"} 5",
        "mailroom_published_total{handler=\"flaky\"} 5",
        "# TYPE mailroom_latency_seconds histogram",
        "mailroom_latency_seconds_count{handler=\"flaky\"} 5",
        "mailroom_latency_seconds_bucket{handler=\"flaky\",le=\"+Inf\"} 5",
        "mailroom_backlog{handler=\"flaky\"} 0",
        "mailroom_dead_letter_failures_total{handler=\"flaky\"} 0",
    ] {
        assert!(text.contains(expected), "missing {expected:?}:\n{text}");
    }
    // Cumulative buckets never decrease.
    let counts: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("mailroom_latency_seconds_bucket{handler=\"flaky\""))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 20, "{text}");
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    host.stop().await;
}

/// An OTLP/HTTP receiver stand-in: records the spans of every export request.
async fn otlp_receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let store = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        store.lock().unwrap().extend(scope.spans);
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, spans)
}

struct HostProcess(Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_message_through_two_handlers_and_spans_reach_the_otlp_endpoint() {
    let env = Env::new().await;
    let (otlp, spans) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let flaky = wasm("flaky");
    let config = format!(
        r#"[host]
summary_interval = "300ms"

[[stream]]
name = "IN"
subjects = ["in.>"]

[[stream]]
name = "MID"
subjects = ["mid.>"]

[[stream]]
name = "OUT"
subjects = ["out.>"]

[[handler]]
name = "first"
module = "{flaky}"
stream = "IN"
publish = {{ allow = ["mid.>"] }}

[[handler]]
name = "second"
module = "{flaky}"
stream = "MID"
publish = {{ allow = ["out.>"] }}
"#,
        flaky = flaky.display()
    );
    let path = dir.path().join("chain.toml");
    std::fs::write(&path, config).unwrap();
    let log = dir.path().join("host.log");
    let _host = HostProcess(
        Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .env(
                "XDG_CACHE_HOME",
                target_dir().join("mailroom-test-cache-cli"),
            )
            .env("MAILROOM_LOG", "info")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .args(["run", "--config"])
            .arg(&path)
            .arg("--nats-url")
            .arg(env.server.url())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the host to start", Duration::from_secs(30), async || {
        read_log().matches("handler started").count() == 2
    })
    .await;

    // The first handler forwards the payload to mid.x, the second from there to out.x.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").as_str(),
    );
    headers.insert("Flaky-Command", "publish:mid.x");
    env.js
        .publish_with_headers("in.x", headers, "publish:out.x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for("the output", Duration::from_secs(20), async || {
        env.stream_count("OUT").await == 1
    })
    .await;
    let mid = &env.stream_messages("MID").await[0];
    let out = &env.stream_messages("OUT").await[0];
    let mid_parent = header(mid, "traceparent");
    let out_parent = header(out, "traceparent");
    assert!(
        mid_parent.starts_with(&format!("00-{trace_id}-")),
        "{mid_parent}"
    );
    assert!(
        out_parent.starts_with(&format!("00-{trace_id}-")),
        "{out_parent}"
    );

    let mut exported = Vec::new();
    wait_for(
        "both spans at the OTLP endpoint",
        Duration::from_secs(20),
        async || {
            exported = spans.lock().unwrap().clone();
            exported.iter().filter(|s| s.name == "message").count() >= 2
        },
    )
    .await;
    let span_of = |handler: &str| {
        exported
            .iter()
            .find(|s| s.name == "message" && attribute(s, "handler").as_deref() == Some(handler))
            .unwrap_or_else(|| panic!("no span of {handler}: {exported:#?}"))
            .clone()
    };
    let (first, second) = (span_of("first"), span_of("second"));
    for span in [&first, &second] {
        assert_eq!(hex(&span.trace_id), trace_id, "one trace");
    }
    assert_eq!(
        hex(&first.parent_span_id),
        "00f067aa0ba902b7",
        "the input's span"
    );
    assert_eq!(second.parent_span_id, first.span_id, "second follows first");
    assert_eq!(
        mid_parent,
        format!("00-{trace_id}-{}-01", hex(&first.span_id))
    );
    assert_eq!(
        out_parent,
        format!("00-{trace_id}-{}-01", hex(&second.span_id))
    );
    assert_eq!(attribute(&first, "subject").as_deref(), Some("in.x"));

    // The summary line, every 300ms here.
    wait_for("a summary line", Duration::from_secs(5), async || {
        read_log().lines().any(|l| {
            l.contains("summary of the last")
                && l.contains("handler=second")
                && l.contains("state=running")
                && l.contains("msgs_per_s=")
                && l.contains("backlog=0")
        })
    })
    .await;
    let log = read_log();
    assert!(
        !log.contains("\u{1b}["),
        "no colour when stderr is not a terminal:\n{log}"
    );
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef mailroom"),
        ("fish", "complete -c mailroom"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}");
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(text.contains("redrive"), "{shell} completes dlq redrive");
    }
    assert!(Path::new(env!("CARGO_BIN_EXE_mailroom")).exists());
}
