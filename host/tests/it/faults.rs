//! Faults real fleets see, against real processes: hosts killed with SIGKILL and restarted,
//! several hosts sharing a consumer, nats-server restarted under load, a poison message, traps
//! under load with the host's memory measured, and unusual messages from the wire.

use std::time::Duration;

use crate::support::{header, wait_until, wasm, Env, HostProcess};

const STREAMS: &str = r#"
[[stream]]
name = "JOBS"
subjects = ["jobs.>"]

[[stream]]
name = "RECORDS"
subjects = ["records.>"]

[[stream]]
name = "EXECS"
subjects = ["execs.>"]

[[stream]]
name = "DLQ"
subjects = ["dlq.>"]

[[bucket]]
name = "execs"
"#;

fn handler(extra: &str) -> String {
    format!(
        r#"
[[handler]]
name = "flaky"
module = "{}"
stream = "JOBS"
dead_letter = "dlq.flaky"
publish = {{ allow = ["records.>", "execs.>"] }}
kv = {{ allow = ["execs"] }}
config = {{ output-subject = "records.all" }}
{extra}
"#,
        wasm("flaky").display()
    )
}

/// Every input acked exactly once, one output each, and the executions beyond one per
/// message bounded by what hosts could hold when they were killed.
async fn assert_all_done_once(env: &Env, total: u64, max_extra: u64) -> u64 {
    let info = env.settled("JOBS", "flaky", Duration::from_secs(120)).await;
    assert_eq!(info.ack_floor.stream_sequence, total, "every input acked");
    assert_eq!(env.stream_count("DLQ").await, 0);
    assert_eq!(
        env.stream_count("RECORDS").await,
        total,
        "one output per input, no duplicates"
    );
    let execs = env.stream_count("EXECS").await;
    let extra = execs - total;
    println!("{total} messages, {execs} executions ({extra} re-runs after kills)");
    assert!(
        extra <= max_extra,
        "{extra} re-runs, more than the {max_extra} that could be in flight"
    );
    extra
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_load_loses_nothing_and_duplicates_no_output() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    // Unordered, 48 workers: the host holds up to 96 messages (two per worker).
    let config = format!(
        "{STREAMS}{}",
        handler("ordering = \"none\"\nconcurrency = 48\nack_wait = \"2s\"")
    );
    let mut host = HostProcess::spawn(dir.path(), "a", &config, &env.server.url());
    const TOTAL: u64 = 10_000;
    env.publish_many((0..TOTAL).map(|i| (format!("jobs.{}", i % 100), "record-exec:5".into())))
        .await;
    let mut in_flight = 0.0;
    wait_until("load on the host", Duration::from_secs(60), || {
        in_flight = host.metric("in_flight");
        host.metric("succeeded_total") >= 2000.0 && in_flight >= 50.0
    })
    .await;
    host.kill9();
    println!("killed with {in_flight} messages in flight");
    let restarted = HostProcess::spawn(dir.path(), "a2", &config, &env.server.url());
    assert_all_done_once(&env, TOTAL, 96).await;
    restarted.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_share_the_load_and_survive_one_being_killed_and_restarted() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{STREAMS}{}",
        handler("ordering = \"none\"\nconcurrency = 16\nack_wait = \"2s\"")
    );
    let url = env.server.url();
    let mut a = HostProcess::spawn(dir.path(), "a", &config, &url);
    let b = HostProcess::spawn(dir.path(), "b", &config, &url);
    let c = HostProcess::spawn(dir.path(), "c", &config, &url);
    const TOTAL: u64 = 10_000;
    env.publish_many((0..TOTAL).map(|i| (format!("jobs.{}", i % 100), "record-exec:5".into())))
        .await;
    wait_until("all three hosts working", Duration::from_secs(60), || {
        [&a, &b, &c]
            .iter()
            .all(|h| h.metric("succeeded_total") >= 300.0)
            && a.metric("in_flight") >= 16.0
    })
    .await;
    a.kill9();
    let (b0, c0) = (b.metric("succeeded_total"), c.metric("succeeded_total"));
    wait_until("the others to keep going", Duration::from_secs(30), || {
        b.metric("succeeded_total") >= b0 + 200.0 && c.metric("succeeded_total") >= c0 + 200.0
    })
    .await;
    let a2 = HostProcess::spawn(dir.path(), "a2", &config, &url);
    // Host a held at most 32 (two per worker).
    assert_all_done_once(&env, TOTAL, 32).await;
    let shares: Vec<f64> = [&a2, &b, &c]
        .iter()
        .map(|h| h.metric("succeeded_total"))
        .collect();
    println!("after the restart: a2/b/c acked {shares:?}");
    for h in [a2, b, c] {
        h.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_under_load_is_survived_without_loss() {
    let mut env = Env::new().await;
    let config = env.config(&format!(
        "{STREAMS}{}",
        handler("ordering = \"none\"\nconcurrency = 16\nack_wait = \"3s\"")
    ));
    let host = env.start(config).await;
    const TOTAL: u64 = 5_000;
    env.publish_many((0..TOTAL).map(|i| (format!("jobs.{}", i % 50), "record-exec:2".into())))
        .await;
    wait_until("some progress", Duration::from_secs(60), || {
        host.metrics("flaky").succeeded >= 1000
    })
    .await;
    let before = host.metrics("flaky").succeeded;
    env.server
        .restart()
        .expect("nats-server restarts on the same store");
    println!("restarted nats-server after {before} messages");
    // Acks lost with the old connection mean redeliveries, never losses.
    assert_all_done_once(&env, TOTAL, 200).await;
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_tried_max_attempts_times_with_backoff_then_dead_lettered() {
    let env = Env::new().await;
    let config = env.config(&format!(
        "{STREAMS}{}",
        handler(
            "ordering = \"none\"\nconcurrency = 8\nretry = { max_attempts = 4, backoff = [\"1500ms\"], jitter = 0.0 }"
        )
    ));
    let host = env.start(config).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Trace-Id", "poison-1");
    let seq = env
        .js
        .publish_with_headers("jobs.poison", headers, "poison".into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    const OTHERS: u64 = 2_000;
    env.publish_many((0..OTHERS).map(|i| (format!("jobs.other{}", i % 20), "record".into())))
        .await;
    env.settled("JOBS", "flaky", Duration::from_secs(60)).await;

    // Each attempt wrote an execution record to KV (publishes of failed attempts are
    // discarded, KV writes are not).
    let execs = env.stream_messages("KV_execs").await;
    assert_eq!(execs.len(), 4, "delivered exactly max_attempts times");
    for pair in execs.windows(2) {
        let gap = pair[1].time - pair[0].time;
        assert!(
            gap >= time::Duration::milliseconds(1500),
            "attempts only {gap} apart"
        );
    }
    let dlq = env.stream_messages("DLQ").await;
    assert_eq!(dlq.len(), 1);
    let record = &dlq[0];
    assert_eq!(&record.payload[..], b"poison");
    assert_eq!(header(record, "Trace-Id"), "poison-1");
    assert_eq!(header(record, "Mailroom-Attempts"), "4");
    assert_eq!(header(record, "Mailroom-Error-Kind"), "retry");
    assert!(header(record, "Mailroom-Error").contains("flaky: poison attempt 4"));
    assert_eq!(header(record, "Mailroom-Subject"), "jobs.poison");
    assert_eq!(header(record, "Mailroom-Sequence"), seq.to_string());
    // The other subjects were not held up: all of them finished before the poison's last try
    // (4.5 s after its first: room for a loaded machine).
    let records = env.stream_messages("RECORDS").await;
    assert_eq!(records.len() as u64, OTHERS);
    let last_other = records.iter().map(|r| r.time).max().unwrap();
    assert!(
        last_other < execs[3].time,
        "other subjects waited for the poison message"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_traps_under_load_all_end_processed_and_memory_stays_flat() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{STREAMS}{}",
        handler("ordering = \"none\"\nconcurrency = 8\nretry = { backoff = [\"10ms\"] }")
    );
    let host = HostProcess::spawn(dir.path(), "traps", &config, &env.server.url());
    const TOTAL: u64 = 20_000;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let payloads: Vec<&str> = (0..TOTAL)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if rng.is_multiple_of(10) {
                "trap-once"
            } else {
                "ok"
            }
        })
        .collect();
    let traps = payloads.iter().filter(|p| **p == "trap-once").count() as f64;
    env.publish_many(
        payloads
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("jobs.{}", i % 100), (*p).into())),
    )
    .await;
    // Half the run warms up: the instance pool's memory slots are touched as they are first
    // used (RSS rises to their sum and stays there). Alone this run takes seconds; next to
    // the suite's compile-heavy tests on 2 cores it once took minutes, hence the long limits.
    wait_until("warm-up", Duration::from_secs(300), || {
        host.metric("succeeded_total") >= TOTAL as f64 / 2.0
    })
    .await;
    let start_rss = host.rss_kib();
    wait_until("all messages", Duration::from_secs(300), || {
        host.metric("succeeded_total") >= TOTAL as f64
    })
    .await;
    let end_rss = host.rss_kib();
    let m = host.try_metrics().unwrap();
    println!(
        "{} instantiations ({} traps); RSS {start_rss} KiB after {} messages, {end_rss} KiB after {TOTAL}",
        m["received_total"],
        m["traps_total"],
        TOTAL / 2
    );
    assert_eq!(
        m["traps_total"], traps,
        "every trap-once message trapped exactly once"
    );
    assert_eq!(m["dead_lettered_total"], 0.0);
    assert!(
        end_rss <= start_rss + start_rss / 10 + 4096,
        "memory grew from {start_rss} KiB to {end_rss} KiB"
    );
    host.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_messages_from_the_wire_are_handled() {
    let env = Env::new().await;
    let config = env.config(&format!("{STREAMS}{}", handler("")));
    let host = env.start(config).await;
    let max = env.client.server_info().max_payload;
    let command = |extra: &[(&str, &str)]| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Flaky-Command", "echo-meta");
        for (name, value) in extra {
            h.append(*name, *value);
        }
        h
    };
    let mut many = vec![];
    for i in 0..100 {
        many.push(("X-Many", format!("v{i}")));
    }
    for i in 0..20 {
        many.push(("X-Other", format!("o{i}")));
    }
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let binary: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let cases: Vec<(String, async_nats::HeaderMap, Vec<u8>, String)> = vec![
        ("jobs.empty".into(), command(&[]), vec![], "0 1 0 2".into()),
        (
            "jobs.max".into(),
            command(&[]),
            vec![b'm'; max - 1024],
            format!("{} 1 0 2", max - 1024),
        ),
        (
            "jobs.binary".into(),
            command(&[]),
            binary.clone(),
            "65536 1 0 2".into(),
        ),
        (
            "jobs.headers".into(),
            command(&many),
            b"x".to_vec(),
            "1 3 100 2".into(),
        ),
        (
            "jobs.a.b.c.d.e.f.g.h.i.j.k.l.m.n.o".into(),
            command(&[]),
            b"x".to_vec(),
            "1 1 0 16".into(),
        ),
    ];
    for (subject, headers, payload, _) in &cases {
        env.js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    let outputs: Vec<String> = env
        .stream_messages("RECORDS")
        .await
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    let mut expected: Vec<String> = cases.iter().map(|c| c.3.clone()).collect();
    let mut got = outputs.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    let m = host.metrics("flaky");
    assert_eq!((m.succeeded, m.retried, m.dead_lettered), (5, 0, 0));
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_panic_is_logged_once_on_one_line() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{STREAMS}{}",
        handler("retry = { max_attempts = 1 }\nconcurrency = 1")
    );
    let host = HostProcess::spawn(dir.path(), "panics", &config, &env.server.url());
    env.publish("jobs.a", "trap").await;
    wait_until("the dead-letter record", Duration::from_secs(30), || {
        host.metric("dead_lettered_total") == 1.0
    })
    .await;
    let log = host.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("flaky: trap requested"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once:\n{log}");
    assert!(
        lines[0].contains("panicked at examples/flaky/src/lib.rs"),
        "where and what on the same line: {}",
        lines[0]
    );
    assert!(!log.contains("RUST_BACKTRACE"), "no hint lines:\n{log}");
    host.terminate();
}
