//! `mailroom dlq ls | show | redrive` against a real server, on records the host wrote.

use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;

use crate::support::{header, target_dir, wasm, Env};

fn config_text(flaky: &std::path::Path) -> String {
    format!(
        r#"[[stream]]
name = "JOBS"
subjects = ["jobs.>"]

[[stream]]
name = "DLQ"
subjects = ["dlq.>"]

[[handler]]
name = "flaky"
module = "{}"
stream = "JOBS"
dead_letter = "dlq.flaky"
retry = {{ max_attempts = 1 }}
"#,
        flaky.display()
    )
}

fn dlq(config: &std::path::Path, url: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .env(
            "XDG_CACHE_HOME",
            target_dir().join("mailroom-test-cache-cli"),
        )
        .env("MAILROOM_LOG", "warn")
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--nats-url")
        .arg(url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "mailroom dlq {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_redriven_once() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&wasm("flaky"));
    let path = dir.path().join("mailroom.toml");
    std::fs::write(&path, &text).unwrap();
    let host = env.start(env.config(&text)).await;
    for (subject, payload) in [
        ("jobs.r1", "reject"),
        ("jobs.r2", "reject"),
        ("jobs.t", "trap"),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Order-Id", subject);
        env.js
            .send_publish(
                subject,
                jetstream::message::PublishMessage::build()
                    .payload(payload.into())
                    .headers(headers)
                    .message_id(format!("producer-{subject}")),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    env.settled("JOBS", "flaky", Duration::from_secs(20)).await;
    // Stopped, so the redriven messages stay in JOBS for the assertions below.
    host.stop().await;
    assert_eq!(env.stream_count("DLQ").await, 3);
    let url = env.server.url();

    let all = dlq(&path, &url, &["ls"]);
    assert!(all.contains("3 record(s)"), "{all}");
    assert!(all.contains("jobs.r1") && all.contains("jobs.t"), "{all}");
    assert!(all.contains("flaky: rejected on purpose"), "{all}");
    let rejects = dlq(&path, &url, &["ls", "--kind", "reject"]);
    assert!(
        rejects.contains("2 record(s)") && !rejects.contains("jobs.t"),
        "{rejects}"
    );

    let shown = dlq(&path, &url, &["show", "3"]);
    assert!(shown.contains("kind:     trap"), "{shown}");
    assert!(
        shown.contains("original: jobs.t (stream JOBS, sequence 3)"),
        "{shown}"
    );
    assert!(shown.contains("  Order-Id: jobs.t"), "{shown}");
    assert!(shown.contains("payload (4 bytes):\ntrap"), "{shown}");

    let dry = dlq(&path, &url, &["redrive", "--kind", "reject", "--dry-run"]);
    assert!(dry.contains("2 record(s) would redrive"), "{dry}");
    assert_eq!(
        env.stream_count("JOBS").await,
        3,
        "a dry run publishes nothing"
    );

    let one = dlq(&path, &url, &["redrive", "--kind", "reject", "--max", "1"]);
    assert!(
        one.contains("redrove DLQ:1 (flaky, reject) to jobs.r1"),
        "{one}"
    );
    assert!(one.contains("1 record(s) redrove and deleted"), "{one}");
    let jobs = env.stream_messages("JOBS").await;
    assert_eq!(jobs.len(), 4);
    let redriven = &jobs[3];
    assert_eq!(redriven.subject.as_str(), "jobs.r1");
    assert_eq!(&redriven.payload[..], b"reject");
    assert_eq!(
        header(redriven, "Order-Id"),
        "jobs.r1",
        "original headers kept"
    );
    assert_eq!(header(redriven, "Nats-Msg-Id"), "redrive:DLQ:1");
    assert!(
        redriven
            .headers
            .iter()
            .all(|(name, _)| !AsRef::<str>::as_ref(name).starts_with("Mailroom-")),
        "{:?}",
        redriven.headers
    );

    // A run interrupted after publishing and before deleting: the next run's publish is a
    // duplicate and the record is deleted then.
    env.js
        .send_publish(
            "jobs.r2",
            jetstream::message::PublishMessage::build()
                .payload("reject".into())
                .message_id("redrive:DLQ:2"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let config = env.config(&text);
    let report = mailroom::dlq::redrive(
        &env.js,
        &config,
        &mailroom::dlq::Filter::default(),
        None,
        false,
    )
    .await
    .unwrap();
    let done: Vec<(u64, bool)> = report
        .records
        .iter()
        .map(|(r, _, duplicate)| (r.sequence, *duplicate))
        .collect();
    assert_eq!(done, [(2, true), (3, false)]);
    assert_eq!(
        env.stream_count("JOBS").await,
        6,
        "r2 once (before), t once"
    );
    assert_eq!(env.stream_count("DLQ").await, 0);

    let again = dlq(&path, &url, &["redrive"]);
    assert!(again.contains("0 record(s) redrove"), "{again}");
    assert_eq!(
        env.stream_count("JOBS").await,
        6,
        "idempotent: nothing twice"
    );
    assert!(dlq(&path, &url, &["ls"]).contains("no dead-letter records"));
}

#[test]
fn dlq_names_a_missing_handler_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailroom.toml");
    std::fs::write(&path, config_text(&wasm("flaky"))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["dlq", "ls", "--handler", "nope", "--config"])
        .arg(&path)
        // Nobody listens there: the error must come before any connection attempt.
        .args(["--nats-url", "nats://127.0.0.1:1"])
        .env("MAILROOM_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the config has no handler named \"nope\"; its handlers: flaky"),
        "{err}"
    );
}
