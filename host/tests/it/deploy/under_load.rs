//! Revisions applied under load: hot swaps and a rollback on two hosts, a drain and rebind,
//! undeploy and purge.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mailroom::registry::change::Kind;
use mailroom::registry::{commands, view, Registry};

use super::*;
use crate::support::{wait_until, wasm, Env, Host};

#[tokio::test]
async fn deploy_and_rollback_under_load_on_two_hosts_switch_every_message_once_in_order() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&env.js, 1).await.unwrap();
    // Revision 2's module is new on every run, so the rollout includes compiling it.
    let v1 = flaky_variant(dir.path(), "v1");
    let v2 = flaky_variant(dir.path(), &format!("v2-{}", nonce()));
    // `part` is partitioned and runs on both hosts; `solo` is ordered by subject without
    // partitions, so it runs on host a only (b selects the label group = shared).
    let part = |version: &str| sets("part", version, &[("partitions", "4")]);
    let first = deploy(&registry, "part", &v1, part("v1"), &[("group", "shared")]).await;
    assert_eq!((first.revision, first.change.kind), (1, Kind::New));
    deploy(&registry, "solo", &v1, sets("solo", "v1", &[]), &[]).await;

    let a = env.start(host_config(&env, "a", "")).await;
    let b = env
        .start(host_config(&env, "b", "labels = { group = \"shared\" }"))
        .await;
    let owned = |h: &Host| h.metrics("part").partitions_owned;
    wait_until(
        "the partitions to spread over both hosts",
        Duration::from_secs(30),
        || owned(&a) == 2 && owned(&b) == 2,
    )
    .await;
    assert!(swaps(&b, "solo").is_none(), "host b does not select solo");

    let load = Load::start(&env.js, &["part", "solo"], 2, Duration::from_millis(4));
    wait_until("load on v1", Duration::from_secs(20), || {
        a.metrics("part").succeeded + b.metrics("part").succeeded > 100
    })
    .await;

    // Phase 1: revision 2 (a new module and a new setting) rolls out under load.
    load.phase(1);
    let second = deploy(&registry, "part", &v2, part("v2"), &[("group", "shared")]).await;
    assert_eq!(second.change.kind, Kind::HotSwap, "{}", second.change);
    // From deploy returning to both hosts running it: download, compile (a module new to
    // the compile cache), instantiate once, swap.
    let rolled = rollout(&registry, "part").await;
    println!("part revision 2: {rolled}");
    assert_eq!(rolled.hosts.len(), 2, "{rolled}");
    assert!(rolled.elapsed < Duration::from_secs(30), "{rolled}");
    deploy(&registry, "solo", &v2, sets("solo", "v2", &[]), &[]).await;
    println!("solo revision 2: {}", rollout(&registry, "solo").await);
    load.phase(2);
    let done = a.metrics("part").succeeded + b.metrics("part").succeeded;
    wait_until("load on v2", Duration::from_secs(20), || {
        a.metrics("part").succeeded + b.metrics("part").succeeded > done + 100
    })
    .await;

    // Phase 3: roll back to revision 1 (as revision 3), under load.
    load.phase(3);
    let mut said = Vec::new();
    for name in ["solo", "part"] {
        let back = commands::rollback(&registry, name, None, &mut |l| said.push(l))
            .await
            .unwrap();
        assert_eq!((back.revision, back.change.kind), (3, Kind::HotSwap));
    }
    println!("{}", said.join("\n"));
    println!("part revision 3: {}", rollout(&registry, "part").await);
    println!("solo revision 3: {}", rollout(&registry, "solo").await);
    load.phase(4);
    let done = a.metrics("part").succeeded + b.metrics("part").succeeded;
    wait_until("load after the rollback", Duration::from_secs(20), || {
        a.metrics("part").succeeded + b.metrics("part").succeeded > done + 100
    })
    .await;
    let sent = load.stop().await;
    wait_for_outputs(&env, sent).await;
    for (host, n) in [(&a, 2), (&b, 2)] {
        assert_eq!(swaps(host, "part"), Some(n), "two hot swaps, no restart");
    }
    assert_eq!(swaps(&a, "solo"), Some(2));

    for handler in ["part", "solo"] {
        let run = read_run(&env, handler).await;
        run.check_once_in_order(handler);
        // Per key, in stream order, the versions go v1 → v2 → v1 (the rollback), never
        // back and forth; an input sent after revision 2 reached every host never runs on
        // revision 1 (only on 2, or on 3 after 2); one sent after the rollback reached every
        // host runs on revision 3.
        let mut per_key: HashMap<&str, Vec<&str>> = HashMap::new();
        for (subject, seq, version) in &run.outputs {
            let phase = run.inputs[seq].1;
            let seen = per_key.entry(subject).or_default();
            if phase == 4 {
                assert_eq!(
                    version, "v1",
                    "{handler}: input {seq} sent after the rollback"
                );
            }
            if phase == 2 && version == "v1" {
                assert!(
                    seen.contains(&"v2"),
                    "{handler}: input {seq} sent after revision 2 reached every host ran on 1"
                );
            }
            if seen.last() != Some(&version.as_str()) {
                seen.push(version);
            }
        }
        for (key, seen) in &per_key {
            assert_eq!(
                seen,
                &["v1", "v2", "v1"],
                "{handler}: {key}'s versions in order"
            );
        }
        println!(
            "{handler}: {} inputs, each run once with one output, per key in order",
            run.inputs.len()
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_binding_change_drains_and_rebinds_under_load_and_undeploy_stops_then_purges() {
    let env = Env::new().await;
    let registry = Registry::open(&env.js, 1).await.unwrap();
    let flaky = wasm("flaky");
    // `part` changes its partition count (a generation switch), `solo` its workers (the same
    // durable consumer, bound again).
    deploy(
        &registry,
        "part",
        &flaky,
        sets("part", "v1", &[("partitions", "2")]),
        &[],
    )
    .await;
    deploy(
        &registry,
        "solo",
        &flaky,
        sets("solo", "v1", &[("max_workers", "8")]),
        &[],
    )
    .await;
    let h = env.start(host_config(&env, "a", "")).await;
    let load = Load::start(&env.js, &["part", "solo"], 2, Duration::from_millis(4));
    let succeeded = |name: &str| h.metrics(name).succeeded;
    wait_until("load on revision 1", Duration::from_secs(20), || {
        succeeded("part") > 100
    })
    .await;

    load.phase(1);
    let part = deploy(
        &registry,
        "part",
        &flaky,
        sets("part", "v2", &[("partitions", "3")]),
        &[],
    )
    .await;
    assert_eq!(part.change.kind, Kind::Rebind);
    assert_eq!(part.change.what[0], "partitions", "{}", part.change);
    let solo = deploy(
        &registry,
        "solo",
        &flaky,
        sets("solo", "v2", &[("max_workers", "4")]),
        &[],
    )
    .await;
    assert_eq!(solo.change.kind, Kind::Rebind);
    println!(
        "part: {}\nsolo: {}",
        rollout(&registry, "part").await,
        rollout(&registry, "solo").await
    );
    load.phase(2);
    let done = succeeded("part");
    wait_until("load on revision 2", Duration::from_secs(30), || {
        succeeded("part") > done + 100
    })
    .await;
    let sent = load.stop().await;
    wait_for_outputs(&env, sent).await;
    for handler in ["part", "solo"] {
        let run = read_run(&env, handler).await;
        run.check_once_in_order(handler);
        for (_, seq, version) in &run.outputs {
            if run.inputs[seq].1 == 2 {
                assert_eq!(version, "v2", "{handler}: input {seq}");
            }
        }
        println!(
            "{handler}: {} inputs across the rebind, each run once, per key in order",
            run.inputs.len()
        );
    }

    // Undeploy: the host drains and stops; new messages wait in the stream.
    let mut said = Vec::new();
    commands::undeploy(&registry, "part", &mut |l| said.push(l))
        .await
        .unwrap();
    let stopped = rollout(&registry, "part").await;
    println!("{}\n{stopped}", said.join("\n"));
    assert_eq!(report(&registry, "a", "part").await.0, None);
    let outputs = env.stream_count("OUT").await;
    publish_jobs(&env, "part", 10).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.stream_count("MR_part_P3").await < 10 {
        assert!(
            Instant::now() < deadline,
            "the work stream keeps the new messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        env.stream_count("OUT").await,
        outputs,
        "nothing ran after the undeploy"
    );
    let listing = view::list(&registry).await.unwrap().to_string();
    assert!(listing.contains("(UNDEPLOYED)"), "{listing}");
    let err = commands::undeploy(&registry, "part", &mut |_| {})
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("is not deployed"), "{err:#}");

    // Purge: the work stream and the history go.
    commands::purge(&env.js, &registry, "part", &mut |l| println!("{l}"))
        .await
        .unwrap();
    assert!(env.js.get_stream("MR_part_P3").await.is_err());
    assert!(registry.history("part").await.unwrap().is_empty());
    let err = commands::purge(&env.js, &registry, "solo", &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("undeploy it before purging"),
        "{err:#}"
    );
    h.stop().await;
}
