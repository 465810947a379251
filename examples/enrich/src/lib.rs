//! `enrich`: parses a JSON object, adds fields, publishes the result to the subject named by the
//! `output-subject` setting. Shows JSON in and out, config, logging, and a publish that the host
//! confirms before acking the input.

use mailroom_sdk::{config, publish_json, Error, Message};
use serde_json::{json, Map, Value};

fn handle(msg: Message) -> Result<(), Error> {
    let mut order: Map<String, Value> = msg.json()?;
    let output = config::require("output-subject")?;

    let amount_cents = order.get("amount_cents").and_then(Value::as_u64);
    if let Some(cents) = amount_cents {
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
            "subject": msg.subject(),
            "stream": msg.stream(),
            "sequence": msg.sequence(),
            "attempt": msg.attempt(),
        }),
    );
    order.insert("enriched_by".into(), json!(msg.handler_name()));

    mailroom_sdk::debug!("enriched {} seq {}", msg.subject(), msg.sequence());
    publish_json(&output, &order)?;
    Ok(())
}

mailroom_sdk::export!(handle);
