//! The `/metrics` body: every handler's atomics, read at scrape time and encoded by the
//! Prometheus project's `prometheus-client` crate (OpenMetrics text, or the classic Prometheus
//! text format for clients that do not ask for OpenMetrics).
//!
//! The message path never touches this module: a scrape takes a snapshot of the atomics into
//! a short-lived [`Collector`] and lets the crate write `# HELP`, `# TYPE`, the `_total`
//! suffixes and the `_bucket{le=..}`, `_sum` and `_count` series of the histograms.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{Exported, HandlerMetrics, Metrics, MetricsSnapshot};
use crate::health::HandlerState;

/// The two text formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text`), ends with `# EOF`.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4 (`text/plain`).
    Prometheus,
}

impl Format {
    /// The format to answer a request with this `Accept` header in.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// What a scrape knows beyond the handlers' atomics.
#[derive(Debug, Clone, Default)]
pub struct HostGauges {
    /// Whether the NATS connection is up.
    pub nats_connected: bool,
    /// Each handler's consumer backlog (`num_pending + num_ack_pending`) by handler name,
    /// when the server answered.
    pub backlogs: Vec<(String, u64)>,
}

type Counter = (&'static str, &'static str, fn(&MetricsSnapshot) -> u64);
type Gauge = (&'static str, &'static str, fn(&MetricsSnapshot) -> i64);

const COUNTERS: &[Counter] = &[
    (
        "received",
        "Deliveries received from JetStream (every attempt counts).",
        |s| s.received,
    ),
    (
        "redelivered",
        "Deliveries with attempt > 1 (redelivered by JetStream or retried in place).",
        |s| s.redelivered,
    ),
    (
        "succeeded",
        "Messages acked after the handler succeeded and its publishes were stored.",
        |s| s.succeeded,
    ),
    ("retried", "Failed attempts that will be retried.", |s| {
        s.retried
    }),
    (
        "dead_lettered",
        "Messages written to the dead-letter subject (or terminated without one).",
        |s| s.dead_lettered,
    ),
    (
        "dead_letter_failures",
        "Dead-letter records that could not be stored (the message comes back later).",
        |s| s.dead_letter_failures,
    ),
    (
        "traps",
        "Attempts that ended in a trap (panic, out of memory, stack overflow, ...).",
        |s| s.traps,
    ),
    ("timeouts", "Attempts stopped by the time limit.", |s| {
        s.timeouts
    }),
    (
        "published",
        "Publishes confirmed for successful messages.",
        |s| s.published,
    ),
    ("denied", "Capability calls refused by a grant.", |s| {
        s.denied
    }),
    (
        "progress_acks",
        "Progress acks (+WPI) sent to keep running or waiting messages alive.",
        |s| s.progress_acks,
    ),
    (
        "ack_failures",
        "Acks, naks or terms that could not be sent (the message is redelivered).",
        |s| s.ack_failures,
    ),
    (
        "log_dropped",
        "Log records and guest output dropped over the per-message budget.",
        |s| s.log_dropped,
    ),
    (
        "late_redeliveries",
        "Redeliveries of a message whose key had already run a later one.",
        |s| s.late_redeliveries,
    ),
    (
        "duplicate_deliveries",
        "Deliveries of a message this host already held (ignored).",
        |s| s.duplicate_deliveries,
    ),
    (
        "scale_ups",
        "Times the autoscaler grew the worker pool.",
        |s| s.scale_ups,
    ),
    (
        "scale_downs",
        "Times the autoscaler shrank the worker pool.",
        |s| s.scale_downs,
    ),
    (
        "duplicate_publishes",
        "Publishes of successful attempts that a stream had already stored (re-runs).",
        |s| s.duplicate_publishes,
    ),
    (
        "publish_retries",
        "Publishes sent again because their stream could not be reached (a leader election).",
        |s| s.publish_retries,
    ),
    (
        "handed_back",
        "Messages handed back without running (drain, partition release).",
        |s| s.handed_back,
    ),
    (
        "fenced_messages",
        "Held messages given up because their partition's lease was lost.",
        |s| s.fenced_messages,
    ),
    (
        "breaker_trips",
        "Times the circuit breaker opened after consecutive failed executions.",
        |s| s.breaker_trips,
    ),
    (
        "partitions_acquired",
        "Partitions this host took over.",
        |s| s.partitions_acquired,
    ),
    (
        "partitions_released",
        "Partitions this host handed over gracefully.",
        |s| s.partitions_released,
    ),
    (
        "lease_renew_failures",
        "Partition lease renewals that got no answer (the lease may still be held).",
        |s| s.lease_renew_failures,
    ),
    (
        "self_fences",
        "Partitions this host gave up because it could not renew their lease in time, or found it taken.",
        |s| s.self_fences,
    ),
    (
        "delivery_gaps",
        "Partition deliveries lost in transit (the consumer sequence jumped); each restarts its partition.",
        |s| s.delivery_gaps,
    ),
];

const GAUGES: &[Gauge] = &[
    ("in_flight", "Messages received and not yet settled.", |s| {
        s.in_flight
    }),
    ("workers", "Workers alive.", |s| s.workers),
    ("target_workers", "The autoscaler's current target.", |s| {
        s.target_workers
    }),
    ("busy_workers", "Workers running a message.", |s| s.busy),
    (
        "busy_workers_peak",
        "The most workers busy at once since start.",
        |s| s.busy_peak,
    ),
    (
        "buffered",
        "Messages held but not running (waiting for their key, a retry or a worker).",
        |s| s.buffered,
    ),
    ("keys", "Distinct ordering keys held.", |s| s.keys),
    (
        "blocked_keys",
        "Keys blocked by a message that used its attempts (on_exhausted = \"block\").",
        |s| s.blocked_keys,
    ),
    (
        "breaker_open",
        "1 while the circuit breaker is open (pulling stopped, probing), else 0.",
        |s| s.breaker_open,
    ),
    ("partitions_owned", "Partitions this host owns.", |s| {
        s.partitions_owned
    }),
];

type HistogramOf = fn(&HandlerMetrics) -> Exported;

const HISTOGRAMS: &[(&str, &str, HistogramOf)] = &[
    (
        "latency",
        "Time from a message's publish to its ack, successes only.",
        |m| m.latency.exported(),
    ),
    (
        "queue_wait",
        "Time from a message's arrival in the host to the start of its attempt.",
        |m| m.queue_wait.exported(),
    ),
    (
        "handler_duration",
        "Time an attempt spent in the handler (instantiation and call).",
        |m| m.handler_duration.exported(),
    ),
    (
        "failover",
        "Time from seeing a partition's lease expire to having attached the partition here.",
        |m| m.failover.exported(),
    ),
    (
        "handover",
        "Time a graceful partition release took (stop pulling to consumer deleted).",
        |m| m.handover.exported(),
    ),
];

/// Renders every series of `metrics` plus the host gauges.
pub fn render(metrics: &Metrics, host: &HostGauges, format: Format) -> String {
    let handlers = metrics
        .handlers()
        .map(|(name, m)| HandlerSeries {
            up: m.lifecycle.get() == HandlerState::Running,
            snapshot: m.snapshot(),
            histograms: HISTOGRAMS.iter().map(|(_, _, get)| get(&m)).collect(),
            backlog: host
                .backlogs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| *b),
            name,
        })
        .collect();
    let mut registry = Registry::with_prefix("mailroom");
    registry.register(
        "build",
        "The running Mailroom version.",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register_collector(Box::new(Scrape {
        nats_connected: host.nats_connected,
        handlers,
    }));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a series above.
    let written = match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        }
    };
    if let Err(err) = written {
        tracing::error!("encoding /metrics failed: {err}");
    }
    out
}

#[derive(Debug)]
struct HandlerSeries {
    name: String,
    up: bool,
    snapshot: MetricsSnapshot,
    histograms: Vec<Exported>,
    backlog: Option<u64>,
}

/// One scrape's worth of values; registered in a registry built for that scrape.
#[derive(Debug)]
struct Scrape {
    nats_connected: bool,
    handlers: Vec<HandlerSeries>,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut e = encoder.encode_descriptor(
            "nats_connected",
            "1 while the host's NATS connection is up, else 0.",
            None,
            MetricType::Gauge,
        )?;
        e.encode_gauge(&i64::from(self.nats_connected))?;

        let mut e = encoder.encode_descriptor(
            "handler_up",
            "1 while the handler is running (consuming), else 0 (starting, failed, tripped, draining).",
            None,
            MetricType::Gauge,
        )?;
        for h in &self.handlers {
            e.encode_family(&[("handler", h.name.as_str())])?
                .encode_gauge(&i64::from(h.up))?;
        }

        let mut e = encoder.encode_descriptor(
            "backlog",
            "Messages the handler's consumer has not delivered or not yet had acked \
             (num_pending + num_ack_pending): what KEDA's nats-jetstream scaler reads.",
            None,
            MetricType::Gauge,
        )?;
        for h in &self.handlers {
            if let Some(backlog) = h.backlog {
                e.encode_family(&[("handler", h.name.as_str())])?
                    .encode_gauge(&backlog)?;
            }
        }

        for (name, help, get) in COUNTERS {
            let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for h in &self.handlers {
                e.encode_family(&[("handler", h.name.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&get(&h.snapshot), None)?;
            }
        }
        for (name, help, get) in GAUGES {
            let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for h in &self.handlers {
                e.encode_family(&[("handler", h.name.as_str())])?
                    .encode_gauge(&get(&h.snapshot))?;
            }
        }
        for (i, (name, help, _)) in HISTOGRAMS.iter().enumerate() {
            let mut e = encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for h in &self.handlers {
                let x = &h.histograms[i];
                e.encode_family(&[("handler", h.name.as_str())])?
                    .encode_histogram::<NoLabelSet>(x.sum_seconds, x.count, &x.buckets, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample() -> Metrics {
        let metrics = Metrics::default();
        let m = metrics.handler("enrich");
        HandlerMetrics::incr(&m.succeeded);
        HandlerMetrics::incr(&m.succeeded);
        m.latency.record(Duration::from_millis(3));
        m.record_queue_wait(Duration::from_micros(50));
        m.lifecycle.set(HandlerState::Running);
        let f = metrics.handler("flaky");
        f.lifecycle.fail("stream JOBS not found");
        metrics
    }

    #[test]
    fn series_have_help_types_totals_and_real_histograms() {
        let host = HostGauges {
            nats_connected: true,
            backlogs: vec![("enrich".to_owned(), 42)],
        };
        let text = render(&sample(), &host, Format::Prometheus);
        for expected in [
            "# HELP mailroom_succeeded_total Messages acked",
            "# TYPE mailroom_succeeded_total counter",
            "mailroom_succeeded_total{handler=\"enrich\"} 2",
            "mailroom_succeeded_total{handler=\"flaky\"} 0",
            "mailroom_nats_connected 1",
            "mailroom_handler_up{handler=\"enrich\"} 1",
            "mailroom_handler_up{handler=\"flaky\"} 0",
            "mailroom_backlog{handler=\"enrich\"} 42",
            "# TYPE mailroom_latency_seconds histogram",
            "mailroom_latency_seconds_bucket{handler=\"enrich\",le=\"0.0025\"} 0",
            "mailroom_latency_seconds_bucket{handler=\"enrich\",le=\"0.005\"} 1",
            "mailroom_latency_seconds_bucket{handler=\"enrich\",le=\"+Inf\"} 1",
            "mailroom_latency_seconds_sum{handler=\"enrich\"} 0.003",
            "mailroom_latency_seconds_count{handler=\"enrich\"} 1",
            "mailroom_queue_wait_seconds_bucket{handler=\"enrich\",le=\"0.0001\"} 1",
            "mailroom_handler_duration_seconds_count{handler=\"flaky\"} 0",
            "mailroom_in_flight{handler=\"enrich\"} 0",
            "mailroom_dead_letter_failures_total{handler=\"enrich\"} 0",
            "mailroom_build_info{version=\"",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(
            !text.contains("mailroom_backlog{handler=\"flaky\"}"),
            "no backlog series when the server did not answer"
        );
        assert!(!text.contains("p50"), "no quantile gauges: {text}");
    }

    #[test]
    fn openmetrics_when_asked() {
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        let text = render(&sample(), &HostGauges::default(), Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# UNIT mailroom_latency_seconds seconds"),
            "{text}"
        );
        assert!(text.contains("mailroom_nats_connected 0"), "{text}");
    }
}
