//! `counter`: counts messages per subject in a KV bucket (setting `bucket`, default `counts`).
//!
//! It reads the count, adds one and writes it back: a read-modify-write that is only correct when
//! messages of one subject are handled one at a time, in order. Run it with `ordering = "none"`
//! and a high concurrency and counts come out low; that is what Mailroom's per-subject ordering
//! prevents.

use mailroom_sdk::{config, kv, Error, Message};

fn handle(msg: Message) -> Result<(), Error> {
    let bucket = config::get("bucket").unwrap_or_else(|| "counts".to_owned());
    let key = msg.subject();
    let current = match kv::get(&bucket, key)? {
        Some(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| Error::reject(format!("{bucket}/{key} does not hold a number")))?,
        None => 0,
    };
    let next = current + 1;
    kv::put(&bucket, key, next.to_string())?;
    mailroom_sdk::debug!("{key} = {next}");
    Ok(())
}

mailroom_sdk::export!(handle);
