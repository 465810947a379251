//! Host-side bindings for the `mailroom:handler` world, generated from `wit/`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "handler",
    imports: {
        "mailroom:handler/publish": async | trappable,
        "mailroom:handler/kv": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    ownership: Borrowing { duplicate_if_necessary: true },
});
