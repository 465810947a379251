//! One delivery of a JetStream message, and the acknowledgements that settle it.
//!
//! Every acknowledgement goes to the reply subject a [`Delivery`] carries; only the consumer
//! module writes there (these methods, and the sweeper's batched progress acks). Plain acks are fire-and-forget publishes; confirmed
//! acks are requests the server answers once the ack is recorded (and replicated).

use std::time::Duration;

use async_nats::{Client, Subject};
use bytes::Bytes;

use crate::runtime::HeaderParam;

/// A message as delivered by a pull request, with its delivery metadata parsed once.
///
/// A message of a partition work stream (see `group::workstream`) is a copy of a message of
/// the handler's stream: its subject is prefixed with the partition token and a
/// `Nats-Stream-Source` header names the original sequence. [`Delivery::subject`] and
/// [`Delivery::origin_sequence`] then give the original's, which is what the handler sees and
/// what output ids and dead-letter records name; `stream_sequence` stays the work stream's,
/// which is what acknowledgements and the executor go by.
pub struct Delivery {
    /// The message (subject, payload, headers) as it came off the wire.
    pub message: async_nats::Message,
    /// Where acknowledgements go.
    reply: Subject,
    /// The sequence in the stream the consumer reads: the delivery's identity.
    pub stream_sequence: u64,
    /// The sequence in the handler's stream (equal to `stream_sequence` unless sourced).
    pub origin_sequence: u64,
    /// Where the original subject starts in `message.subject` (after a partition token).
    subject_start: usize,
    /// Whether the message is a sourced copy (its `Nats-Stream-Source` header is hidden).
    sourced: bool,
    /// The consumer's delivery count at this delivery (every delivery, redeliveries too, takes
    /// the next one).
    pub consumer_sequence: u64,
    /// Delivery attempt according to JetStream, 1-based.
    pub delivered: u32,
    /// The consumer's pending count when this was delivered (a free backlog signal).
    pub pending: u64,
    /// When the stream stored the message, nanoseconds since the Unix epoch.
    pub published_unix_nanos: i64,
}

/// Why a message carried no usable JetStream metadata.
#[derive(Debug)]
pub struct NotJetStream(pub String);

/// The header a sourcing stream adds: `<stream> <sequence> <filter> <transform> <subject> ..`.
const STREAM_SOURCE: &str = "Nats-Stream-Source";

impl Delivery {
    /// Parses the delivery metadata from the reply subject of a message from a pull request.
    /// `sourced`: the consumer reads a partition work stream (see the type's documentation).
    pub fn parse(message: async_nats::Message, sourced: bool) -> Result<Delivery, NotJetStream> {
        let Some(reply) = message.reply.clone() else {
            return Err(NotJetStream(format!(
                "message on {} has no reply subject",
                message.subject
            )));
        };
        let info = parse_ack_subject(&reply).ok_or_else(|| {
            NotJetStream(format!(
                "reply subject {reply} is not a JetStream ack subject"
            ))
        })?;
        let (origin_sequence, subject_start) = if sourced {
            let origin = message
                .headers
                .as_ref()
                .and_then(|h| h.get(STREAM_SOURCE))
                .and_then(|v| v.as_str().split_whitespace().nth(1)?.parse::<u64>().ok());
            let start = message.subject.find('.').map_or(0, |i| i + 1);
            match origin {
                Some(seq) => (seq, start),
                None => {
                    return Err(NotJetStream(format!(
                        "message {} of a partition work stream has no {STREAM_SOURCE} header",
                        info.stream_sequence
                    )))
                }
            }
        } else {
            (info.stream_sequence, 0)
        };
        Ok(Delivery {
            message,
            reply,
            stream_sequence: info.stream_sequence,
            origin_sequence,
            subject_start,
            sourced,
            consumer_sequence: info.consumer_sequence,
            delivered: info.delivered,
            pending: info.pending,
            published_unix_nanos: info.published_unix_nanos,
        })
    }

    /// The subject the producer published to.
    pub fn subject(&self) -> &str {
        &self.message.subject[self.subject_start..]
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.message.headers.as_ref()?.get(name).map(|v| v.as_str())
    }

    /// The message's headers as the producer set them (without the source header a work
    /// stream adds).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &async_nats::HeaderValue)> {
        let sourced = self.sourced;
        self.message
            .headers
            .iter()
            .flat_map(|h| h.iter())
            .filter(move |(name, _)| !(sourced && AsRef::<str>::as_ref(name) == STREAM_SOURCE))
            .flat_map(|(name, values)| values.iter().map(move |v| (name.as_ref(), v)))
    }

    /// Time since the stream stored the message (zero if the clocks disagree).
    pub fn since_published(&self) -> Duration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        Duration::from_nanos(now.saturating_sub(self.published_unix_nanos).max(0) as u64)
    }

    /// The subject acknowledgements go to.
    pub fn reply(&self) -> &Subject {
        &self.reply
    }

    /// Headers grouped for the guest: `(name, values)`.
    pub fn grouped_headers(&self) -> Vec<(&str, Vec<&str>)> {
        match &self.message.headers {
            None => Vec::new(),
            Some(headers) => headers
                .iter()
                .filter(|(name, _)| !(self.sourced && AsRef::<str>::as_ref(name) == STREAM_SOURCE))
                .map(|(name, values)| {
                    (
                        name.as_ref(),
                        values.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
                    )
                })
                .collect(),
        }
    }

    /// Acks: the message is done.
    pub async fn ack(&self, client: &Client, confirm: bool) -> Result<(), AckError> {
        self.send(client, Bytes::from_static(b"+ACK"), confirm)
            .await
    }

    /// Naks: redeliver after `delay` (zero redelivers at once, to any host).
    pub async fn nak(
        &self,
        client: &Client,
        delay: Duration,
        confirm: bool,
    ) -> Result<(), AckError> {
        let payload = if delay.is_zero() {
            Bytes::from_static(b"-NAK")
        } else {
            Bytes::from(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
        };
        self.send(client, payload, confirm).await
    }

    /// Terminates: never redeliver. The reason is recorded by the server (2.10.4+).
    pub async fn term(&self, client: &Client, reason: &str, confirm: bool) -> Result<(), AckError> {
        let reason: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(256)
            .collect();
        self.send(client, Bytes::from(format!("+TERM {reason}")), confirm)
            .await
    }

    /// Tells JetStream the message is still being worked on: AckWait starts over.
    pub async fn progress(&self, client: &Client) -> Result<(), AckError> {
        self.send(client, Bytes::from_static(b"+WPI"), false).await
    }

    async fn send(&self, client: &Client, payload: Bytes, confirm: bool) -> Result<(), AckError> {
        if confirm {
            client
                .request(self.reply.clone(), payload)
                .await
                .map(drop)
                .map_err(|err| AckError(err.to_string()))
        } else {
            client
                .publish(self.reply.clone(), payload)
                .await
                .map_err(|err| AckError(err.to_string()))
        }
    }
}

/// An acknowledgement that could not be sent or was not confirmed. The message is then
/// redelivered after AckWait: a duplicate, never a loss.
#[derive(Debug)]
pub struct AckError(pub String);

impl std::fmt::Display for AckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct AckInfo {
    stream_sequence: u64,
    consumer_sequence: u64,
    delivered: u32,
    pending: u64,
    published_unix_nanos: i64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (v1) or the
/// v2 form with `<domain>.<account hash>` after `$JS.ACK` and an optional trailing token.
fn parse_ack_subject(reply: &str) -> Option<AckInfo> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    // Split without allocating (this runs for every message): v1 has 7 tokens after the
    // prefix; v2 has 9 or more, and only the first 9 matter.
    let mut tokens = [""; 9];
    let mut count = 0;
    for token in rest.split('.') {
        if let Some(slot) = tokens.get_mut(count) {
            *slot = token;
        }
        count += 1;
    }
    let numbers = match count {
        7 => &tokens[2..7],
        n if n >= 9 => &tokens[4..9],
        _ => return None,
    };
    Some(AckInfo {
        delivered: numbers[0].parse().ok()?,
        stream_sequence: numbers[1].parse().ok()?,
        consumer_sequence: numbers[2].parse().ok()?,
        published_unix_nanos: numbers[3].parse().ok()?,
        pending: numbers[4].parse().ok()?,
    })
}

/// Builds the guest's header view from grouped headers.
pub fn header_params<'a>(grouped: &'a [(&'a str, Vec<&'a str>)]) -> Vec<HeaderParam<'a>> {
    grouped
        .iter()
        .map(|(name, values)| HeaderParam {
            name,
            values: values.as_slice(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_ack_subjects() {
        let info =
            parse_ack_subject("$JS.ACK.ORDERS.enrich.3.1042.17.1700000000123456789.55").unwrap();
        assert_eq!(info.delivered, 3);
        assert_eq!(info.stream_sequence, 1042);
        assert_eq!(info.consumer_sequence, 17);
        assert_eq!(info.published_unix_nanos, 1_700_000_000_123_456_789);
        assert_eq!(info.pending, 55);
    }

    #[test]
    fn parses_v2_ack_subjects() {
        let info =
            parse_ack_subject("$JS.ACK.hub.ACCHASH.ORDERS.enrich.1.7.7.1700000000000000000.0.xyz")
                .unwrap();
        assert_eq!(info.delivered, 1);
        assert_eq!(info.stream_sequence, 7);
        assert_eq!(info.pending, 0);
        let info = parse_ack_subject("$JS.ACK._.ACCHASH.S.c.2.9.9.1.4").unwrap();
        assert_eq!(info.stream_sequence, 9);
    }

    #[test]
    fn rejects_other_subjects() {
        assert!(parse_ack_subject("_INBOX.abc").is_none());
        assert!(parse_ack_subject("$JS.ACK.S.c.x.1.1.1.1").is_none());
        assert!(parse_ack_subject("$JS.ACK.S.c.1.1").is_none());
    }
}
