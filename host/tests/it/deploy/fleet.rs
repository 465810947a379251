//! Hosts that start after deploys or miss some, and a nats-server restart during a deploy.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use mailroom::registry::change::Kind;
use mailroom::registry::{commands, Registry};

use super::*;
use crate::support::{target_dir, wasm, Env};

#[tokio::test]
async fn a_host_started_after_deploys_runs_the_latest_and_one_down_during_two_catches_up() {
    let env = Env::new().await;
    let registry = Registry::open(&env.js, 1).await.unwrap();
    let flaky = wasm("flaky");
    deploy(&registry, "h", &flaky, sets("h", "v1", &[]), &[]).await;
    let a = env.start(host_config(&env, "a", "")).await;
    assert_eq!(
        report(&registry, "a", "h").await.0,
        Some(1),
        "started after the deploy"
    );
    a.stop().await;
    // Two deploys while a is down.
    for version in ["v2", "v3"] {
        let d = deploy(&registry, "h", &flaky, sets("h", version, &[]), &[]).await;
        assert_eq!(d.change.kind, Kind::HotSwap);
    }
    let b = env.start(host_config(&env, "b", "")).await;
    let a = env.start(host_config(&env, "a", "")).await;
    // A host whose own file has a handler named h runs that one, and refuses the deployed h.
    let mut with_file = host_config(&env, "c", "");
    with_file.handlers = env
        .config(&format!(
            "[[handler]]\nname = \"h\"\nconsumer = \"h-file\"\nmodule = \"{{flaky}}\"\n\
             stream = \"JOBS\"\nsubjects = [\"jobs.c.>\"]\n{STREAMS}"
        ))
        .handlers;
    let c = env.start(with_file).await;
    let rolled = rollout(&registry, "h").await;
    assert_eq!(rolled.hosts.len(), 3, "{rolled}");
    assert_eq!(rolled.refused.len(), 1, "{rolled}");
    let (_, failed) = report(&registry, "c", "h").await;
    assert!(
        failed.is_some_and(
            |(r, why)| r == 3 && why.contains("this host's file has a handler named h")
        ),
        "{rolled}"
    );
    for host in ["a", "b"] {
        assert_eq!(
            report(&registry, host, "h").await,
            (Some(3), None),
            "{host}"
        );
    }
    assert_eq!(swaps(&a, "h"), Some(0), "a started on revision 3 directly");
    let sent = publish_jobs(&env, "h", 40).await;
    wait_for_outputs(&env, sent).await;
    let run = read_run(&env, "h").await;
    run.check_once_in_order("h");
    assert!(
        run.outputs.iter().all(|(_, _, v)| v == "v3"),
        "{:?}",
        run.outputs
    );
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn a_deploy_while_nats_restarts_fails_clearly_or_completes_and_hosts_follow_afterwards() {
    let mut env = Env::new().await;
    let registry = Registry::open(&env.js, 1).await.unwrap();
    let flaky = wasm("flaky");
    deploy(&registry, "h", &flaky, sets("h", "v1", &[]), &[]).await;
    // File storage, so the streams survive the restart.
    let config = |env: &Env| {
        let mut c = host_config(env, "a", "");
        for s in &mut c.streams {
            s.memory_storage = false;
        }
        c
    };
    let h = env.start(config(&env)).await;
    assert_eq!(report(&registry, "a", "h").await.0, Some(1));

    env.server.kill();
    let url = env.server.url();
    let out = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .env(
            "XDG_CACHE_HOME",
            target_dir().join("mailroom-test-cache-cli"),
        )
        .args(["deploy", "h"])
        .arg(&flaky)
        .args(["--set", "stream=JOBS", "--set", "config.version=v2"])
        .args(["--nats-url", &url, "--connect-timeout", "1s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "deploy without a server succeeded");
    assert!(stderr.contains("cannot connect to NATS"), "{stderr}");
    println!("deploy while nats-server is down: {}", stderr.trim());
    // A deploy through a connection that was up when the server went away fails too.
    let checked = commands::check(&commands::DeployRequest {
        name: "h".into(),
        module: flaky.clone(),
        handler_config: None,
        sets: sets("h", "v2", &[]),
        labels: BTreeMap::new(),
        cache_dir: Some(target_dir().join("mailroom-test-cache-deploy")),
    })
    .await
    .unwrap();
    let err = commands::deploy(&registry, &checked, &mut |_| {})
        .await
        .expect_err("no server");
    println!("deploy on a connection to a stopped server: {err:#}");

    env.server.restart().unwrap();
    // Once the client reconnected: nothing of the failed deploys was written, and the same
    // deploy completes; the host (which reconnected and watches again) runs it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let history = loop {
        match registry.history("h").await {
            Ok(history) => break history,
            Err(err) => {
                assert!(Instant::now() < deadline, "{err:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(history.len(), 1, "a failed deploy wrote a revision");
    let deployed = commands::deploy(&registry, &checked, &mut |l| println!("{l}"))
        .await
        .unwrap();
    assert_eq!(deployed.revision, 2);
    rollout(&registry, "h").await;
    let sent = publish_jobs(&env, "h", 8).await;
    wait_for_outputs(&env, sent).await;
    let run = read_run(&env, "h").await;
    assert!(
        run.outputs.iter().all(|(_, _, v)| v == "v2"),
        "{:?}",
        run.outputs
    );
    h.stop().await;
}
