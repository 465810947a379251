//! `wasmcloud-noop`: the peers suite's guest for wasmCloud. It exports
//! `wasmcloud:nats/jetstream-handler@0.1.2` and returns `ok` for every delivery without
//! reading it, the same work as Mailroom's `noop` example, so both hosts are measured on what
//! they do around the call.

wit_bindgen::generate!({
    world: "noop",
    path: "wit",
});

use exports::wasmcloud::nats::jetstream_handler::Guest;
use wasmcloud::nats::jetstream::MessageHandle;

struct Noop;

impl Guest for Noop {
    async fn handle_message(_handle: MessageHandle) -> Result<(), String> {
        Ok(())
    }
}

export!(Noop);
