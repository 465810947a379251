//! The host in-process against a real nats-server: acks after processing, publishes confirmed
//! and deduplicated, retries with backoff, dead letters, failures contained.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::StreamExt;

use crate::support::{header, Env};

const STREAMS: &str = r#"
[[stream]]
name = "ORDERS"
subjects = ["orders.>"]

[[stream]]
name = "ENRICHED"
subjects = ["enriched.>"]

[[stream]]
name = "JOBS"
subjects = ["jobs.>"]

[[stream]]
name = "DLQ"
subjects = ["dlq.>"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrich_acks_every_input_once_after_its_output_is_stored() {
    let env = Env::new().await;
    let config = env.config(&format!(
        r#"{STREAMS}
[[handler]]
name = "enrich"
module = "{{enrich}}"
stream = "ORDERS"
concurrency = 16
publish = {{ allow = ["enriched.>"] }}
config = {{ output-subject = "enriched.orders" }}
"#
    ));
    let host = env.start(config).await;
    for i in 0..1000u64 {
        let body = serde_json::json!({"id": i, "amount_cents": i * 100});
        env.js
            .send_publish(
                format!("orders.{}", i % 20),
                jetstream::message::PublishMessage::build()
                    .payload(serde_json::to_vec(&body).unwrap().into())
                    .message_id(format!("order-{i}")),
            )
            .await
            .unwrap();
    }
    let info = env
        .settled("ORDERS", "enrich", Duration::from_secs(60))
        .await;
    assert_eq!(info.num_pending, 0);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.delivered.stream_sequence, 1000);
    assert_eq!(info.ack_floor.stream_sequence, 1000, "every input acked");
    assert_eq!(
        env.stream_count("ENRICHED").await,
        1000,
        "one output per input"
    );
    let m = host.metrics("enrich");
    assert_eq!((m.received, m.succeeded, m.published), (1000, 1000, 1000));
    assert_eq!((m.retried, m.dead_lettered, m.ack_failures), (0, 0, 0));

    let outputs = env.stream_messages("ENRICHED").await;
    let mut sources: Vec<u64> = outputs
        .iter()
        .map(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
            assert_eq!(v["enriched_by"], "enrich");
            v["source"]["sequence"].as_u64().unwrap()
        })
        .collect();
    sources.sort_unstable();
    assert_eq!(
        sources,
        (1..=1000).collect::<Vec<_>>(),
        "each input's output exactly once"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_kv_values_equal_per_subject_counts() {
    let env = Env::new().await;
    let config = env.config(&format!(
        r#"{STREAMS}
[[bucket]]
name = "counts"

[[handler]]
name = "counter"
module = "{{counter}}"
stream = "ORDERS"
concurrency = 1
kv = {{ allow = ["counts"] }}
"#
    ));
    let host = env.start(config).await;
    let mut expected: HashMap<String, u64> = HashMap::new();
    for i in 0..300u64 {
        // Uneven spread: subject k gets roughly k times as many messages.
        let subject = format!("orders.s{}", (i * i) % 7);
        *expected.entry(subject.clone()).or_default() += 1;
        env.publish(&subject, "{}").await;
    }
    env.settled("ORDERS", "counter", Duration::from_secs(60))
        .await;
    let kv = env.js.get_key_value("counts").await.unwrap();
    for (subject, count) in &expected {
        let value = kv.get(subject).await.unwrap().expect("a count per subject");
        assert_eq!(
            std::str::from_utf8(&value).unwrap(),
            count.to_string(),
            "count of {subject}"
        );
    }
    let mut keys = kv.keys().await.unwrap();
    let mut seen = 0;
    while let Some(key) = keys.next().await {
        key.unwrap();
        seen += 1;
    }
    assert_eq!(seen, expected.len(), "no other keys");
    host.stop().await;
}

fn flaky_config(env: &Env, retry: &str, limits: &str) -> mailroom::Config {
    env.config(&format!(
        r#"{STREAMS}
[[handler]]
name = "flaky"
module = "{{flaky}}"
stream = "JOBS"
concurrency = 4
dead_letter = "dlq.flaky"
retry = {retry}
limits = {limits}
publish = {{ allow = ["enriched.>"] }}
"#
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_is_redelivered_after_the_backoff_then_succeeds() {
    let env = Env::new().await;
    let config = flaky_config(
        &env,
        r#"{ max_attempts = 5, backoff = ["400ms", "800ms"], jitter = 0.0 }"#,
        "{}",
    );
    let host = env.start(config).await;
    let start = Instant::now();
    env.publish("jobs.a", "retry-until:3").await;
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    let elapsed = start.elapsed();
    let m = host.metrics("flaky");
    assert_eq!(
        (
            m.received,
            m.redelivered,
            m.retried,
            m.succeeded,
            m.dead_lettered
        ),
        (3, 2, 2, 1, 0)
    );
    // Two naks with the configured delays: 400ms, then 800ms. An immediate nak would take
    // a few milliseconds.
    assert!(
        elapsed >= Duration::from_millis(1200),
        "took only {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handlers_retry_delay_wins_over_the_backoff() {
    let env = Env::new().await;
    let config = flaky_config(&env, r#"{ backoff = ["30s"], jitter = 0.0 }"#, "{}");
    let host = env.start(config).await;
    let start = Instant::now();
    env.publish("jobs.a", "retry-after:600").await;
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(600),
        "took only {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "the 30s backoff was used: {elapsed:?}"
    );
    let m = host.metrics("flaky");
    assert_eq!((m.received, m.retried, m.succeeded), (2, 1, 1));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_writes_one_dead_letter_record_and_terminates_the_input() {
    let env = Env::new().await;
    let config = flaky_config(&env, "{}", "{}");
    // The server announces every terminated message with its reason.
    let mut terminated = env
        .client
        .subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.JOBS.flaky")
        .await
        .unwrap();
    let host = env.start(config).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Trace-Id", "t-1");
    let seq = env
        .js
        .publish_with_headers("jobs.bad", headers, "reject".into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;

    let records = env.stream_messages("DLQ").await;
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.subject.as_str(), "dlq.flaky");
    assert_eq!(&r.payload[..], b"reject", "original payload");
    assert_eq!(header(r, "Trace-Id"), "t-1", "original headers kept");
    assert_eq!(header(r, "Mailroom-Handler"), "flaky");
    assert_eq!(header(r, "Mailroom-Error-Kind"), "reject");
    assert_eq!(header(r, "Mailroom-Error"), "flaky: rejected on purpose");
    assert_eq!(header(r, "Mailroom-Attempts"), "1");
    assert_eq!(header(r, "Mailroom-Subject"), "jobs.bad");
    assert_eq!(header(r, "Mailroom-Stream"), "JOBS");
    assert_eq!(header(r, "Mailroom-Sequence"), seq.to_string());

    let advisory = tokio::time::timeout(Duration::from_secs(5), terminated.next())
        .await
        .expect("a MSG_TERMINATED advisory")
        .unwrap();
    let advisory: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap();
    assert_eq!(advisory["stream_seq"], seq);
    assert_eq!(advisory["reason"], "flaky: rejected on purpose");
    let m = host.metrics("flaky");
    assert_eq!((m.received, m.dead_lettered, m.succeeded), (1, 1, 0));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_timeout_and_memory_bomb_are_retried_then_dead_lettered_and_the_host_survives() {
    let env = Env::new().await;
    let config = flaky_config(
        &env,
        r#"{ max_attempts = 2, backoff = ["100ms"] }"#,
        r#"{ timeout = "500ms", memory = "16MiB" }"#,
    );
    let host = env.start(config).await;
    for payload in ["trap", "loop", "oom"] {
        env.publish(&format!("jobs.{payload}"), payload).await;
    }
    env.settled("JOBS", "flaky", Duration::from_secs(30)).await;
    let records = env.stream_messages("DLQ").await;
    let mut kinds: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            (
                header(r, "Mailroom-Subject"),
                header(r, "Mailroom-Error-Kind"),
                header(r, "Mailroom-Attempts"),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("jobs.loop".into(), "timeout".into(), "2".into()),
            ("jobs.oom".into(), "out-of-memory".into(), "2".into()),
            ("jobs.trap".into(), "trap".into(), "2".into()),
        ]
    );
    let trap = records
        .iter()
        .find(|r| header(r, "Mailroom-Subject") == "jobs.trap")
        .unwrap();
    assert!(
        header(trap, "Mailroom-Error").contains("flaky: trap requested"),
        "the panic message reaches the record: {}",
        header(trap, "Mailroom-Error")
    );
    let m = host.metrics("flaky");
    assert_eq!((m.received, m.retried, m.dead_lettered), (6, 3, 3));
    assert_eq!((m.traps, m.timeouts), (4, 2));

    // The host is still fine: the next message goes through.
    env.publish("jobs.ok", "ok").await;
    env.settled("JOBS", "flaky", Duration::from_secs(10)).await;
    assert_eq!(host.metrics("flaky").succeeded, 1);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_after_publishing_does_not_store_the_output_twice() {
    let env = Env::new().await;
    let config = flaky_config(&env, r#"{ backoff = ["50ms"] }"#, "{}");
    let host = env.start(config).await;
    env.publish("jobs.dup", "publish-then-retry:enriched.dup")
        .await;
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    let m = host.metrics("flaky");
    assert_eq!(
        (m.received, m.retried, m.succeeded),
        (2, 1, 1),
        "it really ran twice"
    );
    let outputs = env.stream_messages("ENRICHED").await;
    assert_eq!(outputs.len(), 1, "the second publish was deduplicated");
    assert_eq!(header(&outputs[0], "Nats-Msg-Id"), "flaky:JOBS:1:0");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_stored_before_a_lost_ack_is_not_stored_again() {
    // An earlier attempt ran, published its output, and its ack was lost (its host died
    // right after publishing). That earlier output is stored here by hand with the id the
    // earlier attempt used (handler:stream:sequence:index, as documented); then the host gets
    // the message and runs it for real.
    let env = Env::new().await;
    let config = env.config(&format!(
        r#"{STREAMS}
[[handler]]
name = "enrich"
module = "{{enrich}}"
stream = "ORDERS"
publish = {{ allow = ["enriched.>"] }}
config = {{ output-subject = "enriched.orders" }}
"#
    ));
    env.js
        .get_or_create_stream(stream::Config {
            name: "ENRICHED".into(),
            subjects: vec!["enriched.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    env.js
        .get_or_create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let seq = env.publish("orders.1", r#"{"id":1}"#).await;
    env.js
        .send_publish(
            "enriched.orders",
            jetstream::message::PublishMessage::build()
                .payload("earlier attempt".into())
                .message_id(format!("enrich:ORDERS:{seq}:0")),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let host = env.start(config).await;
    env.settled("ORDERS", "enrich", Duration::from_secs(20))
        .await;
    assert_eq!(
        host.metrics("enrich").succeeded,
        1,
        "the handler ran and succeeded"
    );
    let outputs = env.stream_messages("ENRICHED").await;
    assert_eq!(
        outputs.len(),
        1,
        "the re-run's output was dropped as a duplicate"
    );
    assert_eq!(&outputs[0].payload[..], b"earlier attempt");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_module_is_refused_and_the_other_handlers_still_start() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.wasm");
    std::fs::write(&bogus, b"definitely not wasm").unwrap();
    let config = env.config(&format!(
        r#"{STREAMS}
[[handler]]
name = "broken"
module = "{}"
stream = "JOBS"

[[handler]]
name = "noop"
module = "{{noop}}"
stream = "JOBS"
"#,
        bogus.display()
    ));
    let host = env.start(config).await;
    let failed = host.running.failed_handlers().to_vec();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].starts_with("broken:"), "{failed:?}");
    assert!(
        failed[0].contains("bogus.wasm is not WebAssembly"),
        "{failed:?}"
    );
    env.publish("jobs.x", "anything").await;
    env.settled("JOBS", "noop", Duration::from_secs(10)).await;
    assert_eq!(host.metrics("noop").succeeded, 1);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_ack_wait_is_kept_alive_and_runs_once() {
    let env = Env::new().await;
    let mut config = flaky_config(&env, "{}", r#"{ timeout = "20s" }"#);
    config.handlers[0].ack_wait = Duration::from_secs(1);
    let host = env.start(config).await;
    // 3.5 times AckWait.
    env.publish("jobs.slow", "sleep:3500").await;
    let info = env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    assert_eq!(info.num_redelivered, 0);
    let m = host.metrics("flaky");
    assert_eq!(
        (m.received, m.redelivered, m.succeeded),
        (1, 0, 1),
        "exactly one execution"
    );
    assert!(
        m.progress_acks >= 6,
        "a progress ack every half AckWait: {}",
        m.progress_acks
    );
    host.stop().await;
}
