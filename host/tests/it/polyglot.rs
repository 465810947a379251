//! Handlers in other languages and versions, without NATS: Python and JavaScript `enrich`
//! publish byte for byte what the Rust one does, a Python component runs at full concurrency,
//! and a component built against `mailroom:handler@0.1.0` still runs.
//!
//! The Python and JavaScript modules are built by `cargo xtask guests`. When their toolchain
//! could not be installed (the package registry was unreachable), xtask says why in
//! `<target>/guest-tools/<lang>.unavailable` and these tests skip with that reason; a module
//! that is missing without such a note fails the test.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mailroom::capabilities::{
    Grants, HandlerCaps, MemoryBackend, Outbound, Recorded, SubjectPattern,
};
use mailroom::config::HandlerConfig;
use mailroom::invoke::{invoke, InvokeReport, InvokeRequest};
use mailroom::runtime::{GuestMessage, Isolation, Limits, Outcome, Runtime, RuntimeConfig};

use crate::support::{target_dir, wasm, workspace};

/// One compile at a time: the first test to load a large module compiles it into the shared
/// cache, the next one reads it from there instead of compiling it again at the same time.
static LOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The built module `name` of language `lang` (`py`, `js`), or `None` (with the reason
/// printed) when xtask could not install that language's toolchain.
pub fn guest(name: &str, lang: &str) -> Option<PathBuf> {
    let path = target_dir()
        .join("wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    if path.exists() {
        return Some(path);
    }
    let marker = target_dir().join(format!("guest-tools/{lang}.unavailable"));
    match std::fs::read_to_string(&marker) {
        Ok(reason) => {
            eprintln!(
                "SKIPPED: {name}.wasm was not built because its toolchain could not be \
                 installed: {}",
                reason.trim()
            );
            None
        }
        Err(_) => panic!(
            "{} is missing: build it with `cargo xtask guests` (or run the suite with \
             `cargo xtask test`)",
            path.display()
        ),
    }
}

fn enrich_config(module: &std::path::Path) -> HandlerConfig {
    let text = format!(
        "[[handler]]\nname = \"enrich\"\nmodule = \"{}\"\nstream = \"ORDERS\"\nordering = \
         \"none\"\npublish = {{ allow = [\"enriched.>\"] }}\nconfig = {{ output-subject = \
         \"enriched.orders\" }}\n",
        module.display()
    );
    mailroom::Config::parse(&text, &workspace())
        .expect("valid")
        .handlers
        .remove(0)
}

async fn enrich(module: &std::path::Path, payload: &str) -> InvokeReport {
    let handler = enrich_config(module);
    invoke(InvokeRequest {
        module: handler.module.clone(),
        subject: "orders.eu".into(),
        payload: payload.as_bytes().to_vec(),
        headers: Vec::new(),
        attempt: 2,
        handler: Some(handler),
        settings: Default::default(),
        kv_seed: Vec::new(),
        cache_dir: Some(target_dir().join("mailroom-test-cache")),
        repeat: 0,
    })
    .await
    .unwrap_or_else(|err| panic!("{} loads: {err:#}", module.display()))
}

/// What a run did that another language must do identically: ok or rejected, and every
/// publish's subject, headers, id and payload bytes.
fn observed(report: &InvokeReport) -> (&'static str, Vec<Outbound>) {
    let outcome = match &report.invoked.outcome {
        Outcome::Success => "ok",
        Outcome::Reject { .. } => "reject",
        other => panic!("enrich neither succeeded nor rejected: {other:?}"),
    };
    let publishes = report
        .calls
        .iter()
        .filter_map(|c| match c {
            Recorded::Publish(out) => Some(out.clone()),
            _ => None,
        })
        .collect();
    (outcome, publishes)
}

const ORDERS: &[&str] = &[
    r#"{"id":7,"amount_cents":250000}"#,
    r#"{"id":1,"amount_cents":0,"currency":"EUR","lines":[{"sku":"a-1","qty":2,"price":19.99}]}"#,
    r#"{"amount_cents":99999,"note":"héllo € 𝄞 \"quoted\" \\ back\nslash\t\u0001","customer":{"name":"Zoë","tags":["a","b"]}}"#,
    r#"{"amount_cents":10000,"z":null,"a":false,"M":1,"é":2,"𝄞":3,"￿":4,"":5}"#,
    r#"{"amount_cents":-5,"id":2}"#,
    r#"{"amount_cents":"12","id":3}"#,
    r#"{"amount_cents":12.5,"id":4}"#,
    r#"{"source":"overwritten","enriched_by":"me","tier":"kept?"}"#,
    r#"{"id":5,"id":6}"#,
    r#"{}"#,
    r#"not json"#,
    r#"[1,2,3]"#,
    r#""a string""#,
    "",
];

#[tokio::test]
async fn python_and_javascript_enrich_publish_byte_for_byte_what_rust_enrich_does() {
    let rust = wasm("enrich");
    let others: Vec<PathBuf> = [guest("enrich-py", "py"), guest("enrich-js", "js")]
        .into_iter()
        .flatten()
        .collect();
    if others.is_empty() {
        return;
    }
    let _one_compile_at_a_time = LOADING.lock().await;
    for payload in ORDERS {
        let expected = enrich(&rust, payload).await;
        let (outcome, publishes) = observed(&expected);
        for other in &others {
            let report = enrich(other, payload).await;
            let (their_outcome, theirs) = observed(&report);
            assert_eq!(
                their_outcome,
                outcome,
                "{} on {payload:?}: {:?}",
                other.display(),
                report.invoked.outcome
            );
            assert_eq!(theirs.len(), publishes.len(), "{}", other.display());
            for (mine, theirs) in publishes.iter().zip(&theirs) {
                assert_eq!(
                    String::from_utf8_lossy(&theirs.payload),
                    String::from_utf8_lossy(&mine.payload),
                    "{} on {payload:?}",
                    other.display()
                );
                assert_eq!(theirs, mine, "{} on {payload:?}", other.display());
            }
        }
    }
}

#[tokio::test]
async fn sixteen_python_instances_run_at_once_on_a_pool_sized_for_sixteen() {
    let Some(module) = guest("enrich-py", "py") else {
        return;
    };
    const WORKERS: usize = 16;
    // Exactly one pool slot per worker, no headroom: a componentize-py component holds 14
    // core instances, so a pool counting 8 per slot ran out at the 12th instance.
    let runtime = Runtime::new(&RuntimeConfig {
        max_instances: WORKERS as u32,
        cache_dir: Some(target_dir().join("mailroom-test-cache")),
        ..RuntimeConfig::default()
    })
    .unwrap();
    // Each worker keeps its warm instance (`isolation = "reuse"`), so after the calls all
    // sixteen instances are alive at once in a pool of sixteen slots.
    let memory = Arc::new(MemoryBackend::new(1 << 20));
    let caps = Arc::new(HandlerCaps {
        name: "enrich".into(),
        grants: Grants {
            publish: vec![SubjectPattern::parse(">").unwrap()],
            kv_buckets: vec![],
        },
        settings: [("output-subject".to_owned(), "out".to_owned())].into(),
        max_publishes: 10,
        log_budget: 1 << 16,
        backend: memory.clone(),
        metrics: Arc::default(),
    });
    let module = {
        let _one_compile_at_a_time = LOADING.lock().await;
        runtime
            .load_handler(
                &module,
                Limits::default(),
                Isolation::Reuse { max_uses: 100 },
                caps,
            )
            .unwrap()
    };
    let payloads: Vec<String> = (0..WORKERS)
        .map(|i| format!(r#"{{"id":{i},"amount_cents":{}}}"#, i * 1000))
        .collect();
    let mut warm: Vec<_> = (0..WORKERS).map(|_| None).collect();
    let calls = warm
        .iter_mut()
        .zip(&payloads)
        .enumerate()
        .map(|(i, (warm, payload))| {
            let module = &module;
            async move {
                let msg = GuestMessage {
                    subject: "orders.eu",
                    payload: payload.as_bytes(),
                    headers: &[],
                    stream: "ORDERS",
                    sequence: i as u64 + 1,
                    attempt: 1,
                    published_unix_nanos: 0,
                    handler: "enrich",
                };
                module.invoke(warm, msg, "ORDERS".into()).await
            }
        });
    let invoked = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(calls))
        .await
        .expect("sixteen calls finish");
    for run in &invoked {
        assert_eq!(
            run.outcome,
            Outcome::Success,
            "an instance that could not be created fails"
        );
        assert_eq!(run.publishes.len(), 1);
    }
    assert!(
        warm.iter().all(Option::is_some),
        "sixteen Python instances are alive at once"
    );
}

#[tokio::test]
async fn a_component_built_against_mailroom_handler_0_1_0_still_runs() {
    let report = invoke(InvokeRequest {
        module: wasm("compat_v0_1"),
        subject: "orders.eu".into(),
        payload: Vec::new(),
        headers: Vec::new(),
        attempt: 1,
        handler: None,
        settings: [("output-subject".to_owned(), "counts.out".to_owned())].into(),
        kv_seed: vec![("counts".into(), "orders.eu".into(), b"41".to_vec())],
        cache_dir: Some(target_dir().join("mailroom-test-cache")),
        repeat: 0,
    })
    .await
    .expect("a 0.1.0 component loads");
    assert_eq!(report.invoked.outcome, Outcome::Success);
    let kinds: Vec<String> = report
        .calls
        .iter()
        .map(|c| match c {
            Recorded::KvGet { found, .. } => format!("get {:?}", found.as_ref().map(|e| &e.value)),
            Recorded::KvPut { value, .. } => format!("put {}", String::from_utf8_lossy(value)),
            Recorded::Publish(out) => format!("publish {}", String::from_utf8_lossy(&out.payload)),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            format!("get {:?}", Some(b"41".to_vec())),
            "put 42".to_owned(),
            "publish 42".to_owned()
        ]
    );
}
