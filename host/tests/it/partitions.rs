//! Partitioned consumer groups, judged from the outside: `mailroom run` processes on one
//! handler with `partitions`, the `flaky` guest's `span` command recording the start and end
//! of every execution of every key (in KV, which a fenced host cannot write), and a checker
//! that counts lost, duplicated, reordered and overlapping executions.

use std::time::{Duration, Instant};

use crate::spans::{check, spans_of, Span};
use crate::support::{all_messages, wait_until, wasm, Env, HostProcess};

const PARTITIONS: u32 = 8;

pub fn config(host: &str, partitions: u32, extra: &str) -> String {
    format!(
        r#"
[host]
lease_ttl = "4s"
drain_timeout = "10s"

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
name = "spans"

[[bucket]]
name = "execs"

[[handler]]
name = "flaky"
module = "{}"
stream = "JOBS"
partitions = {partitions}
ack_wait = "5s"
dead_letter = "dlq.flaky"
publish = {{ allow = ["records.>"] }}
kv = {{ allow = ["spans", "execs"] }}
config = {{ output-subject = "records.all", host = "{host}" }}
{extra}
"#,
        wasm("flaky").display()
    )
}

async fn spans(env: &Env) -> Vec<Span> {
    spans_of(&env.js).await
}

async fn publish_jobs(env: &Env, total: u64, keys: u64, command: &str) {
    env.publish_many(
        (0..total).map(|i| (format!("jobs.k{}", i % keys), command.to_owned().into())),
    )
    .await;
}

/// Waits until every input has its output and the work stream is empty (everything acked).
async fn all_done(env: &Env, total: u64, within: Duration) {
    let deadline = Instant::now() + within;
    let work = format!("MR_flaky_P{PARTITIONS}");
    loop {
        let outputs = env.stream_count("RECORDS").await;
        let left = env.stream_count(&work).await;
        if outputs >= total && left == 0 {
            assert_eq!(outputs, total, "one output per input, no duplicates");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not done within {within:?}: {outputs} of {total} outputs, {left} messages left in {work}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn owned(hosts: &[&HostProcess]) -> Vec<f64> {
    hosts
        .iter()
        .map(|h| {
            h.try_metrics()
                .and_then(|m| m.get("partitions_owned").copied())
                .unwrap_or(0.0)
        })
        .collect()
}

/// Waits until the hosts own every partition between them, evenly (each floor or ceil of
/// partitions / hosts); returns how long it took.
async fn balanced(hosts: &[&HostProcess], within: Duration) -> Duration {
    let start = Instant::now();
    let floor = PARTITIONS as f64 / hosts.len() as f64;
    wait_until("every partition owned, evenly", within, || {
        let o = owned(hosts);
        o.iter().sum::<f64>() == PARTITIONS as f64
            && o.iter().all(|n| *n >= floor.floor() && *n <= floor.ceil())
    })
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_keep_per_key_order_without_overlap_and_spread_evenly() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let hosts: Vec<HostProcess> = ["a", "b", "c"]
        .iter()
        .map(|h| {
            HostProcess::spawn(
                dir.path(),
                h,
                &config(h, PARTITIONS, "concurrency = 8"),
                &url,
            )
        })
        .collect();
    let refs: Vec<&HostProcess> = hosts.iter().collect();
    balanced(&refs, Duration::from_secs(30)).await;
    const TOTAL: u64 = 6_000;
    publish_jobs(&env, TOTAL, 64, "span:1").await;
    all_done(&env, TOTAL, Duration::from_secs(120)).await;
    let v = check(&spans(&env).await);
    println!("{v:?}; partitions owned {:?}", owned(&refs));
    assert_eq!(v.messages as u64, TOTAL, "every message ran");
    assert_eq!(v.order_violations, 0, "{v:?}");
    assert_eq!(v.overlaps, 0, "{v:?}");
    assert_eq!(v.reruns, 0, "nothing failed, nothing ran twice: {v:?}");
    let shares: Vec<f64> = refs.iter().map(|h| h.metric("succeeded_total")).collect();
    assert!(
        shares.iter().all(|s| *s > 0.0),
        "every host worked: {shares:?}"
    );
    for h in hosts {
        h.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_hosts_loses_nothing_keeps_order_and_fails_over_within_the_lease() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    // Slow enough that the load outlasts three kills and failovers.
    let cfg = |h: &str| config(h, PARTITIONS, "concurrency = 2");
    let mut a = HostProcess::spawn(dir.path(), "a", &cfg("a"), &url);
    let b = HostProcess::spawn(dir.path(), "b", &cfg("b"), &url);
    let c = HostProcess::spawn(dir.path(), "c", &cfg("c"), &url);
    balanced(&[&a, &b, &c], Duration::from_secs(30)).await;
    const TOTAL: u64 = 12_000;
    publish_jobs(&env, TOTAL, 64, "span:4").await;
    let mut failovers = Vec::new();
    let mut held_at_kill = 0.0;
    for round in 0..3 {
        let progress = env.stream_count("RECORDS").await;
        wait_until("progress", Duration::from_secs(60), || {
            a.try_metrics()
                .is_some_and(|m| m["succeeded_total"] >= 100.0 && m["in_flight"] >= 4.0)
        })
        .await;
        held_at_kill += a.metric("in_flight");
        a.kill9();
        let killed = Instant::now();
        // The others take a's partitions once its leases expire.
        wait_until(
            "the dead host's partitions taken over",
            Duration::from_secs(30),
            || owned(&[&b, &c]).iter().sum::<f64>() == PARTITIONS as f64,
        )
        .await;
        failovers.push(killed.elapsed());
        println!(
            "round {round}: killed a at {progress} outputs; failover {:?}",
            killed.elapsed()
        );
        a = HostProcess::spawn(dir.path(), &format!("a{round}"), &cfg("a"), &url);
    }
    all_done(&env, TOTAL, Duration::from_secs(180)).await;
    let v = check(&spans(&env).await);
    failovers.sort();
    println!(
        "{v:?}; failover median {:?} max {:?} (lease TTL 4s)",
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1]
    );
    assert_eq!(v.messages as u64, TOTAL, "nothing lost");
    assert_eq!(v.order_violations, 0, "{v:?}");
    assert_eq!(v.overlaps_across_hosts, 0, "{v:?}");
    assert!(
        v.reruns as f64 <= held_at_kill,
        "re-runs ({}) are bounded by what the killed host held ({held_at_kill})",
        v.reruns
    );
    assert!(
        failovers.iter().all(|f| *f < Duration::from_secs(4 + 2)),
        "failover within lease TTL + 2s: {failovers:?}"
    );
    for h in [a, b, c] {
        h.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_graceful_leaves_rerun_nothing_and_keep_order() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let cfg = |h: &str| config(h, PARTITIONS, "concurrency = 8");
    let a = HostProcess::spawn(dir.path(), "a", &cfg("a"), &url);
    let mut b = HostProcess::spawn(dir.path(), "b", &cfg("b"), &url);
    balanced(&[&a, &b], Duration::from_secs(30)).await;
    const TOTAL: u64 = 8_000;
    publish_jobs(&env, TOTAL, 64, "span:2").await;
    wait_until("progress", Duration::from_secs(60), || {
        a.metric("succeeded_total") >= 500.0
    })
    .await;
    let c = HostProcess::spawn(dir.path(), "c", &cfg("c"), &url);
    let join = balanced(&[&a, &b, &c], Duration::from_secs(30)).await;
    wait_until("c works", Duration::from_secs(30), || {
        c.metric("succeeded_total") >= 200.0
    })
    .await;
    b.signal("-TERM");
    let left = Instant::now();
    let status = b.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "b drained and exited 0: {status}");
    let leave = balanced(&[&a, &c], Duration::from_secs(30)).await + left.elapsed();
    all_done(&env, TOTAL, Duration::from_secs(180)).await;
    let v = check(&spans(&env).await);
    println!("{v:?}; rebalance on join {join:?}, on leave {leave:?}");
    assert_eq!(v.messages as u64, TOTAL);
    assert_eq!(v.reruns, 0, "a graceful move re-runs nothing: {v:?}");
    assert_eq!(v.order_violations, 0, "{v:?}");
    assert_eq!(v.overlaps, 0, "{v:?}");
    for h in [a, c] {
        h.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_paused_beyond_its_lease_fences_itself_and_its_late_work_never_lands() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let cfg = |h: &str| config(h, PARTITIONS, "concurrency = 8");
    let a = HostProcess::spawn(dir.path(), "a", &cfg("a"), &url);
    let b = HostProcess::spawn(dir.path(), "b", &cfg("b"), &url);
    balanced(&[&a, &b], Duration::from_secs(30)).await;
    const TOTAL: u64 = 6_000;
    publish_jobs(&env, TOTAL, 64, "span:5").await;
    wait_until("b busy", Duration::from_secs(60), || {
        b.try_metrics()
            .is_some_and(|m| m["succeeded_total"] >= 200.0 && m["busy_workers"] >= 2.0)
    })
    .await;
    let stopped = now_nanos();
    b.signal("-STOP");
    // Twice the lease: a takes b's partitions meanwhile.
    wait_until("a owns everything", Duration::from_secs(30), || {
        owned(&[&a]).iter().sum::<f64>() == PARTITIONS as f64
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resumed = now_nanos();
    b.signal("-CONT");
    wait_until("b fenced itself", Duration::from_secs(10), || {
        b.metric("self_fences_total") >= 1.0
    })
    .await;
    all_done(&env, TOTAL, Duration::from_secs(180)).await;
    let all = spans(&env).await;
    let v = check(&all);
    println!("{v:?}");
    let late: Vec<&Span> = all
        .iter()
        .filter(|s| s.host == "b" && s.start < resumed && s.end > stopped + 1_000_000_000)
        .collect();
    assert!(
        late.is_empty(),
        "work b did after losing its leases landed: {late:?}"
    );
    assert_eq!(v.messages as u64, TOTAL);
    assert_eq!(v.order_violations, 0, "{v:?}");
    assert_eq!(v.overlaps_across_hosts, 0, "{v:?}");
    for h in [a, b] {
        h.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_killed_and_restarted_in_place_keeps_order() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let cfg = config("a", PARTITIONS, "concurrency = 16");
    let mut a = HostProcess::spawn(dir.path(), "a", &cfg, &url);
    balanced(&[&a], Duration::from_secs(30)).await;
    const TOTAL: u64 = 8_000;
    publish_jobs(&env, TOTAL, 16, "span:1").await;
    for round in 0..3 {
        wait_until("progress", Duration::from_secs(60), || {
            a.try_metrics()
                .is_some_and(|m| m["succeeded_total"] >= 300.0 && m["in_flight"] >= 8.0)
        })
        .await;
        a.kill9();
        a = HostProcess::spawn(dir.path(), &format!("a{round}"), &cfg, &url);
    }
    all_done(&env, TOTAL, Duration::from_secs(180)).await;
    let v = check(&spans(&env).await);
    println!("{v:?}");
    assert_eq!(v.messages as u64, TOTAL);
    assert_eq!(
        v.order_violations, 0,
        "a restarted host replays a key's older messages first: {v:?}"
    );
    assert_eq!(v.overlaps, 0, "{v:?}");
    a.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_keeps_its_attempt_count_while_its_partition_moves() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let extra =
        "concurrency = 4\nretry = { max_attempts = 4, backoff = [\"700ms\"], jitter = 0.0 }";
    let a = HostProcess::spawn(dir.path(), "a", &config("a", 1, extra), &url);
    wait_until("a owns the partition", Duration::from_secs(30), || {
        owned(&[&a]) == [1.0]
    })
    .await;
    env.publish("jobs.poison", "poison").await;
    publish_jobs(&env, 500, 8, "span:1").await;
    // After two attempts, start b and stop a: the partition (and the poison) moves to b.
    wait_until("two attempts", Duration::from_secs(30), || {
        a.metric("retried_total") >= 2.0
    })
    .await;
    let b = HostProcess::spawn(dir.path(), "b", &config("b", 1, extra), &url);
    let mut a = a;
    a.signal("-TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).success());
    wait_until("b owns the partition", Duration::from_secs(30), || {
        owned(&[&b]) == [1.0]
    })
    .await;
    wait_until(
        "the poison is dead-lettered",
        Duration::from_secs(30),
        || b.metric("dead_lettered_total") >= 1.0,
    )
    .await;
    all_done_one_partition(&env, 500).await;
    let execs = all_messages(&env.js, "KV_execs").await;
    assert_eq!(
        execs.len(),
        4,
        "exactly max_attempts executions across both hosts: {execs:?}"
    );
    let dlq = env.stream_messages("DLQ").await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(crate::support::header(&dlq[0], "Mailroom-Attempts"), "4");
    let v = check(&spans(&env).await);
    assert_eq!(v.messages, 500, "the other keys flowed");
    assert_eq!(v.order_violations, 0);
    b.terminate();
}

async fn all_done_one_partition(env: &Env, total: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.stream_count("RECORDS").await < total || env.stream_count("MR_flaky_P1").await > 0 {
        assert!(Instant::now() < deadline, "not done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_partition_count_under_load_runs_every_message_once_in_order() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let url = env.server.url();
    let a = HostProcess::spawn(dir.path(), "a", &config("a", 4, "concurrency = 4"), &url);
    wait_until("a owns the 4 partitions", Duration::from_secs(30), || {
        owned(&[&a]) == [4.0]
    })
    .await;
    publish_jobs(&env, 3_000, 32, "span:2").await;
    wait_until("progress", Duration::from_secs(60), || {
        a.metric("succeeded_total") >= 500.0
    })
    .await;
    // A rolling change: a host with the new count joins while a still runs the old one, and
    // waits (a would run the messages the old stream copies while the switch stops it, which
    // the new stream has too); a then restarts with the new count. The switch stops the old
    // work stream's sourcing at a cutover, both drain the old stream, then run the new one.
    let b = HostProcess::spawn(dir.path(), "b", &config("b", 8, "concurrency = 4"), &url);
    let publishing = {
        let js = env.js.clone();
        tokio::spawn(async move {
            for i in 3_000..6_000u64 {
                js.publish(format!("jobs.k{}", i % 32), "span:2".into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
        })
    };
    wait_until("b waits for a", Duration::from_secs(30), || {
        b.log().contains("still run(s) the previous count")
    })
    .await;
    assert!(
        env.js.get_stream("MR_flaky_P8").await.is_err(),
        "no switch while a host runs the old count"
    );
    a.terminate();
    let a = HostProcess::spawn(dir.path(), "a2", &config("a", 8, "concurrency = 4"), &url);
    publishing.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while env.stream_count("RECORDS").await < 6_000
        || env.js.get_stream("MR_flaky_P4").await.is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the switch did not finish: {} outputs, old stream there: {}",
            env.stream_count("RECORDS").await,
            env.js.get_stream("MR_flaky_P4").await.is_ok()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = check(&spans(&env).await);
    println!("{v:?}");
    assert_eq!(v.messages, 6_000, "nothing lost");
    assert_eq!(
        v.reruns, 0,
        "every message ran in exactly one generation: {v:?}"
    );
    assert_eq!(v.order_violations, 0, "{v:?}");
    assert_eq!(v.overlaps, 0, "{v:?}");
    assert_eq!(
        env.stream_count("MR_flaky_P8").await,
        0,
        "the new generation is drained too"
    );
    assert!(
        format!("{}{}", a.log(), b.log()).contains("the partition count changed: MR_flaky_P4"),
        "{}",
        b.log()
    );
    a.terminate();
    b.terminate();
}

/// A delivery the host never sees, as when its connection drops with deliveries in transit:
/// here a rival puller takes one delivery of the partition's consumer and never acks it.
/// JetStream counts it as delivered to the consumer, so without more it would come back only
/// after AckWait, behind its key's later messages. The host sees the jump in the consumer
/// sequence and restarts the partition, whose new epoch replays it in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_the_host_never_saw_is_replayed_in_order() {
    use futures::StreamExt as _;
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let a = HostProcess::spawn(
        dir.path(),
        "a",
        &config("a", 1, "concurrency = 2"),
        &env.server.url(),
    );
    wait_until("a owns the partition", Duration::from_secs(30), || {
        owned(&[&a]) == [1.0]
    })
    .await;
    publish_jobs(&env, 100, 2, "span:20").await;
    wait_until("progress", Duration::from_secs(30), || {
        a.metric("succeeded_total") >= 10.0
    })
    .await;
    // The rival's request waits among the host's; the second half's messages are shared out
    // between them, so it takes one with later messages of its key behind it.
    let mut consumers = env
        .js
        .get_stream("MR_flaky_P1")
        .await
        .unwrap()
        .consumer_names();
    let consumer = consumers
        .next()
        .await
        .expect("the partition's consumer")
        .unwrap();
    let inbox = env.client.new_inbox();
    let mut rival = env.client.subscribe(inbox.clone()).await.unwrap();
    env.client
        .publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.MR_flaky_P1.{consumer}"),
            inbox,
            r#"{"batch":1,"expires":20000000000}"#.into(),
        )
        .await
        .unwrap();
    env.client.flush().await.unwrap();
    publish_jobs(&env, 100, 2, "span:20").await;
    let stolen = tokio::time::timeout(Duration::from_secs(20), rival.next())
        .await
        .expect("the rival got a delivery")
        .unwrap();
    assert!(
        stolen
            .reply
            .as_ref()
            .is_some_and(|r| r.starts_with("$JS.ACK.")),
        "the rival got a message, not a status: {stolen:?}"
    );
    println!("the rival took {} {:?}", stolen.subject, stolen.reply);
    all_done_one_partition(&env, 200).await;
    let v = check(&spans(&env).await);
    println!("{v:?}; delivery gaps {}", a.metric("delivery_gaps_total"));
    assert_eq!(v.messages, 200);
    assert_eq!(v.order_violations, 0, "{v:?}");
    assert_eq!(v.overlaps, 0, "{v:?}");
    assert_eq!(a.metric("delivery_gaps_total"), 1.0, "the host saw the gap");
    a.terminate();
}
