//! Every call into the host, in one place: on `wasm32` the generated WIT imports; elsewhere the
//! [`testing`](crate::testing) harness, so that handler code runs natively under `cargo test`.

#[cfg(target_arch = "wasm32")]
mod imp {
    pub use crate::wit::mailroom::handler::config::get as config_get;
    pub use crate::wit::mailroom::handler::kv::{
        create as kv_create, delete as kv_delete, get as kv_get, put as kv_put, put_if as kv_put_if,
    };
    pub use crate::wit::mailroom::handler::log::log;
    pub use crate::wit::mailroom::handler::publish::publish;
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub use crate::testing::host::{
        config_get, kv_create, kv_delete, kv_get, kv_put, kv_put_if, log, publish,
    };
}

pub(crate) use imp::*;
