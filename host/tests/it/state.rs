//! Effectively-once state: `counter` (a `kv::apply_once` per message) under load while hosts
//! are SIGKILLed between their KV writes and their acks. Every redelivered message that had
//! already been applied would count twice with a plain read-modify-write; the conditional
//! write's idempotency id makes the store drop the second write.

use std::time::Duration;

use crate::support::{wait_until, HostProcess};
use crate::support::{wasm, Env};

const SUBJECTS: u64 = 30;
const TOTAL: u64 = 6_000;

fn config() -> String {
    format!(
        r#"
[[stream]]
name = "ORDERS"
subjects = ["orders.>"]

[[bucket]]
name = "counts"

[[handler]]
name = "counter"
module = "{}"
stream = "ORDERS"
ordering = "subject"
max_workers = 8
ack_wait = "2s"
kv = {{ allow = ["counts"] }}
config = {{ bucket = "counts" }}
"#,
        wasm("counter").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_stay_exact_when_hosts_are_killed_between_the_write_and_the_ack() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let config = config();
    let mut a = HostProcess::spawn(dir.path(), "a", &config, &url);
    let mut b = HostProcess::spawn(dir.path(), "b", &config, &url);
    env.publish_many((0..TOTAL).map(|i| (format!("orders.{}", i % SUBJECTS), "{}".into())))
        .await;

    wait_until("both hosts counting", Duration::from_secs(60), || {
        a.metric("succeeded_total") >= 500.0 && b.metric("succeeded_total") >= 500.0
    })
    .await;
    a.kill9();
    let a2 = HostProcess::spawn(dir.path(), "a2", &config, &url);
    let b0 = b.metric("succeeded_total");
    wait_until("b to go on", Duration::from_secs(60), || {
        b.metric("succeeded_total") >= b0 + 500.0
    })
    .await;
    b.kill9();
    let b2 = HostProcess::spawn(dir.path(), "b2", &config, &url);

    env.settled("ORDERS", "counter", Duration::from_secs(120))
        .await;
    let redelivered = a2.metric("redelivered_total") + b2.metric("redelivered_total");
    println!("{redelivered} redeliveries after two kills");
    assert!(redelivered > 0.0, "the kills left messages to redeliver");

    let kv = env.js.get_key_value("counts").await.unwrap();
    for s in 0..SUBJECTS {
        let key = format!("orders.{s}");
        let value = kv.get(&key).await.unwrap().expect("counted");
        let count: u64 = String::from_utf8_lossy(&value).parse().unwrap();
        assert_eq!(
            count,
            TOTAL / SUBJECTS,
            "{key}: every message counted exactly once"
        );
    }
    // One stored write per message: re-runs wrote nothing.
    let mut stream = env.js.get_stream("KV_counts").await.unwrap();
    let writes = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(writes, TOTAL, "stored KV writes, one per message");
    a2.terminate();
    b2.terminate();
}
