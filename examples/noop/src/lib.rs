//! `noop`: does nothing and succeeds. The benchmarks use it to measure the host's own cost per
//! message (fetch, fresh instance, call, ack).

fn handle(_msg: mailroom_sdk::Message) -> mailroom_sdk::Result {
    Ok(())
}

mailroom_sdk::export!(handle);

#[cfg(test)]
mod tests {
    #[test]
    fn succeeds_without_calling_the_host() {
        let mut h = mailroom_sdk::testing::Harness::new();
        h.run(super::handle, mailroom_sdk::Message::new("any", "x"))
            .unwrap();
        h.assert_nothing_published();
        assert!(h.logs().is_empty());
    }
}
