//! A handler's module, replaceable while messages run: the hot swap.
//!
//! Workers never lock on the message path. The slot keeps a version number next to the
//! module; each worker keeps its own [`Loaded`] copy (the module's `Arc`, the version it was
//! taken at, and its warm instance) and compares versions before every message, one atomic
//! load. Only after a swap does a worker take the slot's mutex, once, to pick up the new
//! module; its warm instance of the old one is dropped then.
//!
//! Invariants:
//! - A message runs entirely on the module its worker held when the message started: a swap
//!   never reaches a running call, so messages already running finish on the old version.
//! - A message started after [`ModuleSlot::swap`] returned runs on the new module: the version
//!   is bumped (release) after the new module is in place, and a worker reads it (acquire)
//!   before each message. A key's next message starts only after its previous one finished,
//!   through the executor's mutex, so within a host a key never goes back to an older version.
//! - A warm instance (`isolation = "reuse"`) never outlives the module it was made from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{GuestMessage, HandlerModule, Invoked, Warm};
use crate::fence::Fence;

/// The module a handler runs now, and how many times it was replaced.
pub struct ModuleSlot {
    version: AtomicU64,
    current: Mutex<Arc<HandlerModule>>,
}

impl std::fmt::Debug for ModuleSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleSlot")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl ModuleSlot {
    /// A slot holding `module` at version 0.
    pub fn new(module: HandlerModule) -> ModuleSlot {
        ModuleSlot {
            version: AtomicU64::new(0),
            current: Mutex::new(Arc::new(module)),
        }
    }

    /// How many times the module was replaced.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The module in place now.
    pub fn current(&self) -> Arc<HandlerModule> {
        self.lock().clone()
    }

    /// Puts `module` in place: messages that start from now on run on it. Returns the new
    /// version.
    pub fn swap(&self, module: HandlerModule) -> u64 {
        let mut current = self.lock();
        *current = Arc::new(module);
        // Bumped while the lock is held, so two swaps cannot publish their versions out of
        // order; a worker that sees the new version finds the new module behind the lock.
        self.version.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// A worker's own copy of the current module, without a warm instance.
    pub fn load(&self) -> Loaded {
        let current = self.lock();
        Loaded {
            version: self.version.load(Ordering::Acquire),
            module: current.clone(),
            warm: None,
        }
    }

    /// Brings `loaded` up to date: free unless the module was replaced since it was taken.
    #[inline]
    pub fn refresh(&self, loaded: &mut Loaded) {
        if self.version.load(Ordering::Acquire) != loaded.version {
            *loaded = self.load();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<HandlerModule>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One worker's module: the version it took from the slot, and its warm instance.
pub struct Loaded {
    version: u64,
    module: Arc<HandlerModule>,
    warm: Option<Warm>,
}

impl Loaded {
    /// The module.
    pub fn module(&self) -> &HandlerModule {
        &self.module
    }

    /// The slot version this copy was taken at.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// [`HandlerModule::invoke_fenced`] with this worker's warm instance.
    pub async fn invoke_fenced(
        &mut self,
        msg: GuestMessage<'_>,
        stream: Arc<str>,
        fence: Option<Arc<Fence>>,
    ) -> Invoked {
        self.module
            .invoke_fenced(&mut self.warm, msg, stream, fence)
            .await
    }
}
