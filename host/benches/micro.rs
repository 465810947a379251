//! Micro-benchmarks of the per-message costs the host adds: scheduling a message through the
//! keyed executor, a fresh (or reused) instance plus call of a no-op handler, and the same for
//! the `enrich` example (JSON in, one publish out, into an in-memory backend: the wasm side of
//! the `mailroom-enrich` benchmark without NATS).
//!
//! `cargo bench -p mailroom` (the guests must be built: `cargo xtask guests`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mailroom::capabilities::{Grants, HandlerCaps, MemoryBackend, SubjectPattern};
use mailroom::executor::lanes::Lanes;
use mailroom::runtime::{GuestMessage, Isolation, Limits, Runtime, RuntimeConfig};

fn executor(c: &mut Criterion) {
    let mut group = c.benchmark_group("executor");
    for keys in [1usize, 100_000] {
        let names: Vec<String> = (0..keys).map(|k| format!("orders.{k}")).collect();
        group.bench_function(format!("push+next+done, {keys} keys"), |b| {
            b.iter_batched_ref(
                || {
                    // A lane per key already holds one message, as under a steady backlog.
                    let mut lanes: Lanes<u64> = Lanes::default();
                    for (i, name) in names.iter().enumerate() {
                        lanes.push(Some(name), i as u64, 0);
                    }
                    (lanes, names.len() as u64)
                },
                |(lanes, seq)| {
                    let now = Instant::now();
                    for i in 0..1000u64 {
                        *seq += 1;
                        let key = &names[(i as usize * 7919) % names.len()];
                        lanes.push(Some(key), *seq, i);
                        let ticket = lanes.next(now).expect("a ready lane");
                        lanes.done(ticket.key.as_ref(), ticket.seq);
                    }
                },
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

fn guest_wasm(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join(format!("wasm32-wasip2/release/{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask guests`",
        path.display()
    );
    path
}

fn instance(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let runtime = Runtime::new(&RuntimeConfig {
        max_instances: 4,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let caps = Arc::new(HandlerCaps {
        name: "noop".into(),
        grants: Grants::default(),
        settings: Default::default(),
        max_publishes: 1,
        log_budget: 1024,
        backend: Arc::new(MemoryBackend::new(1 << 20)),
        metrics: Arc::default(),
    });
    let mut group = c.benchmark_group("instance");
    for (name, isolation) in [
        ("fresh instance + call", Isolation::Fresh),
        (
            "reused instance + call",
            Isolation::Reuse { max_uses: u32::MAX },
        ),
    ] {
        let module = runtime
            .load_handler(
                &guest_wasm("noop"),
                Limits::default(),
                isolation,
                caps.clone(),
            )
            .expect("noop loads");
        let stream: Arc<str> = "S".into();
        let mut warm = None;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let msg = GuestMessage {
                            subject: "orders.1",
                            payload: b"{}",
                            headers: &[],
                            stream: "S",
                            sequence: 1,
                            attempt: 1,
                            published_unix_nanos: 0,
                            handler: "noop",
                        };
                        let invoked = module.invoke(&mut warm, msg, stream.clone()).await;
                        assert!(matches!(
                            invoked.outcome,
                            mailroom::runtime::Outcome::Success
                        ));
                    }
                    start.elapsed()
                })
            });
        });
    }
    let enrich_caps = Arc::new(HandlerCaps {
        name: "enrich".into(),
        grants: Grants {
            publish: vec![SubjectPattern::parse("enriched.>").expect("pattern")],
            kv_buckets: Vec::new(),
        },
        settings: [("output-subject".to_owned(), "enriched.orders".to_owned())].into(),
        max_publishes: 1,
        log_budget: 1024,
        backend: Arc::new(MemoryBackend::new(1 << 20)),
        metrics: Arc::default(),
    });
    let enrich = runtime
        .load_handler(
            &guest_wasm("enrich"),
            Limits::default(),
            Isolation::Fresh,
            enrich_caps,
        )
        .expect("enrich loads");
    let stream: Arc<str> = "S".into();
    group.bench_function("enrich: fresh instance + call + publish", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let msg = GuestMessage {
                        subject: "orders.k7",
                        payload: br#"{"id":7,"customer":"c-7","amount_cents":250000}"#,
                        headers: &[],
                        stream: "S",
                        sequence: 7,
                        attempt: 1,
                        published_unix_nanos: 0,
                        handler: "enrich",
                    };
                    let invoked = enrich.invoke(&mut None, msg, stream.clone()).await;
                    assert!(matches!(
                        invoked.outcome,
                        mailroom::runtime::Outcome::Success
                    ));
                    assert_eq!(invoked.publishes.len(), 1);
                }
                start.elapsed()
            })
        });
    });
    group.finish();
}

criterion_group!(benches, executor, instance);
criterion_main!(benches);
