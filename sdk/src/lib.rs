//! Write [Mailroom](https://github.com/mailroom) message handlers in Rust.
//!
//! A handler is a function from a [`Message`] to `Result<(), Error>`, exported with
//! [`export!`]. Build it with `cargo build --target wasm32-wasip2 --release`: the `.wasm` file
//! in `target/wasm32-wasip2/release/` is a WebAssembly component a Mailroom host can run. No
//! other tool is needed.
//!
//! The host runs every message in a fresh sandboxed instance, so a handler keeps no state between
//! messages: it reads the message, calls the host ([`publish()`], [`kv`], [`config`], the log
//! macros) and returns. What the result does to the JetStream message:
//!
//! | the handler returns                  | the host                                                      |
//! |--------------------------------------|---------------------------------------------------------------|
//! | `Ok(())`                             | confirms every publish of this call, then acks the message    |
//! | [`Error::retry`] / [`Error::retry_after`] | redelivers it later (backoff, or the delay you asked for); dead-letters it after the last attempt |
//! | [`Error::reject`]                    | never retries it: dead-letters it with your reason            |
//! | a panic, trap, time-out, out of memory | counts as a failed attempt, like `retry`                    |
//!
//! # A complete handler
//!
//! ```no_run
//! use mailroom_sdk::{config, publish_json, Error, Message};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Order {
//!     id: u64,
//!     amount_cents: u64,
//! }
//!
//! #[derive(Serialize)]
//! struct Enriched {
//!     id: u64,
//!     amount_cents: u64,
//!     large: bool,
//!     source_sequence: u64,
//! }
//!
//! fn handle(msg: Message) -> Result<(), Error> {
//!     // A payload that is not an order will never become one: `json` rejects it.
//!     let order: Order = msg.json()?;
//!     let output = config::require("output-subject")?;
//!     mailroom_sdk::info!("order {} for {} cents", order.id, order.amount_cents);
//!     // A publish that fails for a passing reason turns into a retry through `?`.
//!     publish_json(
//!         &output,
//!         &Enriched {
//!             id: order.id,
//!             amount_cents: order.amount_cents,
//!             large: order.amount_cents >= 100_000,
//!             source_sequence: msg.sequence(),
//!         },
//!     )?;
//!     Ok(())
//! }
//!
//! mailroom_sdk::export!(handle);
//! ```
//!
//! With a `Cargo.toml` holding
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! mailroom-sdk = "0.1"
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! # Testing handlers
//!
//! `cargo test` runs a handler natively: off `wasm32`, host calls go to a
//! [`testing::Harness`], which holds settings, an in-memory KV store, and records every publish
//! and log record for your assertions:
//!
//! ```ignore
//! #[test]
//! fn enriches_large_orders() {
//!     let mut harness = Harness::new().setting("output-subject", "enriched.orders");
//!     harness.run(handle, Message::new("orders.eu", r#"{"id":7,"amount_cents":250000}"#))?;
//!     let out = &harness.published_to("enriched.orders")[0];
//!     assert_eq!(out.json::<serde_json::Value>()["large"], true);
//! }
//! ```
//!
//! To run the built component exactly as the host does, use
//! `mailroom invoke handler.wasm --subject orders.1 --data '{"id":1}'`.
//!
//! # State that survives a crash
//!
//! [`kv::apply_once`] applies a message's effect to a KV key exactly once, even when the
//! message runs again after its host died between the write and the ack.
#![deny(missing_docs)]

// The generated bindings name this crate by its public path, which also has to resolve inside it.
extern crate self as mailroom_sdk;

mod error;
mod host;
mod message;

pub mod config;
pub mod kv;
pub mod log;
mod publish;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use error::{Error, Result};
pub use message::Message;
#[cfg(feature = "json")]
pub use publish::publish_json;
pub use publish::{publish, publish_with_headers, PublishError};

/// Generated bindings for the `mailroom:handler` WIT world. Not a stable API: use the
/// hand-written items of this crate instead.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod wit {
    wit_bindgen::generate!({
        path: "wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler_world",
        default_bindings_module: "mailroom_sdk::wit",
        runtime_path: "mailroom_sdk::__private::wit_bindgen::rt",
    });
}

/// Implementation details used by [`export!`]. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    use crate::wit::mailroom::handler::types;

    /// Adapts a handler function to the generated export signature.
    pub fn dispatch<F>(msg: types::Message, handler: F) -> Result<(), types::HandlerError>
    where
        F: FnOnce(crate::Message) -> crate::Result<()>,
    {
        handler(crate::Message::from_wit(msg)).map_err(crate::Error::into_wit)
    }
}

/// Exports a handler function as the component's `handle`.
///
/// The argument is a function `fn(Message) -> Result<(), Error>`: a free function,
/// or an associated function of a type that implements [`Handler`]. Use it once per component.
///
/// ```no_run
/// fn handle(msg: mailroom_sdk::Message) -> mailroom_sdk::Result {
///     mailroom_sdk::info!("got {} bytes", msg.payload().len());
///     Ok(())
/// }
/// mailroom_sdk::export!(handle);
/// ```
///
/// ```no_run
/// use mailroom_sdk::{Handler, Message, Result};
///
/// struct Audit;
///
/// impl Handler for Audit {
///     fn handle(msg: Message) -> Result {
///         mailroom_sdk::info!("audit {}", msg.subject());
///         Ok(())
///     }
/// }
/// mailroom_sdk::export!(<Audit as Handler>::handle);
/// ```
#[macro_export]
macro_rules! export {
    ($handler:expr) => {
        const _: () = {
            struct MailroomHandlerExport;

            impl $crate::wit::Guest for MailroomHandlerExport {
                fn handle(
                    msg: $crate::wit::mailroom::handler::types::Message,
                ) -> ::core::result::Result<(), $crate::wit::mailroom::handler::types::HandlerError>
                {
                    $crate::__private::dispatch(msg, $handler)
                }
            }

    $crate::wit::__export_handler_world!(MailroomHandlerExport with_types_in $crate::wit);
        };
    };
}

/// A message handler as a trait, for handlers that group their logic in a type.
///
/// Export it with `mailroom_sdk::export!(<MyType as Handler>::handle)`.
pub trait Handler {
    /// Handles one message. See the crate documentation for what the result does.
    fn handle(msg: Message) -> Result<()>;
}
