use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::backoff::{Backoff, OnExhausted, RetryPolicy};
use crate::ordering::{MissingKey, Ordering};
use crate::runtime::Limits;

const MINIMAL: &str = r#"
[[handler]]
name = "enrich"
module = "enrich.wasm"
stream = "ORDERS"
"#;

fn parse(text: &str) -> anyhow::Result<Config> {
    Config::parse(text, Path::new("/etc/mailroom"))
}

fn error(text: &str) -> String {
    format!("{:#}", parse(text).unwrap_err())
}

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.nats.url, "nats://127.0.0.1:4222");
    assert_eq!(c.host.drain_timeout, Duration::from_secs(30));
    let h = &c.handlers[0];
    assert_eq!(h.module, PathBuf::from("/etc/mailroom/enrich.wasm"));
    assert_eq!(h.consumer, "enrich");
    assert_eq!((h.min_workers, h.max_workers), (1, 16));
    assert_eq!(h.ordering, Ordering::Subject);
    assert_eq!(h.on_exhausted, OnExhausted::DeadLetter);
    assert_eq!(
        (h.max_buffered, h.max_keys, h.prefetch, h.max_ack_pending),
        (1000, 1000, None, 10_000)
    );
    assert_eq!(h.partitions, None);
    assert_eq!(h.breaker.trip_after, 20);
    assert_eq!(c.host.lease_ttl, Duration::from_secs(10));
    assert_eq!(h.ack_wait, Duration::from_secs(30));
    assert_eq!(h.retry, RetryPolicy::default());
    assert_eq!(h.limits, Limits::default());
    assert!(
        h.publish_allow.is_empty(),
        "nothing is granted unless configured"
    );
    assert!(h.kv_allow.is_empty());
}

#[test]
fn full_handler_config() {
    // Credential and CA files must exist: they are checked when the config is read.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("user.creds"), "creds").unwrap();
    std::fs::write(dir.path().join("ca.pem"), "pem").unwrap();
    let c = Config::parse(
        r#"
[nats]
url = "nats://a:4222,nats://b:4222"
credentials = "user.creds"
tls = { ca = "ca.pem" }

[host]
drain_timeout = "5s"
cache = false

[[stream]]
name = "ORDERS"
subjects = ["orders.>"]
duplicate_window = "5m"

[[bucket]]
name = "counts"
storage = "memory"

[[handler]]
name = "enrich"
module = "/abs/enrich.wasm"
stream = "ORDERS"
consumer = "enrich-v2"
subjects = ["orders.eu.>"]
concurrency = 4
ordering = "header:Order-Key"
on_missing_key = "subject"
on_exhausted = "block"
ack_wait = "10s"
dead_letter = "dlq.enrich"
retry = { max_attempts = 3, backoff = ["100ms", "1s"], jitter = 0.0 }
limits = { memory = "16MiB", timeout = "2s", max_publishes = 5, output = "1KiB" }
publish = { allow = ["enriched.>"] }
kv = { allow = ["counts"] }
config = { output-subject = "enriched.orders" }
"#,
        dir.path(),
    )
    .unwrap();
    assert_eq!(c.nats.credentials, Some(dir.path().join("user.creds")));
    assert_eq!(
        c.nats.tls.as_ref().unwrap().ca,
        Some(dir.path().join("ca.pem"))
    );
    assert!(c.host.cache_dir.is_none());
    assert_eq!(c.streams[0].duplicate_window, Duration::from_secs(300));
    assert!(c.buckets[0].memory_storage);
    let h = &c.handlers[0];
    assert_eq!(h.module, PathBuf::from("/abs/enrich.wasm"));
    assert_eq!(h.consumer, "enrich-v2");
    assert_eq!(
        (h.min_workers, h.max_workers),
        (4, 4),
        "concurrency fixes the pool"
    );
    assert_eq!(h.ordering, Ordering::Header("Order-Key".into()));
    assert_eq!(h.on_missing_key, MissingKey::Subject);
    assert_eq!(h.on_exhausted, OnExhausted::Block);
    assert_eq!(h.filter_subjects, ["orders.eu.>"]);
    assert_eq!(h.retry.max_attempts, 3);
    assert_eq!(
        h.retry.backoff,
        Backoff::List(vec![Duration::from_millis(100), Duration::from_secs(1)])
    );
    assert_eq!(h.limits.memory, 16 << 20);
    assert_eq!(h.limits.timeout, Duration::from_secs(2));
    assert_eq!(h.max_publishes, 5);
    assert_eq!(h.limits.output_bytes, 1024);
    assert!(h.publish_allow[0].matches("enriched.x"));
    assert_eq!(h.settings["output-subject"], "enriched.orders");
}

#[test]
fn unknown_fields_are_named() {
    let err = error(&format!("{MINIMAL}concurency = 4\n"));
    assert!(err.contains("unknown field `concurency`"), "{err}");
    let err = error("[host]\ndrain = \"1s\"\n");
    assert!(err.contains("unknown field `drain`"), "{err}");
}

#[test]
fn bad_values_name_handler_and_field() {
    let cases = [
        (
            "ack_wait = \"soon\"",
            "handler \"enrich\": ack_wait: \"soon\" is not a duration",
        ),
        (
            "concurrency = 0",
            "concurrency/min_workers must be between 1 and 4096",
        ),
        (
            "concurrency = 2\nmax_workers = 4",
            "cannot be combined with min_workers/max_workers",
        ),
        (
            "min_workers = 8\nmax_workers = 4",
            "min_workers (8) is above max_workers (4)",
        ),
        (
            "ordering = \"random\"",
            "ordering: \"random\" is not an ordering",
        ),
        ("on_exhausted = \"panic\"", "on_exhausted must be"),
        (
            "ordering = \"none\"\non_exhausted = \"block\"",
            "needs an ordering",
        ),
        ("on_missing_key = \"drop\"", "on_missing_key must be"),
        (
            "max_buffered = 4",
            "max_buffered (4) is below max_workers (16)",
        ),
        (
            "max_ack_pending = 10",
            "max_ack_pending (10) is below max_buffered (1000)",
        ),
        (
            "dead_letter = \"dlq.*\"",
            "dead_letter: \"dlq.*\" contains the wildcard",
        ),
        (
            "limits = { memory = \"lots\" }",
            "limits.memory: \"lots\" is not a size",
        ),
        (
            "limits = { memory = \"100KiB\" }",
            "limits.memory must be between 1MiB and 4GiB",
        ),
        (
            "retry = { max_attempts = 0 }",
            "retry.max_attempts must be at least 1",
        ),
        ("retry = { backoff = [] }", "retry.backoff is empty"),
        (
            "retry = { backoff = [\"1s\"], initial = \"1s\" }",
            "cannot be combined",
        ),
        (
            "retry = { initial = \"10s\", max = \"1s\" }",
            "retry.max (1s) is below retry.initial",
        ),
        (
            "publish = { allow = [\"a..b\"] }",
            "publish.allow: \"a..b\" has an empty token",
        ),
        (
            "consumer = \"my.consumer\"",
            "consumer name \"my.consumer\" is not valid",
        ),
    ];
    for (line, expected) in cases {
        let err = error(&format!("{MINIMAL}{line}\n"));
        assert!(err.contains(expected), "{line}: {err}");
    }
}

#[test]
fn structural_errors() {
    assert!(error("").contains("no handlers"));
    let twice = format!("{MINIMAL}{MINIMAL}");
    assert!(error(&twice).contains("two handlers are named \"enrich\""));
    let err = error(&format!(
        "[nats]\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"\n{MINIMAL}"
    ));
    assert!(err.contains("choose one of"), "{err}");
    let err = error(&format!("[nats]\nuser = \"u\"\n{MINIMAL}"));
    assert!(err.contains("user and password go together"), "{err}");
    let err = error(&format!(
        "[[stream]]\nname = \"S\"\nsubjects = []\n{MINIMAL}"
    ));
    assert!(err.contains("stream \"S\": subjects is empty"), "{err}");
    let err = error("[[handler]]\nname = \"x\"\n");
    assert!(err.contains("missing field `module`"), "{err}");
}

#[test]
fn secrets_are_not_in_debug_output() {
    let c = parse(&format!(
        "[nats]\nuser = \"alice\"\npassword = \"hunter2\"\n{MINIMAL}"
    ))
    .unwrap();
    let shown = format!("{:?}", c.nats);
    assert!(shown.contains("alice"));
    assert!(!shown.contains("hunter2"), "{shown}");
    let c = parse(&format!("[nats]\ntoken = \"s3cret\"\n{MINIMAL}")).unwrap();
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn partitions_need_an_ordering_by_subject() {
    let with = |extra: &str| format!("{MINIMAL}partitions = 16\n{extra}");
    let c = parse(&with("")).unwrap();
    assert_eq!(c.handlers[0].partitions, Some(16));
    assert!(parse(&with("ordering = \"subject-tokens:2..3\"")).is_ok());
    let header = error(&with("ordering = \"header:Order-Key\""));
    assert!(
        header.contains("the server computes a message's partition from its subject")
            && header.contains("subject-tokens"),
        "{header}"
    );
    let none = error(&with("ordering = \"none\""));
    assert!(none.contains("remove partitions"), "{none}");
    assert!(error(&format!("{MINIMAL}partitions = 0")).contains("between 1 and 1024"));
    assert!(error(&format!("{MINIMAL}partitions = 1025")).contains("between 1 and 1024"));
}

#[test]
fn push_queue_needs_a_deliver_group_and_no_partitions() {
    let with = |extra: &str| format!("{MINIMAL}{extra}");
    assert_eq!(
        parse(MINIMAL).unwrap().handlers[0].consumer_kind,
        ConsumerKind::Pull
    );
    let c = parse(&with(
        "consumer_kind = \"push-queue\"\ndeliver_group = \"workers\"",
    ))
    .unwrap();
    assert_eq!(
        c.handlers[0].consumer_kind,
        ConsumerKind::PushQueue {
            deliver_group: "workers".into()
        }
    );
    let missing = error(&with("consumer_kind = \"push-queue\""));
    assert!(missing.contains("needs deliver_group"), "{missing}");
    let stray = error(&with("deliver_group = \"workers\""));
    assert!(
        stray.contains("add consumer_kind = \"push-queue\""),
        "{stray}"
    );
    let partitioned = error(&with(
        "consumer_kind = \"push-queue\"\ndeliver_group = \"workers\"\npartitions = 4",
    ));
    assert!(
        partitioned.contains("cannot use a push consumer"),
        "{partitioned}"
    );
    let bad = error(&with("consumer_kind = \"push\""));
    assert!(bad.contains("\"pull\" or \"push-queue\""), "{bad}");
    let dotted = error(&with(
        "consumer_kind = \"push-queue\"\ndeliver_group = \"a.b\"",
    ));
    assert!(dotted.contains("one token"), "{dotted}");
}

#[test]
fn breaker_and_host_lease_settings_are_checked() {
    let c = parse(&format!(
        "[host]\nid = \"edge-1\"\nlease_ttl = \"20s\"\n{MINIMAL}breaker = {{ trip_after = 5, first_probe = \"2s\", max_probe = \"30s\" }}\n"
    ))
    .unwrap();
    assert_eq!(c.host.id.as_deref(), Some("edge-1"));
    assert_eq!(c.host.lease_ttl, Duration::from_secs(20));
    let b = c.handlers[0].breaker;
    assert_eq!(
        (b.trip_after, b.first_probe, b.max_probe),
        (5, Duration::from_secs(2), Duration::from_secs(30))
    );
    assert!(error(&format!(
        "{MINIMAL}breaker = {{ first_probe = \"1m\", max_probe = \"1s\" }}"
    ))
    .contains("breaker.first_probe"));
    assert!(error(&format!("[host]\nlease_ttl = \"1s\"\n{MINIMAL}")).contains("lease_ttl"));
    assert!(error(&format!("[host]\nid = \"a b\"\n{MINIMAL}")).contains("host: id"));
}

const WITH_STREAM: &str = r#"
[[stream]]
name = "ORDERS"
subjects = ["orders.>"]

[[stream]]
name = "DLQ"
subjects = ["dlq.>"]

[[handler]]
name = "enrich"
module = "enrich.wasm"
stream = "ORDERS"
"#;

#[test]
fn a_dead_letter_subject_that_feeds_the_handler_is_refused() {
    let looped = error(&format!("{WITH_STREAM}dead_letter = \"orders.dead\"\n"));
    assert!(
        looped.contains("captured by its own stream ORDERS") && looped.contains("a loop"),
        "{looped}"
    );
    // Filtered away from the dead-letter subject: no loop.
    assert!(parse(&format!(
        "{WITH_STREAM}dead_letter = \"orders.dead\"\nsubjects = [\"orders.eu.>\"]\n"
    ))
    .is_ok());
    assert!(parse(&format!("{WITH_STREAM}dead_letter = \"dlq.enrich\"\n")).is_ok());
}

#[test]
fn a_filter_outside_the_stream_and_overlapping_streams_are_refused() {
    let outside = error(&format!("{WITH_STREAM}subjects = [\"payments.>\"]\n"));
    assert!(
        outside.contains("matches none of stream ORDERS"),
        "{outside}"
    );
    let overlapping = error(&format!(
        "[[stream]]\nname = \"A\"\nsubjects = [\"x.>\"]\n[[stream]]\nname = \"B\"\nsubjects = [\"x.y\"]\n{MINIMAL}"
    ));
    assert!(
        overlapping.contains("streams \"A\" and \"B\" both capture"),
        "{overlapping}"
    );
}

#[test]
fn settings_without_effect_are_warned_about() {
    let c = parse(&format!(
        "{WITH_STREAM}prefetch = 10\nkv = {{ allow = [\"nowhere\"] }}\ndead_letter = \"elsewhere.x\"\nlimits = {{ max_publishes = 0 }}\n"
    ))
    .unwrap();
    let all = c.warnings.join("\n");
    for expected in [
        "prefetch has no effect on an ordered handler",
        "bucket \"nowhere\", which no [[bucket]] declares",
        "dead_letter \"elsewhere.x\" is captured by no [[stream]]",
        "max_publishes = 0 refuses every publish",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
    }
    assert!(parse(WITH_STREAM).unwrap().warnings.is_empty());
}

#[test]
fn server_lists_addresses_and_files_are_checked_up_front() {
    let c = parse(&format!(
        "[nats]\nurl = \"nats://a:4222, nats://b:4223\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(server_addrs(&c.nats.url).unwrap().len(), 2);
    assert!(error(&format!("[nats]\nurl = \"http://a:4222\"\n{MINIMAL}")).contains("scheme"));
    assert!(error(&format!("[nats]\nurl = \"nats://a:99999\"\n{MINIMAL}")).contains("nats.url"));
    let missing = error(&format!("[nats]\ncredentials = \"nope.creds\"\n{MINIMAL}"));
    assert!(
        missing.contains("nats.credentials") && missing.contains("does not exist"),
        "{missing}"
    );
    assert!(
        error(&format!("[host]\nmetrics_addr = \"localhost\"\n{MINIMAL}")).contains("metrics_addr")
    );
    let c = parse(&format!("[nats]\nconnect_timeout = \"0s\"\n{MINIMAL}")).unwrap();
    assert_eq!(c.nats.connect_timeout, None, "0 waits forever");
}

/// The README's configuration reference parses as it is, and with any one commented-out
/// setting uncommented (the files it names exist).
#[test]
fn the_readme_reference_is_valid_with_any_one_line_uncommented() {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("```toml\n[nats]")
        .expect("the README has a configuration reference");
    let block = &readme[start + 8..];
    let block = &block[..block.find("```").expect("the block ends")];
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "user.creds",
        "user.nk",
        "ca.pem",
        "client.pem",
        "client-key.pem",
    ] {
        std::fs::write(dir.path().join(file), "x").unwrap();
    }
    let lines: Vec<&str> = block.lines().collect();
    Config::parse(block, dir.path()).unwrap_or_else(|e| panic!("the reference: {e:#}"));
    let mut tried = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(setting) = line.trim_start().strip_prefix("# ") else {
            continue;
        };
        if !setting.contains(" = ") || setting.starts_with("One ") {
            continue;
        }
        let mut text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        text[i] = setting.to_owned();
        let text = text.join("\n");
        // `user` and `password` go together.
        let text = text
            .replace(
                "# user = \"alice\"",
                if setting.starts_with("password") {
                    "user = \"alice\""
                } else {
                    "# user = \"alice\""
                },
            )
            .replace(
                "# password = \"s3cret\"",
                if setting.starts_with("user") {
                    "password = \"s3cret\""
                } else {
                    "# password = \"s3cret\""
                },
            );
        // So do `consumer_kind = "push-queue"` and `deliver_group`.
        let pair = |other: &str| {
            if setting.starts_with("consumer_kind") || setting.starts_with("deliver_group") {
                other.trim_start_matches("# ").to_owned()
            } else {
                other.to_owned()
            }
        };
        let text = text
            .replace(
                "# consumer_kind = \"push-queue\"",
                &pair("# consumer_kind = \"push-queue\""),
            )
            .replace(
                "# deliver_group = \"enrich-workers\"",
                &pair("# deliver_group = \"enrich-workers\""),
            );
        Config::parse(&text, dir.path())
            .unwrap_or_else(|e| panic!("uncommenting {setting:?} breaks the reference: {e:#}"));
        tried += 1;
    }
    assert!(tried > 30, "only {tried} settings found");
}

#[test]
fn operating_keys_default_and_are_checked() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.host.on_handler_error, OnHandlerError::Retry);
    assert_eq!(c.host.summary_interval, Some(Duration::from_secs(30)));
    assert_eq!(c.telemetry, TelemetryConfig::default());

    let c = parse(&format!(
        "[host]\non_handler_error = \"exit\"\nsummary_interval = \"0s\"\n\
         [telemetry]\notlp_endpoint = \"http://otel:4318\"\nservice_name = \"orders\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.host.on_handler_error, OnHandlerError::Exit);
    assert_eq!(c.host.summary_interval, None, "0s turns the summary off");
    assert_eq!(
        c.telemetry.otlp_endpoint.as_deref(),
        Some("http://otel:4318/v1/traces")
    );
    assert_eq!(c.telemetry.service_name.as_deref(), Some("orders"));

    for (text, expected) in [
        (
            "[host]\non_handler_error = \"ignore\"\n",
            "on_handler_error must be \"exit\", \"retry\" or \"continue\", got \"ignore\"",
        ),
        (
            "[host]\nsummary_interval = \"10ms\"\n",
            "summary_interval must be at least 100ms",
        ),
        (
            "[telemetry]\notlp_endpoint = \"https://otel:4318\"\n",
            "telemetry: otlp_endpoint: \"https://otel:4318\" uses https",
        ),
        (
            "[telemetry]\nendpoint = \"x\"\n",
            "unknown field `endpoint`",
        ),
    ] {
        let err = error(&format!("{text}{MINIMAL}"));
        assert!(err.contains(expected), "{text}: {err}");
    }
}
