//! The baselines: hand-written async-nats consumers doing the same work as the Mailroom
//! scenarios, without a host. Each binds a durable pull consumer with explicit acks and drains
//! it with `consumer.stream().max_messages_per_batch(500).messages()`, timing from the first
//! pull to the last ack, and records each message's publish-to-ack latency in the same
//! histogram type the host uses, so the percentiles compare bucket for bucket.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, consumer::pull, message::PublishMessage};
use futures::StreamExt as _;
use mailroom::telemetry::Histogram;
use serde_json::{json, Map, Value};

use crate::report::Measurement;
use crate::sys::{mib, Meter, Usage};

/// How long a drain may go without a single message before it is called stuck.
pub const STALL: Duration = Duration::from_secs(30);
/// Messages per pull request.
const BATCH: usize = 500;
/// The handler name the native enrich baseline puts in `enriched_by` and its msg ids.
const ENRICH_NAME: &str = "native-enrich";

/// What one native drain measured.
pub struct Drained {
    /// First pull to last ack.
    pub elapsed: Duration,
    /// Publish-to-ack latency of every message.
    pub latency: Histogram,
    /// CPU and peak memory over the drain.
    pub usage: Usage,
}

impl Drained {
    /// As a measurement of `n` messages.
    pub fn measurement(&self, n: u64) -> Measurement {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let ms = |q| self.latency.quantile(q).map(|l| l.as_secs_f64() * 1000.0);
        Measurement {
            messages: n,
            seconds: secs,
            msgs_per_s: n as f64 / secs,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            cpu_s_per_1k: self.usage.cpu_seconds.map(|c| c / n as f64 * 1000.0),
            peak_rss_mib: self.usage.peak_rss.map(mib),
            ..Measurement::default()
        }
    }
}

async fn bind(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<jetstream::consumer::PullConsumer> {
    let stream_handle = js
        .get_stream(stream)
        .await
        .with_context(|| format!("looking up stream {stream}"))?;
    stream_handle
        .create_consumer(pull::Config {
            durable_name: Some("native".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            // What Mailroom's default config gives its consumer, so neither side is capped by it.
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the native consumer on {stream}"))
}

/// The first pull: a message stream asking for [`BATCH`] messages at a time.
async fn pull(consumer: &jetstream::consumer::PullConsumer) -> anyhow::Result<pull::Stream> {
    consumer
        .stream()
        .max_messages_per_batch(BATCH)
        .messages()
        .await
        .context("starting the pull stream")
}

/// Time since the stream stored the message, from its JetStream metadata.
fn since_published(message: &jetstream::Message) -> anyhow::Result<Duration> {
    let info = message
        .info()
        .map_err(|e| anyhow!("message without JetStream metadata: {e}"))?;
    let published = info.published.unix_timestamp_nanos();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    Ok(Duration::from_nanos(
        u64::try_from((now - published).max(0)).unwrap_or(u64::MAX),
    ))
}

async fn next_message(messages: &mut pull::Stream, got: u64) -> anyhow::Result<jetstream::Message> {
    match tokio::time::timeout(STALL, messages.next()).await {
        Err(_) => bail!("no message for {STALL:?} after {got} messages"),
        Ok(None) => bail!("the pull stream ended after {got} messages"),
        Ok(Some(Err(err))) => Err(anyhow!("pulling after {got} messages: {err}")),
        Ok(Some(Ok(message))) => Ok(message),
    }
}

/// Awaits `n` settled messages from `work`, recording each one's latency; fails when none
/// settles for [`STALL`].
async fn settle(
    work: &mut (impl futures::Stream<Item = anyhow::Result<Duration>> + Unpin),
    n: u64,
    latency: &Histogram,
) -> anyhow::Result<()> {
    for done in 0..n {
        match tokio::time::timeout(STALL, work.next()).await {
            Err(_) => bail!("no message settled for {STALL:?} after {done} messages"),
            Ok(None) => bail!("the pull stream ended after {done} messages"),
            Ok(Some(result)) => latency.record(result?),
        }
    }
    Ok(())
}

/// Drains `n` messages from `stream`: no work, plain ack.
pub async fn plain(client: async_nats::Client, stream: &str, n: u64) -> anyhow::Result<Drained> {
    let js = jetstream::new(client);
    let latency = Histogram::default();
    let mut meter = Meter::start();
    let consumer = bind(&js, stream).await?;
    meter.restart_cpu();
    let started = Instant::now();
    let mut messages = pull(&consumer).await?;
    for got in 0..n {
        let message = next_message(&mut messages, got).await?;
        message
            .ack()
            .await
            .map_err(|e| anyhow!("acking message {got}: {e}"))?;
        latency.record(since_published(&message)?);
    }
    Ok(Drained {
        elapsed: started.elapsed(),
        latency,
        usage: meter.read(),
    })
}

/// Drains `n` JSON orders from `stream`: enriches each like `examples/enrich`, publishes it to
/// `output` with a `Nats-Msg-Id`, waits for the stream's ack, then acks the input; `in_flight`
/// messages at once.
pub async fn enrich(
    client: async_nats::Client,
    stream: &str,
    output: &str,
    n: u64,
    in_flight: usize,
) -> anyhow::Result<Drained> {
    let js = jetstream::new(client);
    let latency = Histogram::default();
    let mut meter = Meter::start();
    let consumer = bind(&js, stream).await?;
    meter.restart_cpu();
    let started = Instant::now();
    let messages = pull(&consumer).await?;
    let n_usize = usize::try_from(n).context("too many messages for this platform")?;
    let mut work = messages
        .take(n_usize)
        .map(|message| {
            let js = js.clone();
            async move {
                let message = message.map_err(|e| anyhow!("pulling: {e}"))?;
                enrich_one(&js, &message, output).await?;
                since_published(&message)
            }
        })
        .buffer_unordered(in_flight);
    settle(&mut work, n, &latency).await?;
    Ok(Drained {
        elapsed: started.elapsed(),
        latency,
        usage: meter.read(),
    })
}

/// Drains `n` messages from `stream`, waiting ~1 ms (a tokio sleep) before each ack,
/// `in_flight` at once: the ceiling for an I/O-bound handler on this machine.
pub async fn io(
    client: async_nats::Client,
    stream: &str,
    n: u64,
    in_flight: usize,
) -> anyhow::Result<Drained> {
    let js = jetstream::new(client);
    let latency = Histogram::default();
    let mut meter = Meter::start();
    let consumer = bind(&js, stream).await?;
    meter.restart_cpu();
    let started = Instant::now();
    let messages = pull(&consumer).await?;
    let n_usize = usize::try_from(n).context("too many messages for this platform")?;
    let mut work = messages
        .take(n_usize)
        .map(|message| async move {
            let message = message.map_err(|e| anyhow!("pulling: {e}"))?;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            message.ack().await.map_err(|e| anyhow!("acking: {e}"))?;
            since_published(&message)
        })
        .buffer_unordered(in_flight);
    settle(&mut work, n, &latency).await?;
    Ok(Drained {
        elapsed: started.elapsed(),
        latency,
        usage: meter.read(),
    })
}

async fn enrich_one(
    js: &jetstream::Context,
    message: &jetstream::Message,
    output: &str,
) -> anyhow::Result<()> {
    let info = message
        .info()
        .map_err(|e| anyhow!("message without JetStream metadata: {e}"))?;
    let (stream, sequence, attempt) =
        (info.stream.to_owned(), info.stream_sequence, info.delivered);
    let body = enrich_order(
        &message.payload,
        &message.subject,
        &stream,
        sequence,
        attempt,
    )?;
    let ack = js
        .send_publish(
            output.to_owned(),
            PublishMessage::build()
                .payload(body.into())
                .header("Content-Type", "application/json")
                .message_id(format!("{ENRICH_NAME}:{stream}:{sequence}:0")),
        )
        .await
        .with_context(|| format!("publishing the enriched order of sequence {sequence}"))?;
    ack.await
        .with_context(|| format!("storing the enriched order of sequence {sequence}"))?;
    message
        .ack()
        .await
        .map_err(|e| anyhow!("acking sequence {sequence}: {e}"))
}

/// The same transformation as `examples/enrich/src/lib.rs`: parse an object, add `amount`,
/// `tier`, `source` and `enriched_by`, serialize.
pub fn enrich_order(
    payload: &[u8],
    subject: &str,
    stream: &str,
    sequence: u64,
    attempt: i64,
) -> anyhow::Result<Vec<u8>> {
    let mut order: Map<String, Value> =
        serde_json::from_slice(payload).context("the order is not a JSON object")?;
    if let Some(cents) = order.get("amount_cents").and_then(Value::as_u64) {
        order.insert(
            "amount".into(),
            json!(format!("{}.{:02}", cents / 100, cents % 100)),
        );
        let tier = match cents {
            0..=9_999 => "small",
            10_000..=99_999 => "medium",
            _ => "large",
        };
        order.insert("tier".into(), json!(tier));
    }
    order.insert(
        "source".into(),
        json!({
            "subject": subject,
            "stream": stream,
            "sequence": sequence,
            "attempt": attempt,
        }),
    );
    order.insert("enriched_by".into(), json!(ENRICH_NAME));
    serde_json::to_vec(&order).context("serializing the enriched order")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enriches_like_the_example() {
        let out = enrich_order(
            br#"{"id":7,"customer":"c-7","amount_cents":250000}"#,
            "b1.k7",
            "B1",
            3,
            1,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["amount"], "2500.00");
        assert_eq!(v["tier"], "large");
        assert_eq!(v["source"]["sequence"], 3);
        assert_eq!(v["enriched_by"], ENRICH_NAME);
        assert!(enrich_order(b"[1]", "s", "S", 1, 1).is_err());
    }
}
