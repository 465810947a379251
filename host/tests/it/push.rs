//! `consumer_kind = "push-queue"`: hosts sharing an existing push consumer with a deliver
//! group, the way wasmCloud's JetStream plugin creates it.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, AckPolicy};

use crate::support::{wait_until, wasm, Env, HostProcess};

const GROUP: &str = "wasmcloud-jobs";

fn config(extra: &str) -> String {
    format!(
        r#"
[[stream]]
name = "RECORDS"
subjects = ["records.>"]

[[stream]]
name = "EXECS"
subjects = ["execs.>"]

[[stream]]
name = "DLQ"
subjects = ["dlq.>"]

[[handler]]
name = "flaky"
module = "{}"
stream = "JOBS"
consumer = "wc-jobs"
consumer_kind = "push-queue"
deliver_group = "{GROUP}"
ack_wait = "10s"
dead_letter = "dlq.flaky"
publish = {{ allow = ["records.>", "execs.>"] }}
config = {{ output-subject = "records.all" }}
{extra}
"#,
        wasm("flaky").display()
    )
}

/// The stream and the push consumer a wasmCloud deployment would have left.
async fn wasmcloud_consumer(env: &Env, flow_control: bool) {
    let stream = env
        .js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "JOBS".into(),
            subjects: vec!["jobs.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    stream
        .create_consumer(consumer::push::Config {
            durable_name: Some("wc-jobs".into()),
            deliver_subject: "wasmcloud.deliver.jobs".into(),
            deliver_group: Some(GROUP.into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(10),
            max_ack_pending: 256,
            flow_control,
            idle_heartbeat: if flow_control {
                Duration::from_secs(1)
            } else {
                Duration::ZERO
            },
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn consumer_state(env: &Env) -> (u64, u64, usize) {
    let stream = env.js.get_stream("JOBS").await.unwrap();
    let info = stream.consumer_info("wc-jobs").await.unwrap();
    (
        info.ack_floor.stream_sequence,
        info.num_pending,
        info.num_ack_pending,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_a_push_consumer_and_a_killed_one_loses_nothing() {
    let env = Env::new().await;
    wasmcloud_consumer(&env, true).await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let cfg = config("concurrency = 8");
    let a = HostProcess::spawn(dir.path(), "a", &cfg, &url);
    let mut b = HostProcess::spawn(dir.path(), "b", &cfg, &url);
    const TOTAL: u64 = 4_000;
    env.publish_many((0..TOTAL).map(|i| (format!("jobs.k{}", i % 50), "record-exec:2".into())))
        .await;
    wait_until("both hosts ran messages", Duration::from_secs(60), || {
        a.metric("succeeded_total") >= 200.0 && b.metric("succeeded_total") >= 200.0
    })
    .await;
    b.kill9();
    let b2 = HostProcess::spawn(dir.path(), "b2", &cfg, &url);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (floor, pending, ack_pending) = consumer_state(&env).await;
        if floor == TOTAL && pending == 0 && ack_pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: ack floor {floor}, {pending} pending, {ack_pending} awaiting ack"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env.stream_count("RECORDS").await,
        TOTAL,
        "one output per input"
    );
    assert_eq!(env.stream_count("DLQ").await, 0);
    let execs = env.stream_count("EXECS").await;
    println!(
        "{TOTAL} messages, {execs} executions; a ran {}, b2 ran {}",
        a.metric("succeeded_total"),
        b2.metric("succeeded_total")
    );
    assert!(execs >= TOTAL);
    a.terminate();
    b2.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_hands_back_what_it_held_to_the_other_host_of_the_group() {
    let env = Env::new().await;
    wasmcloud_consumer(&env, false).await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let a = HostProcess::spawn(dir.path(), "a", &config("concurrency = 2"), &url);
    let b = HostProcess::spawn(dir.path(), "b", &config("concurrency = 2"), &url);
    const TOTAL: u64 = 600;
    env.publish_many((0..TOTAL).map(|i| (format!("jobs.k{}", i % 20), "record-exec:5".into())))
        .await;
    wait_until("a is running messages", Duration::from_secs(30), || {
        a.metric("succeeded_total") >= 20.0
    })
    .await;
    a.terminate();
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumer_state(&env).await != (TOTAL, 0, 0) {
        assert!(
            Instant::now() < deadline,
            "not settled after a left: {:?}",
            consumer_state(&env).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.stream_count("RECORDS").await, TOTAL);
    assert_eq!(
        env.stream_count("EXECS").await,
        TOTAL,
        "a graceful leave re-runs nothing"
    );
    assert_eq!(env.stream_count("DLQ").await, 0);
    b.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_queue_handler_refuses_a_consumer_it_cannot_use_and_says_what_to_change() {
    let env = Env::new().await;
    wasmcloud_consumer(&env, false).await;
    let exit = |text: String| format!("[host]\non_handler_error = \"exit\"\n{text}");
    let text = exit(config("").replace(
        &format!("deliver_group = \"{GROUP}\""),
        "deliver_group = \"other\"",
    ));
    let err = mailroom::start(
        env.config(&text),
        env.client.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .err()
    .expect("a wrong deliver group is refused");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("set deliver_group = \"{GROUP}\"")),
        "{text}"
    );
    // A pull consumer under the same name.
    let stream = env.js.get_stream("JOBS").await.unwrap();
    stream.delete_consumer("wc-jobs").await.unwrap();
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("wc-jobs".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = mailroom::start(
        env.config(&exit(config(""))),
        env.client.clone(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .err()
    .expect("a pull consumer is refused");
    assert!(format!("{err:#}").contains("is a pull consumer"), "{err:#}");
}
