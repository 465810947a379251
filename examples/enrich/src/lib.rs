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

    mailroom_sdk::debug!(subject = msg.subject(), sequence = msg.sequence(); "enriched");
    publish_json(&output, &order)?;
    Ok(())
}

mailroom_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use mailroom_sdk::testing::Harness;
    use mailroom_sdk::Message;
    use serde_json::Value;

    #[test]
    fn adds_amount_tier_and_source_and_publishes_json() {
        let mut h = Harness::new().setting("output-subject", "enriched.orders");
        let msg = Message::new("orders.eu", r#"{"id":7,"amount_cents":250000}"#)
            .with_sequence("ORDERS", 42);
        h.run(super::handle, msg).unwrap();
        let out = h.published_to("enriched.orders");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].header("Content-Type"), Some("application/json"));
        let order: Value = out[0].json();
        assert_eq!(order["amount"], "2500.00");
        assert_eq!(order["tier"], "large");
        assert_eq!(order["source"]["sequence"], 42);
        assert_eq!(order["enriched_by"], "test");
        assert_eq!(h.logs()[0].field("sequence"), Some("42"));
    }

    #[test]
    fn bad_json_or_a_missing_setting_rejects() {
        let mut h = Harness::new().setting("output-subject", "out");
        let err = h.run(super::handle, Message::new("o", "nope")).unwrap_err();
        assert!(err.is_reject(), "{err}");
        let err = Harness::new()
            .run(super::handle, Message::new("o", "{}"))
            .unwrap_err();
        assert!(err.reason().contains("output-subject"), "{err}");
        h.assert_nothing_published();
    }
}
