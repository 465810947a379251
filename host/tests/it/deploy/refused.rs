//! Revisions that fail a check (the deploy command's, or the host's) never replace the
//! running one.

use std::collections::BTreeMap;
use std::time::Duration;

use mailroom::registry::{commands, view, Registry};

use super::*;
use crate::support::{wait_until, wasm, Env};

/// A component with the `handle` export of the `mailroom:handler` world whose start-up
/// traps: it compiles and links, and fails only when instantiated.
fn traps_when_instantiated() -> Vec<u8> {
    wat::parse_str(
        r#"(component
  (core module $m
    (memory (export "memory") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 8)
    (func (export "handle")
      (param i32 i32 i32 i32 i32 i32 i32 i32 i64 i32 i64 i32 i32) (result i32)
      i32.const 0)
    (func $start unreachable)
    (start $start))
  (core instance $i (instantiate $m))
  (type $header' (record (field "name" string) (field "values" (list string))))
  (export $header "header" (type $header'))
  (type $message' (record
    (field "subject" string) (field "payload" (list u8)) (field "headers" (list $header))
    (field "stream" string) (field "sequence" u64) (field "attempt" u32)
    (field "published-unix-nanos" s64) (field "handler" string)))
  (export $message "message" (type $message'))
  (type $retry-info' (record (field "reason" string) (field "delay-ms" (option u64))))
  (export $retry-info "retry-info" (type $retry-info'))
  (type $handler-error' (variant (case "retry" $retry-info) (case "reject" string)))
  (export $handler-error "handler-error" (type $handler-error'))
  (alias core export $i "memory" (core memory $memory))
  (alias core export $i "realloc" (core func $realloc))
  (alias core export $i "handle" (core func $core-handle))
  (func $handle (param "msg" $message) (result (result (error $handler-error)))
    (canon lift (core func $core-handle) (memory $memory) (realloc $realloc)))
  (export "handle" (func $handle)))"#,
    )
    .expect("the test component is valid")
}

#[tokio::test]
async fn revisions_that_fail_a_check_never_replace_the_running_one() {
    let env = Env::new().await;
    let registry = Registry::open(&env.js, 1).await.unwrap();
    let h = env
        .start(host_config(&env, "a", "kv = { allow = [\"counts\"] }"))
        .await;
    let good = wasm("flaky");
    deploy(&registry, "h", &good, sets("h", "v1", &[]), &[]).await;
    rollout(&registry, "h").await;
    let load = Load::start(&env.js, &["h"], 1, Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();

    // What the deploy command refuses itself, naming the problem...
    let core = wat::parse_str("(module)").unwrap();
    let trapping = traps_when_instantiated();
    let broken: [(&str, Vec<u8>, &str); 4] = [
        (
            "not wasm",
            b"#!/bin/sh\necho hello\n".to_vec(),
            "is not WebAssembly",
        ),
        (
            "a core module",
            core,
            "is a core WebAssembly module, not a component",
        ),
        (
            "another world",
            wat::parse_str("(component)").unwrap(),
            "is not a mailroom handler",
        ),
        ("a trap at start-up", trapping, "fails when instantiated"),
    ];
    for (what, bytes, says) in &broken {
        let path = dir.path().join("broken.wasm");
        std::fs::write(&path, bytes).unwrap();
        let err = commands::check(&commands::DeployRequest {
            name: "h".into(),
            module: path,
            handler_config: None,
            sets: sets("h", "v2", &[]),
            labels: BTreeMap::new(),
            cache_dir: None,
        })
        .await
        .expect_err(what);
        let err = format!("{err:#}");
        assert!(err.contains(says), "{what}: {err}");
        println!("deploy refuses {what}: {err}");
    }

    // ...and what the host refuses when such a revision reaches it anyway, or one that asks
    // for more than the host grants, or whose module object does not match its hash. Each
    // is written, then refused (with the reason reported) while revision 1 keeps running.
    let bad = |extra: &[(&str, &str)]| sets("h", "broken", extra);
    let flaky_ref = registry
        .upload(&std::fs::read(&good).unwrap())
        .await
        .unwrap()
        .0;
    let corrupt = mailroom::registry::ModuleRef::of(b"the bytes that were deployed");
    registry
        .modules
        .put(corrupt.object_name().as_str(), &mut &b"other bytes"[..])
        .await
        .unwrap();
    let mut refusals = 0;
    for (what, bytes, says) in &broken {
        let revision = write_unchecked(&registry, "h", bytes, bad(&[])).await;
        refused(&registry, revision, what, says).await;
        refusals += 1;
    }
    for (what, extra, says) in [
        (
            "a publish grant beyond the host's ceiling",
            ("publish.allow", "[\"out.h\", \"execs.>\", \"billing.>\"]"),
            "publish.allow \"billing.>\"",
        ),
        (
            "a KV grant beyond the host's ceiling",
            ("kv.allow", "[\"secrets\"]"),
            "kv.allow \"secrets\"",
        ),
        (
            "more memory than the host allows",
            ("limits.memory", "\"512MiB\""),
            "deploy.max_memory",
        ),
    ] {
        let mut spec = bad(&[]);
        spec.retain(|(k, _)| k != extra.0);
        spec.push((extra.0.to_owned(), extra.1.to_owned()));
        let revision = write_spec(&registry, "h", flaky_ref.clone(), spec).await;
        refused(&registry, revision, what, says).await;
        refusals += 1;
    }
    let revision = write_spec(&registry, "h", corrupt, bad(&[])).await;
    refused(&registry, revision, "a corrupt module object", "is corrupt").await;
    let listing = view::list(&registry).await.unwrap().to_string();
    println!("{listing}");
    assert!(
        listing.contains(&format!("runs 1; revision {revision} FAILED")),
        "{listing}"
    );
    assert_eq!(swaps(&h, "h"), Some(0), "never swapped");

    // A good revision after all that runs (it is a hot swap from revision 1).
    load.phase(1);
    let fixed = deploy(&registry, "h", &good, sets("h", "v2", &[]), &[]).await;
    assert_eq!(fixed.revision, revision + 1);
    rollout(&registry, "h").await;
    assert_eq!(
        report(&registry, "a", "h").await,
        (Some(fixed.revision), None)
    );
    load.phase(2);
    let done = h.metrics("h").succeeded;
    wait_until("load on v2", Duration::from_secs(20), || {
        h.metrics("h").succeeded > done + 50
    })
    .await;
    let sent = load.stop().await;
    wait_for_outputs(&env, sent).await;
    let run = read_run(&env, "h").await;
    run.check_once_in_order("h");
    for (_, seq, version) in &run.outputs {
        assert_ne!(version, "broken", "input {seq} ran on a refused revision");
        if run.inputs[seq].1 == 2 {
            assert_eq!(
                version, "v2",
                "input {seq}, sent once revision {} ran",
                fixed.revision
            );
        }
    }
    println!(
        "{} inputs, {refusals} broken revisions and a corrupt module refused: each input run \
         once, none on a refused revision",
        run.inputs.len()
    );
    h.stop().await;
}
