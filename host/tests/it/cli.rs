//! The `mailroom` binary: validate, invoke, and run with a SIGTERM under load.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{target_dir, wasm, Env};

fn mailroom() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailroom"));
    cmd.env(
        "XDG_CACHE_HOME",
        target_dir().join("mailroom-test-cache-cli"),
    )
    .env("MAILROOM_LOG", "warn");
    cmd
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("mailroom.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn handler_config(module: &std::path::Path) -> String {
    format!(
        r#"[[stream]]
name = "JOBS"
subjects = ["jobs.>"]

[[handler]]
name = "flaky"
module = "{}"
stream = "JOBS"
concurrency = 8
ack_wait = "60s"
"#,
        module.display()
    )
}

#[test]
fn validate_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &handler_config(&wasm("flaky")));
    let out = mailroom()
        .arg("validate")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("handler flaky"), "{stdout}");
}

#[test]
fn validate_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("notes.wasm");
    std::fs::write(&bogus, "just text").unwrap();
    let cases = [
        (
            format!("{}concurency = 4\n", handler_config(&wasm("flaky"))),
            "unknown field `concurency`".to_owned(),
        ),
        (
            handler_config(&dir.path().join("missing.wasm")),
            format!(
                "cannot read module {}",
                dir.path().join("missing.wasm").display()
            ),
        ),
        (
            handler_config(&bogus),
            format!("module {} is not WebAssembly", bogus.display()),
        ),
    ];
    for (text, expected) in cases {
        let config = write_config(&dir, &text);
        let out = mailroom()
            .arg("validate")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{text}");
        assert!(
            stderr.contains(&expected),
            "expected {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn invoke_prints_the_publishes_and_the_outcome() {
    let out = mailroom()
        .args(["invoke"])
        .arg(wasm("enrich"))
        .args([
            "--subject",
            "orders.eu",
            "--data",
            r#"{"id":7,"amount_cents":250000}"#,
        ])
        .args([
            "--setting",
            "output-subject=enriched.orders",
            "-H",
            "Trace-Id=abc",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("handler enrich: ok (the host would ack the message)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("publish enriched.orders (Nats-Msg-Id enrich:LOCAL:1:0)"),
        "{stdout}"
    );
    assert!(stdout.contains(r#""tier":"large""#), "{stdout}");

    let out = mailroom()
        .args(["invoke"])
        .arg(wasm("flaky"))
        .args(["-s", "jobs.x", "-d", "reject"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "a reject exits 4: {stdout}");
    assert!(
        stdout.contains("reject: flaky: rejected on purpose"),
        "{stdout}"
    );
}

fn run_invoke(args: &[&str], stdin: Option<&str>) -> (Option<i32>, String, String) {
    let mut cmd = mailroom();
    cmd.arg("invoke").args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invoke_refuses_impossible_messages_and_exit_codes_tell_the_outcome() {
    let flaky = wasm("flaky").display().to_string();
    // Usage errors exit 2 and say what is wrong.
    for (subject, why) in [("orders..eu", "empty token"), ("orders.*", "wildcard")] {
        let (code, _, err) = run_invoke(&[&flaky, "--subject", subject, "-d", "ok"], None);
        assert_eq!(code, Some(2), "{subject}: {err}");
        assert!(err.contains("cannot be the subject of a message"), "{err}");
        assert!(err.contains(why), "{err}");
    }
    let (code, _, err) = run_invoke(&[&flaky, "-s", "jobs.x", "--attempt", "0"], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--attempt"), "{err}");

    // The payload from standard input; a retry exits 3.
    let (code, out, err) = run_invoke(&[&flaky, "-s", "jobs.x", "-d", "@-"], Some("retry\n"));
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("flaky: retry requested"), "{out}");
    assert!(
        out.contains("retry it in place"),
        "ordered by default: {out}"
    );

    // A module that does not load exits 1.
    let (code, _, err) = run_invoke(&["/nonexistent.wasm", "-s", "a"], None);
    assert_eq!(code, Some(1), "{err}");

    // MODULE comes from --config/--handler; an unordered handler naks instead.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &handler_config(&wasm("flaky")).replace("concurrency = 8", "ordering = \"none\""),
    );
    let config = config.display().to_string();
    let (code, out, err) = run_invoke(
        &[
            "--config",
            &config,
            "--handler",
            "flaky",
            "-s",
            "jobs.x",
            "-d",
            "retry",
        ],
        None,
    );
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("nak it for redelivery"), "{out}");
    let (code, _, err) = run_invoke(
        &["--config", &config, "--handler", "nope", "-s", "jobs.x"],
        None,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no handler named \"nope\" (it has: flaky)"),
        "{err}"
    );

    // --repeat prints the steady-state time per message.
    let (code, out, err) = run_invoke(
        &[&flaky, "-s", "jobs.x", "-d", "ok", "--repeat", "20"],
        None,
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("steady state:") && out.contains("over 20 more run(s)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_zero_leaving_nothing_for_ack_wait() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &format!(
            "[host]\ndrain_timeout = \"20s\"\n{}",
            handler_config(&wasm("flaky"))
        ),
    );
    let log = std::fs::File::create(dir.path().join("host.log")).unwrap();
    let mut child = mailroom()
        .env("MAILROOM_LOG", "info")
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--nats-url")
        .arg(env.server.url())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    // Wait for the host to create its consumer, then load it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.js.get_stream("JOBS").await.is_err()
        || env
            .js
            .get_stream("JOBS")
            .await
            .unwrap()
            .consumer_info("flaky")
            .await
            .is_err()
    {
        assert!(Instant::now() < deadline, "host did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    const TOTAL: u64 = 400;
    for _ in 0..TOTAL {
        env.publish("jobs.slow", "sleep:20").await;
    }
    loop {
        let info = env.consumer_info("JOBS", "flaky").await;
        if info.ack_floor.stream_sequence >= 40 {
            assert!(info.num_ack_pending > 0, "nothing in flight at the signal");
            break;
        }
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("host.log")).unwrap();
    assert!(exit.success(), "exit {exit:?}\n{log}");
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "{:?}",
        signalled.elapsed()
    );
    assert!(log.contains("SIGTERM received; draining"), "{log}");

    let info = env.consumer_info("JOBS", "flaky").await;
    let acked_before = info.ack_floor.stream_sequence;
    assert!(
        acked_before < TOTAL,
        "the drain should have handed messages back"
    );

    // Nothing is left waiting for AckWait (60s here): another host gets every remaining
    // message at once, and in the end every message is acked, none lost, and the host that
    // drained ran each message it acked only once (the new host runs only the rest).
    let mut cfg = env.config(&handler_config(&wasm("flaky")));
    cfg.host.drain_timeout = Duration::from_secs(10);
    let restarted = Instant::now();
    let host = env.start(cfg).await;
    let info = env.settled("JOBS", "flaky", Duration::from_secs(60)).await;
    assert!(
        restarted.elapsed() < Duration::from_secs(20),
        "the rest took {:?}: messages waited for AckWait\n{log}",
        restarted.elapsed()
    );
    assert_eq!(info.ack_floor.stream_sequence, TOTAL);
    assert_eq!(host.metrics("flaky").succeeded, TOTAL - acked_before);
    host.stop().await;
}

#[test]
fn a_metrics_address_in_use_fails_at_once_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &handler_config(&wasm("flaky")));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    // Nothing listens on the NATS port, and the host would wait a minute for it.
    let nats = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", nats.local_addr().unwrap());
    drop(nats);
    let started = Instant::now();
    let out = mailroom()
        .args(["run", "--config"])
        .arg(&config)
        .args(["--nats-url", &url, "--connect-timeout", "60s"])
        .args(["--metrics-addr", &addr.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on host.metrics_addr {addr}")),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it failed only after {:?}, while waiting for NATS",
        started.elapsed()
    );
}
