//! The sandbox, without NATS: limits, no ambient authority, grants, and module checks at load.

use std::time::{Duration, Instant};

use mailroom::config::HandlerConfig;
use mailroom::invoke::{invoke, InvokeReport, InvokeRequest};
use mailroom::runtime::{FailureKind, Outcome};

use crate::support::{target_dir, wasm, workspace};

fn handler(extra: &str) -> HandlerConfig {
    let text = format!(
        "[[handler]]\nname = \"flaky\"\nmodule = \"{}\"\nstream = \"JOBS\"\n{extra}\n",
        wasm("flaky").display()
    );
    mailroom::Config::parse(&text, &workspace())
        .expect("valid")
        .handlers
        .remove(0)
}

async fn run(payload: &str, extra: &str) -> InvokeReport {
    let handler = handler(extra);
    invoke(InvokeRequest {
        module: handler.module.clone(),
        subject: "jobs.test".into(),
        payload: payload.as_bytes().to_vec(),
        headers: Vec::new(),
        attempt: 1,
        handler: Some(handler),
        settings: [("output-subject".to_owned(), "out.x".to_owned())].into(),
        kv_seed: Vec::new(),
        cache_dir: Some(target_dir().join("mailroom-test-cache")),
        repeat: 0,
    })
    .await
    .expect("module loads")
}

fn failure(report: &InvokeReport) -> (FailureKind, String) {
    match &report.invoked.outcome {
        Outcome::Failed(f) => (f.kind, f.reason.clone()),
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn rejected(report: &InvokeReport) -> String {
    match &report.invoked.outcome {
        Outcome::Reject { reason } => reason.clone(),
        other => panic!("expected a reject, got {other:?}"),
    }
}

#[tokio::test]
async fn the_guest_has_no_files_environment_or_network() {
    std::env::set_var("MAILROOM_TEST_SECRET", "visible?");
    let report = run("sandbox", "").await;
    assert_eq!(
        report.invoked.outcome,
        Outcome::Success,
        "the probe reached something: {:?}",
        report.invoked.outcome
    );
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_at_the_timeout() {
    let report = run("loop", "limits = { timeout = \"300ms\" }").await;
    let (kind, _) = failure(&report);
    assert_eq!(kind, FailureKind::Timeout);
    let elapsed = report.invoked.elapsed;
    // Time limit plus one epoch tick (10ms), with slack for a busy 2-core machine.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(450), "{elapsed:?}");
}

#[tokio::test]
async fn a_memory_bomb_is_denied_at_the_limit() {
    let report = run("oom", "limits = { memory = \"8MiB\" }").await;
    let (kind, reason) = failure(&report);
    assert_eq!(kind, FailureKind::OutOfMemory);
    assert!(reason.contains("memory limit of 8388608 bytes"), "{reason}");
}

#[tokio::test]
async fn deep_recursion_traps_cleanly() {
    let report = run("recurse", "").await;
    let (kind, reason) = failure(&report);
    assert!(
        matches!(kind, FailureKind::StackOverflow | FailureKind::Trap),
        "{kind:?}: {reason}"
    );
}

#[tokio::test]
async fn megabytes_of_stdout_are_capped_not_fatal() {
    let start = Instant::now();
    let report = run("stdout:5000000", "limits = { output = \"16KiB\" }").await;
    assert_eq!(report.invoked.outcome, Outcome::Success);
    assert_eq!(
        report.metrics.log_dropped, 1,
        "the overflow is counted once per call"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn publishes_outside_the_grant_are_denied_and_counted() {
    let report = run("publish:secret.x", "publish = { allow = [\"out.>\"] }").await;
    let reason = rejected(&report);
    assert!(reason.contains("publish to secret.x denied"), "{reason}");
    assert_eq!(report.metrics.denied, 1);
    assert!(report.calls.is_empty(), "nothing left the host");
    let report = run("publish:out.ok", "publish = { allow = [\"out.>\"] }").await;
    assert_eq!(report.invoked.outcome, Outcome::Success);
    assert_eq!(report.calls.len(), 1);
}

#[tokio::test]
async fn kv_outside_the_grant_is_denied() {
    let report = run("kv:secrets", "kv = { allow = [\"counts\"] }").await;
    assert!(rejected(&report).contains("KV bucket secrets denied"));
    assert_eq!(report.metrics.denied, 1);
    let report = run("kv:counts", "kv = { allow = [\"counts\"] }").await;
    assert_eq!(report.invoked.outcome, Outcome::Success);
}

#[tokio::test]
async fn publishes_per_message_are_capped() {
    let report = run(
        "publish-many:1000",
        "publish = { allow = [\"out.>\"] }\nlimits = { max_publishes = 10 }",
    )
    .await;
    assert!(rejected(&report).contains("at most 10 publishes per message"));
    assert_eq!(
        report.invoked.publishes.len(),
        10,
        "ten staged, then refused"
    );
    assert!(
        report.calls.is_empty(),
        "a failed attempt's publishes are discarded, never sent"
    );
}

#[tokio::test]
async fn an_oversized_publish_is_refused_with_the_limit() {
    // The in-memory backend accepts 1 MiB, like nats-server's default max_payload.
    let report = run("publish-huge:2000000", "publish = { allow = [\"out.>\"] }").await;
    assert!(rejected(&report).contains("the server accepts at most 1048576 bytes"));
    assert!(report.calls.is_empty());
}

async fn load_error(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("module.wasm");
    std::fs::write(&path, bytes).unwrap();
    let err = invoke(InvokeRequest {
        module: path,
        subject: "s".into(),
        payload: Vec::new(),
        headers: Vec::new(),
        attempt: 1,
        handler: None,
        settings: Default::default(),
        kv_seed: Vec::new(),
        cache_dir: None,
        repeat: 0,
    })
    .await
    .err()
    .expect("the module is refused");
    format!("{err:#}")
}

#[tokio::test]
async fn modules_are_checked_at_load_with_errors_that_name_the_problem() {
    let err = load_error(b"hello").await;
    assert!(err.contains("module.wasm is not WebAssembly"), "{err}");

    let core = wat::parse_str("(module)").unwrap();
    let err = load_error(&core).await;
    assert!(
        err.contains("is a core WebAssembly module, not a component"),
        "{err}"
    );

    let other_world = wat::parse_str("(component)").unwrap();
    let err = load_error(&other_world).await;
    assert!(err.contains("is not a mailroom handler"), "{err}");
    assert!(err.contains("handle"), "{err}");

    let unknown_import = wat::parse_str(
        r#"(component (import "acme:secret/vault@1.0.0" (instance (export "open" (func)))))"#,
    )
    .unwrap();
    let err = load_error(&unknown_import).await;
    assert!(
        err.contains("needs something the host does not provide"),
        "{err}"
    );
    assert!(err.contains("acme:secret/vault@1.0.0"), "{err}");

    // What componentize-js builds by default: the hint names the flags that leave it out.
    let http = wat::parse_str(
        r#"(component (import "wasi:http/outgoing-handler@0.2.0" (instance (export "handle" (func)))))"#,
    )
    .unwrap();
    let err = load_error(&http).await;
    assert!(err.contains("imports wasi:http"), "{err}");
    assert!(err.contains("--disable http fetch-event"), "{err}");
    assert!(err.contains("--backend-qjs-disable-async"), "{err}");
}

#[tokio::test]
async fn a_memory_limit_below_the_initial_memory_says_how_many_mib_are_needed() {
    let text = format!(
        "[[handler]]\nname = \"enrich\"\nmodule = \"{}\"\nstream = \"S\"\nlimits = {{ memory = \"1MiB\" }}\n",
        wasm("enrich").display()
    );
    let handler = mailroom::Config::parse(&text, &workspace())
        .expect("valid")
        .handlers
        .remove(0);
    let started = Instant::now();
    let err = invoke(InvokeRequest {
        module: handler.module.clone(),
        subject: "s".into(),
        payload: Vec::new(),
        headers: Vec::new(),
        attempt: 1,
        handler: Some(handler),
        settings: Default::default(),
        kv_seed: Vec::new(),
        cache_dir: None,
        repeat: 0,
    })
    .await
    .err()
    .expect("refused");
    let err = format!("{err:#}");
    assert!(
        err.contains("more than the handler's memory limit of 1 MiB"),
        "{err}"
    );
    assert!(
        err.contains("raise `limits.memory` to at least \"2MiB\""),
        "{err}"
    );
    assert!(!err.contains("does not compile"), "{err}");
    // Refused before compiling (no cache here): well under a compile of the module.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_trap_without_a_panic_message_keeps_the_guests_last_stderr_lines() {
    let report = run("crash:ValueError: order 7 has no customer", "").await;
    let (kind, reason) = failure(&report);
    assert_eq!(kind, FailureKind::Trap);
    assert!(
        reason.ends_with("flaky: ValueError: order 7 has no customer"),
        "the interpreter's last words are the reason: {reason}"
    );
    assert!(reason.contains("File \"app.py\", line 3"), "{reason}");
}

mod reuse {
    use std::sync::Arc;

    use mailroom::capabilities::{Grants, HandlerCaps, MemoryBackend, Recorded, SubjectPattern};
    use mailroom::runtime::{
        GuestMessage, HandlerModule, Isolation, Limits, Outcome, Runtime, RuntimeConfig, Warm,
    };

    use crate::support::{target_dir, wasm};

    fn module(isolation: Isolation) -> (HandlerModule, Arc<MemoryBackend>) {
        let runtime = Runtime::new(&RuntimeConfig {
            max_instances: 4,
            cache_dir: Some(target_dir().join("mailroom-test-cache")),
            ..RuntimeConfig::default()
        })
        .unwrap();
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        let caps = Arc::new(HandlerCaps {
            name: "flaky".into(),
            grants: Grants {
                publish: vec![SubjectPattern::parse(">").unwrap()],
                kv_buckets: vec![],
            },
            settings: [("output-subject".to_owned(), "out".to_owned())].into(),
            max_publishes: 10,
            log_budget: 1 << 16,
            backend: backend.clone(),
            metrics: Arc::default(),
        });
        let module = runtime
            .load_handler(&wasm("flaky"), Limits::default(), isolation, caps)
            .unwrap();
        (module, backend)
    }

    /// Runs one message; its staged publishes go to `module`'s backend only if it succeeded,
    /// as the consumer does.
    async fn call(module: &HandlerModule, warm: &mut Option<Warm>, payload: &str) -> Outcome {
        let msg = GuestMessage {
            subject: "jobs.x",
            payload: payload.as_bytes(),
            headers: &[],
            stream: "S",
            sequence: 1,
            attempt: 1,
            published_unix_nanos: 0,
            handler: "flaky",
        };
        let invoked = module.invoke(warm, msg, "S".into()).await;
        if invoked.outcome == Outcome::Success {
            for out in &invoked.publishes {
                module
                    .caps()
                    .backend
                    .publish(out)
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
        invoked.outcome
    }

    fn published(backend: &MemoryBackend) -> Vec<String> {
        backend
            .recorded()
            .into_iter()
            .filter_map(|r| match r {
                Recorded::Publish(o) => Some(String::from_utf8(o.payload.to_vec()).unwrap()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_warm_instance_is_reused_up_to_its_limit_and_dropped_after_a_trap() {
        let (module, backend) = module(Isolation::Reuse { max_uses: 3 });
        let mut warm = None;
        for _ in 0..4 {
            assert_eq!(call(&module, &mut warm, "calls").await, Outcome::Success);
        }
        assert!(warm.is_some());
        assert!(matches!(
            call(&module, &mut warm, "trap").await,
            Outcome::Failed(_)
        ));
        assert!(warm.is_none(), "a trapped instance is never entered again");
        assert_eq!(call(&module, &mut warm, "calls").await, Outcome::Success);
        // Three calls per instance, then a fresh one; the trap discarded the second.
        assert_eq!(published(&backend), ["1", "2", "3", "1", "1"]);
    }

    #[tokio::test]
    async fn fresh_isolation_never_shares_state() {
        let (module, backend) = module(Isolation::Fresh);
        let mut warm = None;
        for _ in 0..3 {
            assert_eq!(call(&module, &mut warm, "calls").await, Outcome::Success);
            assert!(warm.is_none());
        }
        assert_eq!(published(&backend), ["1", "1", "1"]);
    }
}
