//! The execution engine against a real nats-server: per-subject order with parallelism,
//! in-place retries, blocked keys, missing keys, re-entrancy, autoscaling.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::{header, Env};

const STREAMS: &str = r#"
[[stream]]
name = "JOBS"
subjects = ["jobs.>"]

[[stream]]
name = "RECORDS"
subjects = ["records.>"]

[[stream]]
name = "DLQ"
subjects = ["dlq.>"]

[[bucket]]
name = "state"
"#;

fn config(env: &Env, handler: &str) -> mailroom::Config {
    env.config(&format!(
        r#"{STREAMS}
[[handler]]
name = "flaky"
module = "{{flaky}}"
stream = "JOBS"
dead_letter = "dlq.flaky"
publish = {{ allow = ["records.>", "jobs.>"] }}
kv = {{ allow = ["state"] }}
config = {{ output-subject = "records.all" }}
{handler}
"#
    ))
}

/// Parses the RECORDS stream into (subject, input sequence) in the order they were stored.
async fn records(env: &Env) -> Vec<(String, u64)> {
    env.stream_messages("RECORDS")
        .await
        .iter()
        .map(|m| {
            let text = std::str::from_utf8(&m.payload).unwrap();
            let mut parts = text.split(' ');
            let subject = parts.next().unwrap().to_owned();
            let seq = parts.next().unwrap().parse().unwrap();
            (subject, seq)
        })
        .collect()
}

fn assert_per_subject_order(records: &[(String, u64)], expected: usize) {
    assert_eq!(records.len(), expected, "one record per message");
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (subject, seq) in records {
        if let Some(prev) = last.insert(subject, *seq) {
            assert!(prev < *seq, "{subject}: {seq} completed after {prev}");
        }
    }
}

async fn run_ordered(
    payload: impl Fn(u64) -> &'static str,
) -> (Vec<(String, u64)>, mailroom::telemetry::MetricsSnapshot) {
    let env = Env::new().await;
    let cfg = config(
        &env,
        "max_workers = 16\nretry = { backoff = [\"20ms\"] }\nscale_cooldown = \"60s\"",
    );
    let host = env.start(cfg).await;
    const N: u64 = 20_000;
    env.publish_many((0..N).map(|i| (format!("jobs.s{}", (i * 7919) % 500), payload(i).into())))
        .await;
    env.settled("JOBS", "flaky", Duration::from_secs(240)).await;
    // Let the gauges refresh once more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = host.metrics("flaky");
    let recs = records(&env).await;
    host.stop().await;
    assert_per_subject_order(&recs, N as usize);
    (recs, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_messages_over_500_subjects_keep_per_subject_order_in_parallel() {
    let (_, m) = run_ordered(|_| "record").await;
    assert_eq!((m.succeeded, m.dead_lettered), (20_000, 0));
    assert!(m.busy_peak > 1, "no parallelism observed: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_when_some_messages_fail_then_succeed() {
    let (_, m) = run_ordered(|i| {
        if i % 10 == 3 {
            "record-fail-once"
        } else {
            "record"
        }
    })
    .await;
    assert_eq!((m.succeeded, m.dead_lettered), (20_000, 0));
    assert_eq!(
        m.retried, 2_000,
        "every tenth message failed once and was retried in place"
    );
    // All of them are on 50 of the 500 subjects: many fail at once, each then succeeds.
    assert_eq!(m.breaker_trips, 0, "failing once is not a broken handler");
    assert!(m.busy_peak > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_message_blocks_only_its_key() {
    let env = Env::new().await;
    let cfg = config(
        &env,
        "min_workers = 2\nmax_workers = 2\non_exhausted = \"block\"\nretry = { max_attempts = 2, backoff = [\"50ms\"] }",
    );
    let host = env.start(cfg).await;
    env.publish("jobs.a", "retry").await;
    env.publish("jobs.a", "record").await;
    for _ in 0..5 {
        env.publish("jobs.b", "record").await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = host.metrics("flaky");
        if m.succeeded == 5 && m.blocked_keys == 1 && m.retried >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recs = records(&env).await;
    assert!(
        recs.iter().all(|(s, _)| s == "jobs.b"),
        "jobs.a's second message overtook: {recs:?}"
    );
    assert_eq!(
        env.stream_count("DLQ").await,
        0,
        "blocked, not dead-lettered"
    );
    let status = host.running.metrics().render_status();
    assert!(status.contains("\"blocked_keys\":[\"jobs.a\"]"), "{status}");
    let info = env.consumer_info("JOBS", "flaky").await;
    assert_eq!(
        info.num_redelivered, 0,
        "progress acks keep the blocked key's messages"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ordering_header_follows_the_configured_path() {
    let env = Env::new().await;
    let cfg = config(&env, "ordering = \"header:Order-Key\"");
    let host = env.start(cfg).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Order-Key", "o-1");
    env.js
        .publish_with_headers("jobs.x", headers, "record".into())
        .await
        .unwrap()
        .await
        .unwrap();
    env.publish("jobs.y", "record").await;
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    let dlq = env.stream_messages("DLQ").await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], "Mailroom-Error-Kind"), "no-key");
    assert!(header(&dlq[0], "Mailroom-Error").contains("no Order-Key header"));
    assert_eq!(header(&dlq[0], "Mailroom-Subject"), "jobs.y");
    assert_eq!(records(&env).await, [("jobs.x".to_owned(), 1)]);
    host.stop().await;

    // Configured to fall back to the subject, the same message runs.
    let env = Env::new().await;
    let cfg = config(
        &env,
        "ordering = \"header:Order-Key\"\non_missing_key = \"subject\"",
    );
    let host = env.start(cfg).await;
    env.publish("jobs.y", "record").await;
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    assert_eq!(records(&env).await, [("jobs.y".to_owned(), 1)]);
    assert_eq!(env.stream_count("DLQ").await, 0);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_publishing_to_its_own_subject_does_not_deadlock() {
    let env = Env::new().await;
    let cfg = config(&env, "concurrency = 1");
    let host = env.start(cfg).await;
    env.publish("jobs.chain", "chain:20").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while host.metrics("flaky").succeeded < 21 {
        assert!(Instant::now() < deadline, "{:?}", host.metrics("flaky"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.settled("JOBS", "flaky", Duration::from_secs(10)).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_waiting_for_another_keys_kv_write_does_not_deadlock() {
    let env = Env::new().await;
    // The pool starts with one worker, which the waiting handler occupies: only growing the
    // pool lets the writer run.
    let cfg = config(
        &env,
        "min_workers = 1\nmax_workers = 4\nlimits = { timeout = \"30s\" }",
    );
    let host = env.start(cfg).await;
    env.publish("jobs.waiter", "wait-kv:state/ready").await;
    env.publish("jobs.writer", "kv-set:state/ready").await;
    env.settled("JOBS", "flaky", Duration::from_secs(25)).await;
    let m = host.metrics("flaky");
    assert_eq!((m.succeeded, m.retried, m.timeouts), (2, 0, 0));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_grows_with_a_backlog_drains_and_shrinks_after_the_cooldown() {
    let env = Env::new().await;
    let cfg = config(
        &env,
        "ordering = \"none\"\nmin_workers = 1\nmax_workers = 16\nscale_cooldown = \"1s\"",
    );
    let host = env.start(cfg).await;
    const N: u64 = 50_000;
    let start = Instant::now();
    env.publish_many((0..N).map(|i| (format!("jobs.{}", i % 100), "sleep:8".into())))
        .await;
    // How many messages had succeeded when the pool first had 16 workers.
    let mut reached_max = None;
    loop {
        let m = host.metrics("flaky");
        if m.workers == 16 && reached_max.is_none() {
            reached_max = Some(m.succeeded);
        }
        if m.succeeded == N {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "{m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done_at_max = reached_max.expect("the pool reached max_workers");
    // 1 → 4 → 16 (the backlog is deep), each size measured for a tick (the first for two):
    // a few hundred messages. A growth wrongly judged useless would hold 4 workers (~470/s)
    // for the 10 s plateau, thousands.
    assert!(
        done_at_max <= N / 20,
        "the pool reached max_workers only after {done_at_max} of {N} messages"
    );
    let drained = Instant::now();
    loop {
        let m = host.metrics("flaky");
        if m.workers == 1 {
            break;
        }
        assert!(
            drained.elapsed() < Duration::from_secs(10),
            "did not shrink: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = host.metrics("flaky");
    assert!(m.scale_ups >= 2 && m.scale_downs >= 1, "{m:?}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_failing_handler_does_not_grow_the_pool() {
    let env = Env::new().await;
    let cfg = config(
        &env,
        "ordering = \"none\"\nmin_workers = 1\nmax_workers = 16\nretry = { max_attempts = 1000, backoff = [\"20ms\"] }\nbreaker = { trip_after = 0 }",
    );
    let host = env.start(cfg).await;
    env.publish_many((0..2_000u64).map(|i| (format!("jobs.{i}"), "retry".into())))
        .await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let m = host.metrics("flaky");
        assert!(
            m.workers <= 1 && m.scale_ups == 0,
            "grew into a failing handler: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(host.metrics("flaky").retried > 100, "it really was failing");
    host.stop().await;
}
