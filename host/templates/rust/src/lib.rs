//! `{{name}}`: a Mailroom message handler. It reads a JSON order, logs it, and publishes a
//! summary to the subject in its `output-subject` setting.

use mailroom_sdk::{config, info, publish_json, Error, Message};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Order {
    id: u64,
}

#[derive(Serialize)]
struct Summary<'a> {
    id: u64,
    subject: &'a str,
    handled_by: &'a str,
}

fn handle(msg: Message) -> Result<(), Error> {
    // A payload that is not an order rejects the message: no attempt would change it.
    let order: Order = msg.json()?;
    let output = config::require("output-subject")?;
    info!(order_id = order.id; "order received");
    // A publish that fails for a passing reason (NATS unavailable) retries the message.
    publish_json(
        &output,
        &Summary {
            id: order.id,
            subject: msg.subject(),
            handled_by: "{{name}}",
        },
    )?;
    Ok(())
}

mailroom_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use mailroom_sdk::testing::Harness;
    use mailroom_sdk::Message;

    #[test]
    fn publishes_a_summary_of_the_order() {
        let mut harness = Harness::new().setting("output-subject", "summaries");
        harness
            .run(super::handle, Message::new("orders.eu", r#"{"id":7}"#))
            .unwrap();
        harness.assert_published(
            "summaries",
            r#"{"id":7,"subject":"orders.eu","handled_by":"{{name}}"}"#,
        );
        assert_eq!(harness.logs()[0].field("order_id"), Some("7"));
    }

    #[test]
    fn a_payload_that_is_not_an_order_is_rejected() {
        let mut harness = Harness::new().setting("output-subject", "summaries");
        let err = harness
            .run(super::handle, Message::new("orders.eu", "not json"))
            .unwrap_err();
        assert!(err.is_reject(), "{err}");
        harness.assert_nothing_published();
    }
}
