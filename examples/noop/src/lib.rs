//! `noop`: does nothing and succeeds. The benchmarks use it to measure the host's own cost per
//! message (fetch, fresh instance, call, ack).

fn handle(_msg: mailroom_sdk::Message) -> mailroom_sdk::Result {
    Ok(())
}

mailroom_sdk::export!(handle);
