//! Which version of the `mailroom:handler` contract a component was built against, and its
//! pre-linked and instantiated forms for each version the host speaks.
//!
//! The version is read from the component's imports (`mailroom:handler/types@0.1.0`, …). Both
//! versions share the `types` interface's Rust types, so a call looks the same either way.

use wasmtime::component::{Component, InstancePre};
use wasmtime::{Engine, Store};

use super::bindings::mailroom::handler::types::{HandlerError, Message};
use super::bindings::{v0_1, Handler, HandlerPre};
use super::instance::HostState;

/// The contract versions this host links, newest first.
pub const VERSIONS: &[&str] = &["0.2.0", "0.1.0"];

/// A handler component, checked and pre-linked for its contract version.
pub(super) enum Pre {
    Current(HandlerPre<HostState>),
    V0_1(v0_1::HandlerPre<HostState>),
}

/// An instantiated handler.
pub(super) enum Bound {
    Current(Handler),
    V0_1(v0_1::Handler),
}

/// The `mailroom:handler` version a component imports, when it names one.
pub(super) fn imported_version(component: &Component, engine: &Engine) -> Option<String> {
    component
        .component_type()
        .imports(engine)
        .find_map(|(name, _)| {
            let rest = name.strip_prefix("mailroom:handler/")?;
            Some(rest.split_once('@')?.1.to_owned())
        })
}

/// The names of a component's imports, for load errors.
pub(super) fn import_names(component: &Component, engine: &Engine) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .collect()
}

impl Pre {
    /// Checks the `handle` export of the version `version` names (the current one when the
    /// component imports no `mailroom:handler` interface).
    pub(super) fn new(pre: InstancePre<HostState>, version: Option<&str>) -> wasmtime::Result<Pre> {
        match version {
            Some("0.1.0") => Ok(Pre::V0_1(v0_1::HandlerPre::new(pre)?)),
            _ => Ok(Pre::Current(HandlerPre::new(pre)?)),
        }
    }

    pub(super) fn engine(&self) -> &Engine {
        match self {
            Pre::Current(pre) => pre.engine(),
            Pre::V0_1(pre) => pre.engine(),
        }
    }

    pub(super) async fn instantiate_async(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<Bound> {
        match self {
            Pre::Current(pre) => Ok(Bound::Current(pre.instantiate_async(store).await?)),
            Pre::V0_1(pre) => Ok(Bound::V0_1(pre.instantiate_async(store).await?)),
        }
    }
}

impl Bound {
    pub(super) async fn call_handle(
        &self,
        store: &mut Store<HostState>,
        msg: Message<'_>,
    ) -> wasmtime::Result<Result<(), HandlerError>> {
        match self {
            Bound::Current(handler) => handler.call_handle(store, msg).await,
            Bound::V0_1(handler) => handler.call_handle(store, msg).await,
        }
    }
}
