//! `producer`: publishes N JSON orders over K subjects (`<prefix>.1` … `<prefix>.K`), each with
//! a `Nats-Msg-Id`, and waits until JetStream has stored every one. Any NATS client can be a
//! Mailroom producer; this one shows the two things that matter: publish to a subject a stream
//! captures, and give each message an id so a retried publish is not stored twice.

use std::future::IntoFuture;
use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Parser;
use futures::future::try_join_all;

/// Publishes JSON orders to JetStream.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// NATS server URL. Default: nats://127.0.0.1:4222.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Messages to publish. Default: 1000.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Subjects to spread them over. Default: 10.
    #[arg(long, default_value_t = 10)]
    subjects: u64,
    /// Subject prefix. Default: orders.
    #[arg(long, default_value = "orders")]
    prefix: String,
    /// Prefix of each Nats-Msg-Id (ids are `<id-prefix>-<n>`). Default: order.
    #[arg(long, default_value = "order")]
    id_prefix: String,
    /// Publishes awaited at once. Default: 256.
    #[arg(long, default_value_t = 256)]
    window: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.subjects > 0, "--subjects must be at least 1");
    let client = async_nats::connect(&args.url)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let js = jetstream::new(client);
    let start = Instant::now();
    let mut pending = Vec::with_capacity(args.window);
    let mut duplicates = 0u64;
    for n in 0..args.messages {
        let subject = format!("{}.{}", args.prefix, n % args.subjects + 1);
        let order = serde_json::json!({
            "id": n,
            "customer": format!("customer-{}", n % 37),
            "amount_cents": (n * 7919) % 250_000,
            "currency": "EUR",
        });
        let publish = jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&order)?.into())
            .message_id(format!("{}-{n}", args.id_prefix));
        pending.push(js.send_publish(subject, publish).await?);
        if pending.len() >= args.window {
            duplicates += settle(&mut pending).await?;
        }
    }
    duplicates += settle(&mut pending).await?;
    println!(
        "published {} messages over {} subjects ({}.1 … {}.{}) in {:.2?}; {} were duplicates",
        args.messages,
        args.subjects,
        args.prefix,
        args.prefix,
        args.subjects,
        start.elapsed(),
        duplicates
    );
    Ok(())
}

async fn settle(pending: &mut Vec<jetstream::context::PublishAckFuture>) -> anyhow::Result<u64> {
    let acks = try_join_all(pending.drain(..).map(|f| f.into_future()))
        .await
        .context("JetStream did not store a message (is a stream capturing the subject?)")?;
    Ok(acks.iter().filter(|a| a.duplicate).count() as u64)
}
