//! The commands as a user runs them, against an auth-enabled server, and `dev --watch`.

use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;

use super::*;
use crate::support::{target_dir, wasm, Env};

/// Runs `mailroom ARGS`; returns whether it succeeded, and its stdout and stderr.
fn mailroom(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .env(
            "XDG_CACHE_HOME",
            target_dir().join("mailroom-test-cache-cli"),
        )
        .env("MAILROOM_LOG", "warn")
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    println!("$ mailroom {}\n{stdout}{stderr}", args.join(" "));
    (out.status.success(), stdout, stderr)
}

#[tokio::test]
async fn the_commands_work_against_an_auth_enabled_server_with_the_hosts_credentials() {
    let server =
        mailroom::nats_server::NatsServer::start_with(mailroom::nats_server::ServerOptions {
            extra_config: "authorization {\n  users = [ { user: \"mailroom\", password: \
                           \"s3cret-pw\" } ]\n}\n"
                .into(),
            ..Default::default()
        })
        .unwrap();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let host_file = format!(
        "[nats]\nuser = \"mailroom\"\npassword = \"s3cret-pw\"\n\n[host]\nid = \"edge-1\"\n\n\
         [deploy]\nwatch = true\npublish = {{ allow = [\"out.>\", \"execs.>\"] }}\n{STREAMS}"
    );
    // A fleet member with no handler of its own.
    let host = crate::support::HostProcess::spawn(dir.path(), "host", &host_file, &url);
    let config = dir.path().join("host.toml");
    let config = config.to_str().unwrap();
    let flaky = wasm("flaky");
    let flaky = flaky.to_str().unwrap();
    let conn = ["--config", config, "--nats-url", &url];
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(conn);
        mailroom(&all)
    };

    let (ok, out, _) = run(&[
        "deploy",
        "jobs",
        flaky,
        "--set",
        "stream=JOBS",
        "--set",
        "publish.allow=[\"out.jobs\", \"execs.>\"]",
        "--set",
        "config.output-subject=out.jobs",
        "--set",
        "config.version=v1",
        "--wait",
        "30s",
    ]);
    assert!(ok);
    assert!(
        out.contains("jobs: revision 1 will be a new handler"),
        "{out}"
    );
    assert!(out.contains("deployed jobs revision 1"), "{out}");
    assert!(out.contains("edge-1-") && out.contains("runs 1"), "{out}");

    let table = dir.path().join("jobs.toml");
    std::fs::write(
        &table,
        "stream = \"JOBS\"\npublish = { allow = [\"out.jobs\", \"execs.>\"] }\n\
         config = { output-subject = \"out.jobs\", version = \"v2\" }\n",
    )
    .unwrap();
    let (ok, out, _) = run(&[
        "deploy",
        "jobs",
        flaky,
        "--handler-config",
        table.to_str().unwrap(),
        "--wait",
        "30s",
    ]);
    assert!(ok);
    assert!(
        out.contains("revision 2 will be a hot swap (config)"),
        "{out}"
    );
    assert!(out.contains("not uploaded again"), "{out}");

    let client =
        async_nats::ConnectOptions::with_user_and_password("mailroom".into(), "s3cret-pw".into())
            .connect(&url)
            .await
            .unwrap();
    let js = jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Flaky-Command", "version:0");
    js.publish_with_headers("jobs.one", headers, "0".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let output = loop {
        if let Ok(stream) = js.get_stream("OUT").await {
            if let Ok(m) = stream.get_raw_message(1).await {
                break String::from_utf8_lossy(&m.payload).into_owned();
            }
        }
        assert!(Instant::now() < deadline, "no output:\n{}", host.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(output.ends_with(" v2"), "{output}");

    let (ok, out, _) = run(&["ls"]);
    assert!(ok && out.contains("runs 2"), "{out}");
    let (ok, out, _) = run(&["rollback", "jobs", "--wait", "30s"]);
    assert!(ok);
    assert!(
        out.contains("rolled jobs back to revision 1 as revision 3"),
        "{out}"
    );
    assert!(out.contains("runs 3"), "{out}");
    let (ok, out, _) = run(&["history", "jobs"]);
    assert!(
        ok && out.contains("3 revisions kept") && out.contains("rollback to 1"),
        "{out}"
    );
    let (ok, out, _) = run(&["undeploy", "jobs", "--purge"]);
    assert!(ok);
    assert!(
        out.contains("deleted consumer jobs of stream JOBS"),
        "{out}"
    );
    assert!(out.contains("purged jobs's revisions"), "{out}");
    let (ok, out, _) = run(&["ls"]);
    assert!(ok && out.contains("no handlers deployed"), "{out}");

    // A spec beyond the host's ceiling: deployed, refused by the host, exit code 2.
    let mut all = vec![
        "deploy",
        "greedy",
        flaky,
        "--set",
        "stream=JOBS",
        "--set",
        "publish.allow=[\"billing.>\"]",
        "--wait",
        "30s",
    ];
    all.extend(conn);
    let out = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .env(
            "XDG_CACHE_HOME",
            target_dir().join("mailroom-test-cache-cli"),
        )
        .args(&all)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stdout.contains("revision 1 FAILED: handler greedy asks for publish.allow \"billing.>\""),
        "{stdout}"
    );
    assert!(
        stderr.contains("revision 1 of greedy was refused by edge-1-"),
        "{stderr}"
    );

    // Without the host's credentials the server refuses, and the command says so.
    let (ok, _, err) = mailroom(&["ls", "--nats-url", &url]);
    assert!(!ok);
    assert!(
        err.contains("refused the connection's credentials"),
        "{err}"
    );
    assert!(
        !host.log().contains("s3cret-pw"),
        "the password is not logged"
    );
    host.terminate();
}

#[tokio::test]
async fn dev_watch_reloads_a_changed_module_file_through_the_same_swap_and_keeps_a_broken_one_out()
{
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("w.wasm");
    std::fs::copy(wasm("noop"), &module).unwrap();
    let config = env.config(&format!(
        "[[handler]]\nname = \"w\"\nmodule = \"{}\"\nstream = \"JOBS\"\n\
         publish = {{ allow = [\"out.w\", \"execs.>\"] }}\n\
         config = {{ output-subject = \"out.w\", version = \"file\" }}\n{STREAMS}",
        module.display()
    ));
    let h = env.start(config).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut reloads = h.running.reload_modules_on_change(stop.clone());
    publish_jobs(&env, "w", 4).await;
    env.settled("JOBS", "w", Duration::from_secs(20)).await;
    assert_eq!(env.stream_count("OUT").await, 0, "noop publishes nothing");

    // A half-written build: refused, noop keeps running.
    let flaky = std::fs::read(wasm("flaky")).unwrap();
    std::fs::write(&module, &flaky[..flaky.len() / 2]).unwrap();
    let refused = next_reload(&mut reloads).await;
    let reason = refused
        .outcome
        .expect_err("a truncated module is not loaded");
    println!("refused: {reason}");
    assert_eq!(h.running.module_version("w"), Some(0));
    publish_jobs(&env, "w", 4).await;
    env.settled("JOBS", "w", Duration::from_secs(20)).await;
    assert_eq!(env.stream_count("OUT").await, 0, "still noop");

    // The whole build: swapped in, the next messages run it.
    std::fs::write(&module, &flaky).unwrap();
    assert_eq!(next_reload(&mut reloads).await.outcome, Ok(1));
    let sent = publish_jobs(&env, "w", 4).await;
    wait_for_outputs(&env, sent).await;
    assert_eq!(h.running.module_version("w"), Some(1));
    stop.cancel();
    h.stop().await;
}

async fn next_reload(
    reloads: &mut tokio::sync::mpsc::UnboundedReceiver<mailroom::registry::reload::Reloaded>,
) -> mailroom::registry::reload::Reloaded {
    tokio::time::timeout(Duration::from_secs(30), reloads.recv())
        .await
        .expect("a reload within 30s")
        .expect("the reloader runs")
}
