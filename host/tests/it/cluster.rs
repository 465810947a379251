//! A 3-node nats-server cluster on loopback (R3 streams and buckets): nodes leading the lease
//! bucket, a partition's consumer, or a handler's output stream are killed under load.

use std::time::{Duration, Instant};

use crate::partitions::{config, owned};
use crate::spans::{check, spans_at_least};
use crate::support::{wait_until, wasm, ClusterEnv, HostProcess};

/// The partition test config with every stream and bucket replicated three times.
fn replicated(host: &str, partitions: u32, extra: &str) -> String {
    // The default lease TTL: a leader election may keep the lease bucket without a leader for
    // seconds, which a 4 s lease would not survive (it would only fence, safely, and slowly).
    config(host, partitions, extra)
        .replace("lease_ttl = \"4s\"", "lease_ttl = \"10s\"")
        .replace(
            "subjects = [\"jobs.>\"]",
            "subjects = [\"jobs.>\"]\nreplicas = 3",
        )
        .replace(
            "subjects = [\"records.>\"]",
            "subjects = [\"records.>\"]\nreplicas = 3",
        )
        .replace(
            "subjects = [\"dlq.>\"]",
            "subjects = [\"dlq.>\"]\nreplicas = 3",
        )
        .replace("name = \"spans\"", "name = \"spans\"\nreplicas = 3")
        .replace("name = \"execs\"", "name = \"execs\"\nreplicas = 3")
}

async fn publish(env: &ClusterEnv, total: u64, command: &str) {
    let mut window = Vec::new();
    for i in 0..total {
        window.push(
            env.js
                .publish(format!("jobs.k{}", i % 32), command.to_owned().into())
                .await
                .expect("publish"),
        );
        if window.len() == 256 {
            for ack in window.drain(..) {
                ack.await.expect("stored");
            }
        }
    }
    for ack in window {
        ack.await.expect("stored");
    }
}

async fn outputs_complete(env: &ClusterEnv, total: u64, work: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let outputs = env.count("RECORDS").await;
        let left = if work.is_empty() {
            0
        } else {
            env.count(work).await
        };
        if outputs >= total && left == 0 {
            assert_eq!(outputs, total, "one output per input");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{outputs} of {total} outputs, {left} left in {work} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_lease_bucket_leader_then_a_partition_consumer_leader_loses_and_reorders_nothing(
) {
    let mut env = ClusterEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let urls = env.cluster.urls();
    let a = HostProcess::spawn(
        dir.path(),
        "a",
        &replicated("a", 4, "concurrency = 4"),
        &urls,
    );
    let b = HostProcess::spawn(
        dir.path(),
        "b",
        &replicated("b", 4, "concurrency = 4"),
        &urls,
    );
    wait_until("every partition owned", Duration::from_secs(60), || {
        owned(&[&a, &b]).iter().sum::<f64>() == 4.0
    })
    .await;
    const TOTAL: u64 = 4_000;
    publish(&env, TOTAL, "span:3").await;
    wait_until("progress", Duration::from_secs(60), || {
        a.metric("succeeded_total") + b.metric("succeeded_total") >= 300.0
    })
    .await;
    let leader = env.stream_leader("KV_MR_GROUPS").await;
    println!("killing n{leader}, the leader of the lease bucket");
    env.cluster.node(leader).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.cluster.node(leader).restart().unwrap();
    let work = "MR_flaky_P4";
    let (consumer, leader) = env.some_consumer_leader(work).await;
    println!("killing n{leader}, the leader of consumer {consumer}");
    env.cluster.node(leader).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.cluster.node(leader).restart().unwrap();
    outputs_complete(&env, TOTAL, work, Duration::from_secs(180)).await;
    let v = check(&spans_at_least(&env.js, TOTAL as usize).await);
    println!(
        "{v:?}; lease renewal failures a/b {} {}, self-fences {} {}, stalled watches reopened {} {}",
        a.metric("lease_renew_failures_total"),
        b.metric("lease_renew_failures_total"),
        a.metric("self_fences_total"),
        b.metric("self_fences_total"),
        a.log().matches("watch stopped delivering").count(),
        b.log().matches("watch stopped delivering").count()
    );
    assert_eq!(v.messages as u64, TOTAL, "nothing lost");
    assert_eq!(v.order_violations, 0, "{v:?}");
    assert_eq!(v.overlaps_across_hosts, 0, "{v:?}");
    a.terminate();
    b.terminate();
}

// Each host talks to one node; killing it drops the host's connection with partition
// deliveries in transit. The server counts them as delivered, so they would come back only
// after AckWait, behind later messages of their keys: the host sees the jump in the consumer
// sequence and restarts the partition instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_node_a_partitioned_host_talks_to_loses_no_delivery_and_reorders_nothing() {
    let mut env = ClusterEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = |host| replicated(host, 4, "concurrency = 4");
    let a = HostProcess::spawn(dir.path(), "a", &cfg("a"), &env.cluster.node(0).url());
    let b = HostProcess::spawn(dir.path(), "b", &cfg("b"), &env.cluster.node(1).url());
    wait_until("every partition owned", Duration::from_secs(60), || {
        owned(&[&a, &b]).iter().sum::<f64>() == 4.0
    })
    .await;
    const TOTAL: u64 = 4_000;
    publish(&env, TOTAL, "span:2").await;
    wait_until("progress", Duration::from_secs(60), || {
        a.metric("succeeded_total") >= 300.0 && b.metric("succeeded_total") >= 300.0
    })
    .await;
    println!("killing n0, the node host a talks to");
    env.cluster.node(0).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.cluster.node(0).restart().unwrap();
    outputs_complete(&env, TOTAL, "MR_flaky_P4", Duration::from_secs(180)).await;
    let v = check(&spans_at_least(&env.js, TOTAL as usize).await);
    println!(
        "{v:?}; delivery gaps a/b {} {}, late redeliveries {} {}, self-fences {} {}",
        a.metric("delivery_gaps_total"),
        b.metric("delivery_gaps_total"),
        a.metric("late_redeliveries_total"),
        b.metric("late_redeliveries_total"),
        a.metric("self_fences_total"),
        b.metric("self_fences_total"),
    );
    assert_eq!(v.messages as u64, TOTAL, "nothing lost");
    assert_eq!(v.order_violations, 0, "{v:?}");
    assert_eq!(v.overlaps_across_hosts, 0, "{v:?}");
    a.terminate();
    b.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_output_streams_leader_loses_no_output_and_counts_the_retries() {
    let mut env = ClusterEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let urls = env.cluster.urls();
    let cfg = format!(
        r#"
[[stream]]
name = "JOBS"
subjects = ["jobs.>"]
replicas = 3

[[stream]]
name = "RECORDS"
subjects = ["records.>"]
replicas = 3

[[handler]]
name = "flaky"
module = "{}"
stream = "JOBS"
ordering = "none"
concurrency = 16
publish = {{ allow = ["records.>"] }}
config = {{ output-subject = "records.all" }}
"#,
        wasm("flaky").display()
    );
    let host = HostProcess::spawn(dir.path(), "a", &cfg, &urls);
    const TOTAL: u64 = 8_000;
    publish(&env, TOTAL, "record").await;
    wait_until("progress", Duration::from_secs(60), || {
        host.metric("succeeded_total") >= 1000.0
    })
    .await;
    let leader = env.stream_leader("RECORDS").await;
    println!("killing n{leader}, the leader of the output stream");
    env.cluster.node(leader).kill();
    outputs_complete(&env, TOTAL, "", Duration::from_secs(120)).await;
    let retries = host.metric("publish_retries_total");
    println!("{TOTAL} outputs stored; {retries} publishes sent again while RECORDS had no leader");
    assert!(
        retries > 0.0,
        "the leader election was noticed and survived"
    );
    assert_eq!(host.metric("dead_lettered_total"), 0.0);
    env.cluster.node(leader).restart().unwrap();
    host.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_leader_change_reruns_nothing_the_host_already_held_or_settled() {
    let mut env = ClusterEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    // One host, ordered by subject, on the durable consumer (no partitions).
    let cfg = replicated("a", 1, "concurrency = 8")
        .replace("partitions = 1\n", "")
        .replace("ack_wait = \"5s\"", "ack_wait = \"2s\"");
    // The host talks to n0 only, which is never killed: what is tested is the consumer's
    // leader change alone. A reconnect, or a KV or output stream without a leader, fails
    // attempts that are then retried, which is a re-run of another kind.
    // Leaders are moved before the load starts (a stepdown is an election too).
    let a = HostProcess::spawn(dir.path(), "a", &cfg, &env.cluster.node(0).url());
    env.move_consumer_leader_off("JOBS", "flaky", 0).await;
    let leader = env.consumer_leader("JOBS", "flaky").await;
    for stream in ["KV_spans", "RECORDS"] {
        env.move_stream_leader_off(stream, leader).await;
    }
    const TOTAL: u64 = 6_000;
    publish(&env, TOTAL, "span:2").await;
    wait_until("progress", Duration::from_secs(60), || {
        a.metric("succeeded_total") >= 500.0
    })
    .await;
    assert_eq!(
        env.consumer_leader("JOBS", "flaky").await,
        leader,
        "the consumer's leader moved by itself"
    );
    println!("killing n{leader}, the leader of consumer flaky");
    env.cluster.node(leader).kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.cluster.node(leader).restart().unwrap();
    outputs_complete(&env, TOTAL, "", Duration::from_secs(120)).await;
    let v = check(&spans_at_least(&env.js, TOTAL as usize).await);
    println!(
        "{v:?}; duplicate deliveries ignored: {}, late redeliveries: {}, retried: {}",
        a.metric("duplicate_deliveries_total"),
        a.metric("late_redeliveries_total"),
        a.metric("retried_total")
    );
    assert_eq!(v.messages as u64, TOTAL);
    assert_eq!(
        v.reruns, 0,
        "redeliveries of held or settled messages did not run again: {v:?}"
    );
    assert_eq!(v.order_violations, 0, "{v:?}");
    a.terminate();
}
