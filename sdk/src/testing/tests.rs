use super::*;
use crate::{config, kv, publish, publish_with_headers, Error, Message};

fn counter(msg: Message) -> Result<(), Error> {
    kv::apply_once("counts", msg.subject(), |current| {
        let count: u64 = current
            .map(|b| String::from_utf8_lossy(b).parse().unwrap_or(0))
            .unwrap_or(0);
        Ok((count + 1).to_string().into_bytes())
    })?;
    Ok(())
}

#[test]
fn apply_once_counts_each_message_once_however_often_it_runs() {
    let mut h = Harness::new();
    let first = Message::new("orders.eu", "").with_sequence("ORDERS", 1);
    h.run(counter, first.clone()).unwrap();
    h.run(counter, first.clone().with_attempt(2)).unwrap();
    h.assert_kv("counts", "orders.eu", "1");
    h.run(
        counter,
        Message::new("orders.eu", "").with_sequence("ORDERS", 2),
    )
    .unwrap();
    h.assert_kv("counts", "orders.eu", "2");
    // A late redelivery of the first message after the second was applied: still once.
    h.run(counter, first.with_attempt(3)).unwrap();
    h.assert_kv("counts", "orders.eu", "2");
}

#[test]
fn a_concurrent_write_is_a_conflict_and_apply_once_reads_again() {
    let mut h = Harness::new().kv_value("counts", "k", "10");
    h.run(
        |_msg| {
            let entry = kv::entry("counts", "k")?.expect("seeded");
            // Someone else writes between our read and our write.
            kv::put("counts", "k", "11")?;
            let lost = kv::put_if("counts", "k", "x", entry.revision).unwrap_err();
            assert!(matches!(lost, kv::KvError::Conflict { ref key } if key == "k"));
            let lost = kv::create("counts", "k", "x").unwrap_err();
            assert!(matches!(lost, kv::KvError::Conflict { .. }));
            let mut calls = 0;
            kv::apply_once("counts", "k", |current| {
                calls += 1;
                if calls == 1 {
                    // A writer sneaks in after apply_once read the key.
                    kv::put("counts", "k", "20")?;
                }
                let n: u64 = String::from_utf8_lossy(current.unwrap()).parse().unwrap();
                Ok((n + 1).to_string().into_bytes())
            })?;
            assert_eq!(calls, 2, "read again after the conflict");
            Ok(())
        },
        Message::new("s", ""),
    )
    .unwrap();
    h.assert_kv("counts", "k", "21");
}

#[test]
fn publishes_get_the_hosts_ids_grants_and_limits() {
    let mut h = Harness::new().allow_publish("out.>").max_publishes(2);
    let result = h.run(
        |_msg| {
            publish("out.a", "1")?;
            publish_with_headers("out.b", "2", &[("Nats-Msg-Id", "mine"), ("X", "y")])?;
            let limit = publish("out.c", "3").unwrap_err();
            assert!(limit.to_string().contains("at most 2"), "{limit}");
            Ok(())
        },
        Message::new("in", "").with_sequence("S", 9),
    );
    result.unwrap();
    assert_eq!(h.published()[0].msg_id, "test:S:9:0");
    assert_eq!(h.published()[1].msg_id, "mine");
    assert_eq!(h.published()[1].header("x"), Some("y"));
    let denied = h
        .run(|_| Ok(publish("secret.x", "")?), Message::new("in", ""))
        .unwrap_err();
    assert!(
        denied.is_reject() && denied.reason().contains("publish.allow"),
        "{denied}"
    );
    let invalid = h
        .run(|_| Ok(publish("out.*", "")?), Message::new("in", ""))
        .unwrap_err();
    assert!(invalid.is_reject(), "{invalid}");
}

#[test]
fn failures_can_be_injected_and_healed() {
    let mut h = Harness::new();
    h.fail_kv(Some("timeout"));
    let err = h.run(counter, Message::new("a", "")).unwrap_err();
    assert!(err.is_retry() && err.reason().contains("timeout"), "{err}");
    h.fail_kv(None).fail_publishes(Some("closed"));
    h.run(counter, Message::new("a", "")).unwrap();
    let err = h
        .run(|_| Ok(publish("x", "")?), Message::new("a", ""))
        .unwrap_err();
    assert!(err.is_retry(), "{err}");
    let denied = Harness::new()
        .allow_kv("other")
        .run(counter, Message::new("a", ""))
        .unwrap_err();
    assert!(denied.is_reject(), "{denied}");
}

#[test]
fn settings_and_structured_logs() {
    let mut h = Harness::new().setting("greeting", "hi");
    h.run(
        |msg| {
            let greeting = config::require("greeting")?;
            assert_eq!(config::get("missing"), None);
            let id = 7;
            crate::info!(order_id = id, large = true; "{greeting} {}", msg.subject());
            crate::warn!("plain {}", 1);
            Ok(())
        },
        Message::new("orders.1", ""),
    )
    .unwrap();
    let logs = h.logs();
    assert_eq!(logs[0].message, "hi orders.1");
    assert_eq!(logs[0].field("order_id"), Some("7"));
    assert_eq!(logs[0].field("large"), Some("true"));
    assert!(logs[1].fields.is_empty());
    h.assert_logged(Level::Warn, "plain 1");
    h.clear();
    assert!(h.logs().is_empty());
    h.assert_nothing_published();
}

#[test]
fn a_panicking_handler_leaves_the_harness_usable() {
    let mut h = Harness::new();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.run(
            |_| {
                kv::put("b", "k", "1")?;
                panic!("boom")
            },
            Message::new("s", ""),
        )
    }));
    assert!(caught.is_err());
    h.assert_kv("b", "k", "1");
    h.run(counter, Message::new("s", "")).unwrap();
}

#[test]
#[should_panic(expected = "outside a handler run")]
fn host_calls_outside_a_run_say_how_to_test() {
    let _ = config::get("x");
}
