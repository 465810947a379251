//! Host-side bindings for the `mailroom:handler` world, generated from its WIT.
//!
//! The current version (`sdk/wit/handler.wit`, `mailroom:handler@0.2.0`) is generated at the top
//! of this module; [`v0_1`] is the frozen 0.1.0 contract (`host/wit/handler-0.1.0.wit`), linked
//! beside it so that components built against 0.1.0 keep running. Both share the `types`
//! interface's Rust types (it did not change), so a message is built once whatever the guest's
//! version.

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "handler",
    imports: {
        "mailroom:handler/publish": async | trappable,
        "mailroom:handler/kv": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    ownership: Borrowing { duplicate_if_necessary: true },
    additional_derives: [PartialEq, Eq],
});

/// `mailroom:handler@0.1.0`: the first released contract, for components built against it.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "wit/handler-0.1.0.wit",
        world: "handler",
        imports: {
            "mailroom:handler/publish": async | trappable,
            "mailroom:handler/kv": async | trappable,
            default: trappable,
        },
        exports: { default: async },
        ownership: Borrowing { duplicate_if_necessary: true },
        with: {
            "mailroom:handler/types": super::mailroom::handler::types,
        },
    });
}
