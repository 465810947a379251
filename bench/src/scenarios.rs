//! The scenarios of the suites: who drains the stream, with what payload, how many messages
//! over how many subjects, and what each is compared with. [`crate::runner`] runs them.

use bytes::Bytes;

/// Which suite a scenario belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    /// Mailroom against hand-written consumers.
    Compare,
    /// Ordered against unordered.
    Ordering,
    /// Mailroom against another WebAssembly host (wasmCloud), side by side.
    Peers,
    /// One partitioned handler on 1, 2 and 3 hosts.
    Partitions,
}

/// What each message carries.
#[derive(Debug, Clone, Copy)]
pub enum Payload {
    /// This many filler bytes.
    Filler(usize),
    /// A JSON order, `{"id":n,"customer":"c-n","amount_cents":m}`.
    Orders,
    /// A fixed text (e.g. a command for `flaky`).
    Text(&'static str),
}

impl Payload {
    /// The payload of message `n`.
    pub fn message(self, n: u64) -> Bytes {
        match self {
            Payload::Filler(size) => Bytes::from(vec![b'x'; size]),
            Payload::Orders => {
                let cents = (n * 7919) % 250_000;
                Bytes::from(format!(
                    r#"{{"id":{n},"customer":"c-{n}","amount_cents":{cents}}}"#
                ))
            }
            Payload::Text(text) => Bytes::from_static(text.as_bytes()),
        }
    }

    /// A short description for reports.
    pub fn describe(self) -> String {
        match self {
            Payload::Filler(size) => format!("{size} B"),
            Payload::Orders => "JSON order".to_owned(),
            Payload::Text(text) => format!("{text:?}"),
        }
    }
}

/// How many workers a Mailroom handler has.
#[derive(Debug, Clone, Copy)]
pub enum Workers {
    /// `concurrency = n`.
    Fixed(usize),
    /// `min_workers` / `max_workers`, autoscaled.
    Auto {
        /// Fewest.
        min: usize,
        /// Most.
        max: usize,
    },
}

/// A Mailroom handler as the scenario configures it.
#[derive(Debug, Clone)]
pub struct MailroomSpec {
    /// The guest module: `noop`, `enrich` or `flaky`.
    pub guest: &'static str,
    /// `ordering = "subject"` rather than `"none"`.
    pub ordered: bool,
    /// The pool.
    pub workers: Workers,
    /// `isolation = "reuse"`.
    pub reuse: bool,
    /// Grant publishing to, and configure, the output subject.
    pub enrich: bool,
    /// `max_buffered` (and so `prefetch`): messages the host holds at once. `None`: default.
    pub in_flight: Option<usize>,
    /// `scale_cooldown`. `None`: default.
    pub scale_cooldown: Option<&'static str>,
    /// `partitions` (ordered by subject). `None`: not partitioned.
    pub partitions: Option<u32>,
}

impl MailroomSpec {
    /// A handler with the defaults: unordered, fresh instances, default buffers.
    pub fn new(guest: &'static str, workers: Workers) -> MailroomSpec {
        MailroomSpec {
            guest,
            ordered: false,
            workers,
            reuse: false,
            enrich: false,
            in_flight: None,
            scale_cooldown: None,
            partitions: None,
        }
    }
}

/// Who drains the stream.
#[derive(Debug, Clone)]
pub enum Runner {
    /// async-nats, plain ack.
    Native,
    /// async-nats, enrich + publish + ack, this many messages at once.
    NativeEnrich {
        /// Messages in flight.
        in_flight: usize,
    },
    /// async-nats: a ~1 ms tokio sleep (the same wait `sleep:1` makes the guest do), then
    /// ack; this many messages at once.
    NativeIo {
        /// Messages in flight.
        in_flight: usize,
    },
    /// Mailroom in-process.
    Mailroom(MailroomSpec),
    /// Mailroom in-process, started on an empty stream; then `bursts` times: idle until the
    /// pool is at `min_workers`, `size` messages published at once, drained.
    MailroomBursts {
        /// The handler.
        spec: MailroomSpec,
        /// How many backlogs.
        bursts: usize,
        /// Messages per backlog.
        size: u64,
    },
    /// Mailroom on this many hosts in-process, started on an empty stream and timed once the
    /// partitions are spread (`spec.partitions` must be set).
    MailroomHosts {
        /// The handler.
        spec: MailroomSpec,
        /// How many hosts.
        hosts: usize,
    },
    /// wasmCloud's `wash dev` with its `wasmcloud:nats` plugin and `wasmcloud-noop.wasm`.
    Wasmcloud {
        /// `dev.components[].poolSize` warm instances instead of a fresh one per message.
        pooled: bool,
        /// The push consumer's `max-ack-pending`: messages delivered and not yet acked.
        in_flight: usize,
    },
}

/// What a scenario's throughput is compared with.
#[derive(Debug, Clone)]
pub enum Baseline {
    /// Nothing: it is a baseline.
    None,
    /// Another scenario's median msgs/s.
    Scenario(String),
    /// A computed ideal.
    Ideal {
        /// The ideal rate.
        msgs_per_s: f64,
        /// How it is described.
        label: String,
    },
}

/// The place of an ordering-suite scenario in its table.
#[derive(Debug, Clone, Copy)]
pub struct OrderingCell {
    /// Distinct subjects.
    pub keys: u64,
    /// `noop` or `io`.
    pub handler: &'static str,
    /// Ordered by subject.
    pub ordered: bool,
}

/// One scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Unique name.
    pub name: String,
    /// Its suite.
    pub suite: Suite,
    /// Who drains.
    pub runner: Runner,
    /// What the messages carry.
    pub payload: Payload,
    /// N.
    pub messages: u64,
    /// K.
    pub subjects: u64,
    /// The comparison.
    pub baseline: Baseline,
    /// Ordering suite only.
    pub cell: Option<OrderingCell>,
}

/// Sizes from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// N for the compare suite.
    pub messages: u64,
    /// Workers of the fixed-pool noop scenarios.
    pub workers: usize,
    /// `max_workers` of `mailroom-io`.
    pub io_workers: usize,
    /// Ordering suite sizes are divided by 5; smaller bursts.
    pub quick: bool,
    /// N for the peers suite.
    pub peer_messages: u64,
}

/// Concurrency of both enrich scenarios.
const ENRICH_CONCURRENCY: usize = 16;
/// Fixed concurrency of every ordering-suite scenario.
const ORDERING_CONCURRENCY: usize = 16;
/// The `flaky` command of the I/O scenarios: a ~1 ms host-side wait.
const SLEEP: Payload = Payload::Text("sleep:1");
/// Messages held at once by both hosts in the peers suite.
pub const PEER_IN_FLIGHT: usize = 64;
/// The cooldown of the bursts scenario: short, so that a run sees the pool go back to min.
pub const BURST_COOLDOWN: &str = "2s";
/// Backlogs in the bursts scenario.
pub const BURSTS: usize = 2;

/// The compare suite, in run order.
pub fn compare(s: &Sizes) -> Vec<Scenario> {
    let n = s.messages;
    let sc = |name: &str, runner, payload, messages, subjects, baseline: Baseline| Scenario {
        name: name.to_owned(),
        suite: Suite::Compare,
        runner,
        payload,
        messages,
        subjects,
        baseline,
        cell: None,
    };
    let noop = |ordered, reuse| {
        Runner::Mailroom(MailroomSpec {
            ordered,
            reuse,
            ..MailroomSpec::new("noop", Workers::Fixed(s.workers))
        })
    };
    let auto = |max| Workers::Auto { min: 1, max };
    let vs = |name: &str| Baseline::Scenario(name.to_owned());
    let small = Payload::Filler(128);
    let large = Payload::Filler(1024);
    let mut out = vec![
        sc("native", Runner::Native, small, n, 100, Baseline::None),
        sc("native-1k", Runner::Native, large, n, 100, Baseline::None),
        sc(
            "mailroom-noop",
            noop(false, false),
            small,
            n,
            100,
            vs("native"),
        ),
        sc(
            "mailroom-noop-1k",
            noop(false, false),
            large,
            n,
            100,
            vs("native-1k"),
        ),
        sc(
            "mailroom-noop-ordered",
            noop(true, false),
            small,
            n,
            1000,
            vs("mailroom-noop"),
        ),
        // The cost of partitioning on one host: the same work, 16 partitions.
        sc(
            "mailroom-partitioned",
            Runner::Mailroom(MailroomSpec {
                ordered: true,
                partitions: Some(PARTITIONS),
                ..MailroomSpec::new("noop", Workers::Fixed(s.workers))
            }),
            small,
            n,
            1000,
            vs("mailroom-noop-ordered"),
        ),
        sc(
            "native-enrich",
            Runner::NativeEnrich {
                in_flight: ENRICH_CONCURRENCY,
            },
            Payload::Orders,
            n,
            100,
            Baseline::None,
        ),
        sc(
            "mailroom-enrich",
            Runner::Mailroom(MailroomSpec {
                enrich: true,
                ..MailroomSpec::new("enrich", Workers::Fixed(ENRICH_CONCURRENCY))
            }),
            Payload::Orders,
            n,
            100,
            vs("native-enrich"),
        ),
        sc(
            "native-io",
            Runner::NativeIo {
                in_flight: s.io_workers,
            },
            SLEEP,
            (n / 4).max(1),
            100,
            Baseline::None,
        ),
        sc(
            "mailroom-io",
            Runner::Mailroom(MailroomSpec::new("flaky", auto(s.io_workers))),
            SLEEP,
            (n / 4).max(1),
            100,
            Baseline::Ideal {
                msgs_per_s: s.io_workers as f64 * 1000.0,
                label: format!("ideal {}×1000/s", s.io_workers),
            },
        ),
        // The same backlog in bursts: time to max and back to min, per burst.
        sc(
            "mailroom-io-bursts",
            Runner::MailroomBursts {
                spec: MailroomSpec {
                    scale_cooldown: Some(BURST_COOLDOWN),
                    ..MailroomSpec::new("flaky", auto(s.io_workers))
                },
                bursts: BURSTS,
                size: burst_size(s),
            },
            SLEEP,
            BURSTS as u64 * burst_size(s),
            100,
            Baseline::None,
        ),
        // CPU-bound handlers, autoscaled: the pool must stop growing near the core count.
        sc(
            "mailroom-noop-auto",
            Runner::Mailroom(MailroomSpec::new("noop", auto(16))),
            small,
            n.max(AUTO_MIN_MESSAGES),
            100,
            vs("mailroom-noop"),
        ),
        sc(
            "mailroom-enrich-auto",
            Runner::Mailroom(MailroomSpec {
                enrich: true,
                ..MailroomSpec::new("enrich", auto(16))
            }),
            Payload::Orders,
            (n / 4).max(AUTO_MIN_MESSAGES / 4),
            100,
            vs("mailroom-enrich"),
        ),
        sc(
            "mailroom-reuse",
            noop(false, true),
            small,
            n,
            100,
            vs("native"),
        ),
    ];
    if !s.quick {
        // Memory over a long run: RSS at a tenth of the messages and at the end.
        out.push(sc(
            "mailroom-soak",
            noop(false, false),
            small,
            n * 10,
            100,
            Baseline::None,
        ));
    }
    out
}

/// The ordering suite: every key count × handler × (ordered, unordered), in run order.
pub fn ordering(s: &Sizes) -> Vec<Scenario> {
    let div = if s.quick { 5 } else { 1 };
    let mut out = Vec::new();
    for keys in [1u64, 10, 1_000, 100_000] {
        for handler in ["noop", "io"] {
            let messages = match (handler, keys) {
                ("noop", _) => 50_000,
                (_, 1) => 2_000,
                _ => 10_000,
            } / div;
            for ordered in [true, false] {
                let mode = if ordered { "ordered" } else { "unordered" };
                let unordered_name = format!("ordering-{handler}-k{keys}-unordered");
                out.push(Scenario {
                    name: format!("ordering-{handler}-k{keys}-{mode}"),
                    suite: Suite::Ordering,
                    runner: Runner::Mailroom(MailroomSpec {
                        ordered,
                        ..MailroomSpec::new(
                            if handler == "noop" { "noop" } else { "flaky" },
                            Workers::Fixed(ORDERING_CONCURRENCY),
                        )
                    }),
                    payload: if handler == "noop" {
                        Payload::Filler(128)
                    } else {
                        SLEEP
                    },
                    messages,
                    subjects: keys,
                    baseline: if ordered {
                        Baseline::Scenario(unordered_name)
                    } else {
                        Baseline::None
                    },
                    cell: Some(OrderingCell {
                        keys,
                        handler,
                        ordered,
                    }),
                });
            }
        }
    }
    out
}

/// Partitions of the partitioned scenarios.
pub const PARTITIONS: u32 = 16;
/// Workers per host of the partitions suite: few, so that one host is bound by its pool.
pub const HOST_WORKERS: usize = 4;

/// The partitions suite: an I/O-bound partitioned handler on 1, 2 and 3 hosts.
pub fn partitions(s: &Sizes) -> Vec<Scenario> {
    let messages = if s.quick { 6_000 } else { 20_000 };
    (1..=3)
        .map(|hosts| Scenario {
            name: format!("mailroom-io-partitioned-h{hosts}"),
            suite: Suite::Partitions,
            runner: Runner::MailroomHosts {
                spec: MailroomSpec {
                    ordered: true,
                    partitions: Some(PARTITIONS),
                    ..MailroomSpec::new("flaky", Workers::Fixed(HOST_WORKERS))
                },
                hosts,
            },
            payload: SLEEP,
            messages,
            subjects: 1000,
            baseline: if hosts == 1 {
                Baseline::None
            } else {
                Baseline::Scenario("mailroom-io-partitioned-h1".to_owned())
            },
            cell: None,
        })
        .collect()
}

/// Messages per burst: 50,000, or 10,000 with `--quick`.
fn burst_size(s: &Sizes) -> u64 {
    if s.quick {
        10_000
    } else {
        50_000
    }
}

/// The autoscaled CPU-bound scenarios drain at least this many (noop; enrich a quarter), so
/// that even a quick run lasts long enough for the pool to settle.
const AUTO_MIN_MESSAGES: u64 = 100_000;

/// The peers suite: Mailroom and wasmCloud on the same no-op work, fresh and warm, in turn.
pub fn peers(s: &Sizes) -> Vec<Scenario> {
    let n = s.peer_messages;
    let sc = |name: &str, runner, baseline: Option<&str>| Scenario {
        name: name.to_owned(),
        suite: Suite::Peers,
        runner,
        payload: Payload::Filler(128),
        messages: n,
        subjects: 100,
        baseline: baseline.map_or(Baseline::None, |b| Baseline::Scenario(b.to_owned())),
        cell: None,
    };
    let mailroom = |reuse| {
        Runner::Mailroom(MailroomSpec {
            reuse,
            in_flight: Some(PEER_IN_FLIGHT),
            ..MailroomSpec::new("noop", Workers::Fixed(s.workers))
        })
    };
    let wasmcloud = |pooled| Runner::Wasmcloud {
        pooled,
        in_flight: PEER_IN_FLIGHT,
    };
    vec![
        sc("mailroom-noop", mailroom(false), Some("wasmcloud-noop")),
        sc("wasmcloud-noop", wasmcloud(false), None),
        sc("mailroom-reuse", mailroom(true), Some("wasmcloud-pooled")),
        sc("wasmcloud-pooled", wasmcloud(true), None),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> Sizes {
        Sizes {
            messages: 1000,
            workers: 4,
            io_workers: 16,
            quick: false,
            peer_messages: 1000,
        }
    }

    #[test]
    fn every_config_parses() {
        let names = crate::runner::Names {
            stream: "B1".into(),
            prefix: "b1".into(),
            output_stream: "B1OUT".into(),
            output_subject: "b1out.orders".into(),
        };
        for s in compare(&sizes())
            .iter()
            .chain(ordering(&sizes()).iter())
            .chain(peers(&sizes()).iter())
            .chain(partitions(&sizes()).iter())
        {
            if let Runner::Mailroom(spec)
            | Runner::MailroomBursts { spec, .. }
            | Runner::MailroomHosts { spec, .. } = &s.runner
            {
                let text = crate::inprocess::config_text(
                    &s.name,
                    std::path::Path::new("/x/\"q\".wasm"),
                    spec,
                    &names,
                );
                mailroom::Config::parse(&text, std::path::Path::new("/"))
                    .unwrap_or_else(|e| panic!("{text}\n{e:#}"));
            }
        }
    }

    #[test]
    fn baselines_exist() {
        // Each suite runs on its own: its baselines are its own scenarios.
        for all in [
            compare(&sizes()),
            ordering(&sizes()),
            peers(&sizes()),
            partitions(&sizes()),
        ] {
            for s in &all {
                if let Baseline::Scenario(b) = &s.baseline {
                    assert!(all.iter().any(|o| &o.name == b), "{} -> {b}", s.name);
                }
            }
        }
        assert_eq!(ordering(&sizes()).len(), 16);
    }

    #[test]
    fn orders_are_json() {
        let v: serde_json::Value = serde_json::from_slice(&Payload::Orders.message(3)).unwrap();
        assert_eq!(v["customer"], "c-3");
    }
}
