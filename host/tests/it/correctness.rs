//! Nothing lost, nothing looping, nothing silently wrong: the outputs of retried attempts,
//! hand-backs at a drain, hoarding, signals, dead letters too large to store, the circuit
//! breaker, and KV calls while NATS is down.

use std::time::{Duration, Instant};

use crate::support::{header, wait_until, wasm, Env, HostProcess};

const STREAMS: &str = r#"
[host]
drain_timeout = "10s"

[[stream]]
name = "JOBS"
subjects = ["jobs.>"]

[[stream]]
name = "OUT"
subjects = ["audit.>", "enriched.>", "records.>"]

[[stream]]
name = "DLQ"
subjects = ["dlq.>"]

[[bucket]]
name = "execs"

[[bucket]]
name = "flags"
"#;

fn handler(extra: &str) -> String {
    format!(
        r#"{STREAMS}
[[handler]]
name = "flaky"
module = "{}"
stream = "JOBS"
dead_letter = "dlq.flaky"
publish = {{ allow = ["audit.>", "enriched.>", "records.>"] }}
kv = {{ allow = ["execs", "flags"] }}
config = {{ output-subject = "records.all" }}
{extra}
"#,
        wasm("flaky").display()
    )
}

fn text(m: &async_nats::jetstream::message::StreamMessage) -> String {
    String::from_utf8(m.payload.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_successful_attempts_outputs_are_stored() {
    let env = Env::new().await;
    let host = env
        .start(env.config(&handler(
            "retry = { max_attempts = 3, backoff = [\"50ms\"] }",
        )))
        .await;
    // Attempt 1 publishes "A" to audit.orders and fails; attempt 2 publishes "B" to
    // enriched.orders and succeeds. Both publishes have the same index, hence the same id.
    env.publish("jobs.1", "switch:audit.orders,enriched.orders")
        .await;
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    let out = env.stream_messages("OUT").await;
    assert_eq!(
        out.iter()
            .map(|m| (m.subject.to_string(), text(m)))
            .collect::<Vec<_>>(),
        [("enriched.orders".to_owned(), "B".to_owned())],
        "the failed attempt's output was never sent; the successful one's was stored"
    );
    let m = host.metrics("flaky");
    assert_eq!((m.succeeded, m.retried, m.duplicate_publishes), (1, 1, 0));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_stream_had_already_stored_is_counted_as_a_duplicate() {
    let env = Env::new().await;
    let host = env.start(env.config(&handler(""))).await;
    env.publish("jobs.1", "publish-id:order-7").await;
    env.publish("jobs.2", "publish-id:order-7").await;
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    assert_eq!(env.stream_count("OUT").await, 1);
    let m = host.metrics("flaky");
    assert_eq!((m.succeeded, m.duplicate_publishes), (2, 1));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_hands_messages_back_without_using_their_attempts() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    // One attempt only: a hand-back counted as an attempt would dead-letter the message.
    let cfg = handler(
        "ordering = \"none\"\nconcurrency = 2\nretry = { max_attempts = 1 }\nprefetch = 200\nmax_buffered = 200",
    );
    let mut a = HostProcess::spawn(dir.path(), "a", &cfg, &url);
    const TOTAL: u64 = 300;
    env.publish_many((0..TOTAL).map(|i| (format!("jobs.{i}"), "sleep:20".into())))
        .await;
    // Two slow workers and a large prefetch: it holds many messages when it is stopped.
    wait_until("held messages", Duration::from_secs(30), || {
        a.metric("in_flight") >= 50.0
    })
    .await;
    a.signal("-TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).success());
    let b = HostProcess::spawn(dir.path(), "b", &cfg, &url);
    let info = env.settled("JOBS", "flaky", Duration::from_secs(60)).await;
    assert_eq!(
        info.ack_floor.stream_sequence, TOTAL,
        "every message settled"
    );
    assert_eq!(
        env.stream_count("DLQ").await,
        0,
        "no hand-back used up the one attempt (none was dead-lettered as exhausted)"
    );
    assert!(
        a.log()
            .contains("handed back messages that had not started"),
        "{}",
        a.log()
    );
    b.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unordered_host_holds_only_a_few_messages_per_worker() {
    let env = Env::new().await;
    let host = env
        .start(env.config(&handler("ordering = \"none\"\nconcurrency = 4")))
        .await;
    env.publish_many((0..2_000u64).map(|i| (format!("jobs.{i}"), "sleep:2".into())))
        .await;
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < Duration::from_secs(2) {
        peak = peak.max(host.metrics("flaky").in_flight);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(peak > 4, "it prefetches some: {peak}");
    assert!(
        peak <= 40,
        "4 workers hold at most 8 each (32) plus what a batch brings: {peak}"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_drains_a_second_signal_says_how_long_and_a_third_exits_at_once() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let cfg = handler("ordering = \"none\"\nconcurrency = 2");
    let mut a = HostProcess::spawn(dir.path(), "a", &cfg, &url);
    env.publish_many((0..20u64).map(|i| (format!("jobs.{i}"), "sleep:200".into())))
        .await;
    wait_until("busy", Duration::from_secs(20), || {
        a.metric("busy_workers") >= 1.0
    })
    .await;
    a.signal("-HUP");
    assert!(
        a.wait_exit(Duration::from_secs(30)).success(),
        "SIGHUP drains and exits 0"
    );
    assert!(a.log().contains("SIGHUP received; draining"), "{}", a.log());
    // Now with messages that take long: a second SIGTERM reports, a third forces the exit.
    let mut b = HostProcess::spawn(dir.path(), "b", &cfg, &url);
    // What a handed back is done first, so that b's busy workers are the long ones.
    env.settled("JOBS", "flaky", Duration::from_secs(30)).await;
    env.publish_many((0..4u64).map(|i| (format!("jobs.long{i}"), "sleep:8000".into())))
        .await;
    wait_until("busy", Duration::from_secs(20), || {
        b.metric("busy_workers") >= 2.0
    })
    .await;
    b.signal("-TERM");
    wait_until("draining", Duration::from_secs(10), || {
        b.log().contains("draining")
    })
    .await;
    b.signal("-TERM");
    wait_until(
        "the second signal is answered",
        Duration::from_secs(10),
        || b.log().contains("running messages have up to"),
    )
    .await;
    b.signal("-TERM");
    let status = b.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(130),
        "a third signal exits at once: {status}\n{}",
        b.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_the_server_is_stored_without_its_payload() {
    let env = Env::new().await;
    let host = env.start(env.config(&handler(""))).await;
    let max = env.client.server_info().max_payload;
    let mut h = async_nats::HeaderMap::new();
    h.insert("Flaky-Command", "reject");
    // Fits as a message, but not with the dead-letter headers added.
    let payload = vec![b'p'; max - 200];
    env.js
        .publish_with_headers("jobs.big", h, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    let dlq = env.stream_messages("DLQ").await;
    assert_eq!(dlq.len(), 1, "dead-lettered once, not retried forever");
    assert!(dlq[0].payload.is_empty());
    assert_eq!(
        header(&dlq[0], "Mailroom-Payload-Omitted"),
        (max - 200).to_string()
    );
    assert_eq!(header(&dlq[0], "Mailroom-Error-Kind"), "reject");
    let m = host.metrics("flaky");
    assert_eq!((m.dead_lettered, m.dead_letter_failures), (1, 1));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_every_message_trips_the_breaker_and_resumes_after_a_success() {
    let env = Env::new().await;
    let host = env
        .start(env.config(&handler(
            "ordering = \"none\"\nconcurrency = 4\nretry = { max_attempts = 3, backoff = [\"100ms\"] }\nbreaker = { trip_after = 10, first_probe = \"300ms\", max_probe = \"1s\" }",
        )))
        .await;
    const TOTAL: u64 = 200;
    env.publish_many((0..TOTAL).map(|i| (format!("jobs.{i}"), "require-kv:flags/go".into())))
        .await;
    wait_until("the breaker opens", Duration::from_secs(20), || {
        host.metrics("flaky").breaker_open == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = host.metrics("flaky");
    assert_eq!(m.breaker_trips, 1);
    assert!(
        m.dead_lettered < 20,
        "the breaker stopped the dead letters: {} of {TOTAL} dead-lettered",
        m.dead_lettered
    );
    // The dependency comes back: the next probe succeeds and everything left runs.
    let kv = env.js.get_key_value("flags").await.unwrap();
    kv.put("go", "1".into()).await.unwrap();
    env.settled("JOBS", "flaky", Duration::from_secs(30)).await;
    let m = host.metrics("flaky");
    assert_eq!(m.breaker_open, 0, "closed again");
    assert_eq!(m.succeeded + m.dead_lettered, TOTAL);
    assert!(m.succeeded >= TOTAL - 20, "{m:?}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_calls_fail_fast_while_nats_is_down() {
    let mut env = Env::new().await;
    let host = env
        .start(env.config(&handler(
            "ordering = \"none\"\nconcurrency = 1\nack_wait = \"2s\"\nlimits = { timeout = \"20s\" }\nretry = { backoff = [\"100ms\"] }",
        )))
        .await;
    env.publish("jobs.1", "sleep-kv:1500").await;
    let start = Instant::now();
    while host.metrics("flaky").busy < 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    env.server.kill();
    let down = Instant::now();
    while host.metrics("flaky").retried < 1 {
        assert!(
            down.elapsed() < Duration::from_secs(8),
            "the KV call did not fail fast: {:?}",
            host.metrics("flaky")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        host.metrics("flaky").timeouts,
        0,
        "a retry, not a handler timeout"
    );
    env.server.restart().unwrap();
    let kv = env.js.get_key_value("execs").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while kv.get("late").await.ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "the message never succeeded after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    host.stop().await;
}
