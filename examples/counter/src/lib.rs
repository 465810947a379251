//! `counter`: counts messages per subject in a KV bucket (setting `bucket`, default `counts`).
//!
//! Each message adds one to its subject's count with [`kv::apply_once`]: a conditional
//! read-modify-write that the host recognises when the same message runs again. So the counts
//! are exact even when a host dies between writing a count and acking its message (the
//! redelivery stores nothing), and even without ordering (two messages of one subject running
//! at once on two hosts: the loser of the conditional write reads again).

use mailroom_sdk::{config, kv, Error, Message};

/// The new count for a subject whose count is `current`.
fn increment(bucket: &str, key: &str, current: Option<&[u8]>) -> Result<Vec<u8>, Error> {
    let count = match current {
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| Error::reject(format!("{bucket}/{key} does not hold a number")))?,
        None => 0,
    };
    Ok((count + 1).to_string().into_bytes())
}

fn handle(msg: Message) -> Result<(), Error> {
    let bucket = config::get("bucket").unwrap_or_else(|| "counts".to_owned());
    let key = msg.subject();
    let revision = kv::apply_once(&bucket, key, |current| increment(&bucket, key, current))?;
    mailroom_sdk::debug!(key = key, revision = revision; "counted");
    Ok(())
}

mailroom_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use mailroom_sdk::testing::Harness;
    use mailroom_sdk::Message;

    fn order(subject: &str, sequence: u64) -> Message {
        Message::new(subject, "{}").with_sequence("ORDERS", sequence)
    }

    #[test]
    fn counts_per_subject_and_a_redelivery_counts_once() {
        let mut h = Harness::new().setting("bucket", "counts");
        h.run(super::handle, order("orders.eu", 1)).unwrap();
        h.run(super::handle, order("orders.us", 2)).unwrap();
        h.run(super::handle, order("orders.eu", 3)).unwrap();
        // Message 3 again, as after a crash between the write and the ack.
        h.run(super::handle, order("orders.eu", 3).with_attempt(2))
            .unwrap();
        h.assert_kv("counts", "orders.eu", "2");
        h.assert_kv("counts", "orders.us", "1");
    }

    #[test]
    fn a_key_that_is_not_a_number_rejects_the_message() {
        let mut h = Harness::new().kv_value("counts", "orders.eu", "many");
        let err = h.run(super::handle, order("orders.eu", 1)).unwrap_err();
        assert!(err.is_reject(), "{err}");
        assert!(err.reason().contains("does not hold a number"), "{err}");
    }
}
