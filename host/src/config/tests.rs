use super::*;

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
        (1000, 1000, 1000, 10_000)
    );
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
    let c = parse(
        r#"
[nats]
url = "nats://a:4222,nats://b:4222"
credentials = "user.creds"
tls = { ca = "/pki/ca.pem" }

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
    )
    .unwrap();
    assert_eq!(
        c.nats.credentials,
        Some(PathBuf::from("/etc/mailroom/user.creds"))
    );
    assert_eq!(
        c.nats.tls.as_ref().unwrap().ca,
        Some(PathBuf::from("/pki/ca.pem"))
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
