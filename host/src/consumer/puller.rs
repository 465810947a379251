//! Pull requests to a durable JetStream consumer, sized by the host's free capacity.
//!
//! Invariant: the messages requested and not yet delivered (`outstanding`) plus the messages
//! held by the host never exceed what the caller asked for, except briefly after a reset
//! (missed heartbeats, reconnect), when requests the server still holds may deliver a few
//! more. Every delivered message is handed to the caller; none is dropped here.
//!
//! Requests expire after a few seconds, so after shutdown stops new requests the server stops
//! delivering soon, and a host that died leaves no long-lived requests behind.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, StatusCode, Subscriber};
use futures::StreamExt;
use tokio::time::Instant;

/// How long a pull request waits for messages.
pub const EXPIRES: Duration = Duration::from_secs(5);
/// How often the server sends a heartbeat for an idle request.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the subscription produced.
#[derive(Debug)]
pub enum Pulled {
    /// A stream message.
    Message(async_nats::Message),
    /// Outstanding requests were dropped (expired, missed heartbeats, reconnect, server
    /// limits): the caller should request again.
    Reset,
    /// JetStream did not answer the request (no responders): back off, then request again.
    Unavailable,
    /// The consumer is gone or unusable; it must be bound again. Carries the reason.
    Fatal(String),
    /// The subscription ended (connection closed for good, or drained).
    Closed,
}

/// One subscription receiving the messages of every pull request this host sends.
pub struct Puller {
    client: Client,
    request_subject: String,
    inbox: String,
    sub: Subscriber,
    outstanding: usize,
    last_seen: Instant,
    last_state: State,
}

impl Puller {
    /// Subscribes the inbox for consumer `consumer` of stream `stream`.
    pub async fn new(client: &Client, stream: &str, consumer: &str) -> anyhow::Result<Puller> {
        let inbox = client.new_inbox();
        let sub = client.subscribe(inbox.clone()).await?;
        Ok(Puller {
            client: client.clone(),
            request_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
            inbox,
            sub,
            outstanding: 0,
            last_seen: Instant::now(),
            last_state: client.connection_state(),
        })
    }

    /// Messages requested and not delivered yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Asks for up to `batch` more messages.
    pub async fn request(&mut self, batch: usize) -> anyhow::Result<()> {
        if batch == 0 {
            return Ok(());
        }
        let body = format!(
            "{{\"batch\":{batch},\"expires\":{},\"idle_heartbeat\":{}}}",
            EXPIRES.as_nanos(),
            HEARTBEAT.as_nanos()
        );
        self.client
            .publish_with_reply(
                self.request_subject.clone(),
                self.inbox.clone(),
                body.into(),
            )
            .await?;
        if self.outstanding == 0 {
            self.last_seen = Instant::now();
        }
        self.outstanding += batch;
        Ok(())
    }

    /// Stops receiving: the subscription is drained, and [`Puller::next`] returns what was
    /// already on its way, then [`Pulled::Closed`].
    pub async fn close(&mut self) {
        if let Err(err) = self.sub.drain().await {
            tracing::debug!("draining the pull subscription: {err}");
        }
    }

    /// Waits for the next event. Status messages that need no action are consumed here.
    pub async fn next(&mut self) -> Pulled {
        loop {
            let silence = self.last_seen + HEARTBEAT * 3;
            let message = tokio::select! {
                message = self.sub.next() => message,
                _ = tokio::time::sleep_until(silence), if self.outstanding > 0 => {
                    tracing::debug!(outstanding = self.outstanding, "no heartbeat from pull requests; requesting again");
                    self.outstanding = 0;
                    return Pulled::Reset;
                }
                _ = tokio::time::sleep(HEARTBEAT) => {
                    if self.reconnected() {
                        tracing::info!("reconnected to NATS; renewing pull requests");
                        self.outstanding = 0;
                        return Pulled::Reset;
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                return Pulled::Closed;
            };
            self.last_seen = Instant::now();
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    return Pulled::Message(message);
                }
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => {
                    // The request ended; its unfilled part is in the pending header.
                    match pending_messages(&message) {
                        Some(n) => self.outstanding = self.outstanding.saturating_sub(n),
                        None => self.outstanding = 0,
                    }
                    if self.outstanding == 0 {
                        return Pulled::Reset;
                    }
                }
                Some(StatusCode::REQUEST_TERMINATED) => {
                    let description = message.description.clone().unwrap_or_default();
                    if description.eq_ignore_ascii_case("consumer deleted")
                        || description.contains("push based")
                        || description.starts_with("Exceeded MaxRequest")
                    {
                        self.outstanding = 0;
                        return Pulled::Fatal(description);
                    }
                    tracing::debug!(%description, "pull request terminated by the server");
                    match pending_messages(&message) {
                        Some(n) => self.outstanding = self.outstanding.saturating_sub(n),
                        None => self.outstanding = 0,
                    }
                    return Pulled::Reset;
                }
                Some(StatusCode::NO_RESPONDERS) => {
                    self.outstanding = 0;
                    return Pulled::Unavailable;
                }
                Some(other) => {
                    tracing::warn!(status = %other, description = ?message.description, "unexpected status on the pull subscription");
                    self.outstanding = 0;
                    return Pulled::Reset;
                }
            }
        }
    }

    /// Whether the connection came back since the last check: requests the old server
    /// connection held are gone.
    fn reconnected(&mut self) -> bool {
        let state = self.client.connection_state();
        let was = std::mem::replace(&mut self.last_state, state.clone());
        state == State::Connected && was != State::Connected
    }
}

fn pending_messages(message: &async_nats::Message) -> Option<usize> {
    message
        .headers
        .as_ref()?
        .get("Nats-Pending-Messages")?
        .as_str()
        .parse()
        .ok()
}
