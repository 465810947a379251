//! The WebAssembly runtime: one wasmtime engine, the handler modules it compiled, and a fresh
//! sandboxed instance per message (or, under `isolation = "reuse"`, a warm instance per worker
//! reused for a bounded number of messages).
//!
//! Invariants:
//! - The runtime knows nothing about NATS. It takes a message, runs the handler, and returns a
//!   typed [`Outcome`] plus the publishes to confirm; the consumer decides what that means for
//!   JetStream.
//! - A guest trap, timeout or memory exhaustion fails that one call, never the host: every
//!   call runs in a `Store` with its own limits (its own, or its worker's warm one), and a
//!   store that trapped or was interrupted is dropped, never entered again.
//! - Guests get no ambient authority: WASI is linked (Rust std needs it) but with an empty
//!   context: no files, no environment, no arguments, no network, no inherited stdio.
//! - Modules are validated and pre-linked at load, so a bad module is refused at start-up
//!   with an error naming the file and the missing piece, never discovered per message.

pub mod bindings;
mod contract;
mod instance;
mod module;
mod probe;
mod slot;
mod stdio;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::capabilities::CallContext;

pub use bindings::mailroom::handler::types::{HeaderParam, Message as GuestMessage};
pub use instance::{Failure, FailureKind, Invoked, Isolation, Limits, Outcome, Warm};
pub use module::HandlerModule;
pub use slot::{Loaded, ModuleSlot};

pub(crate) use instance::HostState;

/// How to size and build the engine.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Instances that may be alive at once across all handlers (pooling-allocator slots).
    pub max_instances: u32,
    /// The largest per-instance memory limit of any handler, in bytes.
    pub max_memory: usize,
    /// How often the epoch advances: the granularity of time limits and of yielding to other
    /// tasks during long guest computations.
    pub epoch_tick: Duration,
    /// Where compiled modules are cached; `None` compiles on every start.
    pub cache_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 64,
            max_memory: 64 << 20,
            epoch_tick: Duration::from_millis(10),
            cache_dir: None,
        }
    }
}

/// The engine, the linker with every host import, and the epoch ticker.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    cache_dir: Option<PathBuf>,
    _ticker: Arc<EpochTicker>,
}

impl Runtime {
    /// Builds the engine (pooling allocator sized from `config`) and starts the epoch ticker.
    pub fn new(config: &RuntimeConfig) -> anyhow::Result<Runtime> {
        let engine = Engine::new(&engine_config(config))
            .map_err(anyhow::Error::from)
            .context("configuring wasmtime")?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;
        bindings::Handler::add_to_linker::<HostState, HasSelf<CallContext>>(&mut linker, |s| {
            &mut s.call
        })
        .map_err(anyhow::Error::from)
        .context("linking the mailroom:handler imports")?;
        bindings::v0_1::Handler::add_to_linker::<HostState, HasSelf<CallContext>>(
            &mut linker,
            |s| &mut s.call,
        )
        .map_err(anyhow::Error::from)
        .context("linking the mailroom:handler@0.1.0 imports")?;
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick)?;
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            cache_dir: config.cache_dir.clone(),
            _ticker: Arc::new(ticker),
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// What one component may hold, at most: a component past these is refused at load (wasmtime
/// checks them when it compiles), and every component within them can run `max_instances` at
/// once, because the pool's totals are these times `max_instances`. The core-instance and table
/// totals are counters (the metadata is allocated per instance), so the headroom costs nothing;
/// memory slots reserve address space (a 4 GiB reservation each), not memory, so they stay at
/// two per slot as before. Rust components use 3 to 5 core instances and one memory; a
/// componentize-py component 14 core instances and one memory.
const CORE_INSTANCES_PER_COMPONENT: u32 = 64;
const TABLES_PER_COMPONENT: u32 = 64;
const MEMORIES_PER_COMPONENT: u32 = 2;

fn engine_config(config: &RuntimeConfig) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    let instances = config.max_instances.max(1);
    pool.total_component_instances(instances)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_memories(instances.saturating_mul(MEMORIES_PER_COMPONENT))
        .total_tables(instances.saturating_mul(TABLES_PER_COMPONENT))
        .total_stacks(instances)
        .max_memory_size(config.max_memory)
        // Reset small memories and tables by zeroing the pages a call dirtied instead of
        // returning them to the kernel; with pagemap scanning only dirtied pages are touched.
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(64 << 10)
        .pagemap_scan(Enabled::Auto);
    let mut cfg = Config::new();
    cfg.wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .cranelift_opt_level(wasmtime::OptLevel::Speed);
    cfg
}

/// Advances the engine's epoch on a dedicated thread until dropped.
pub(crate) struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> anyhow::Result<EpochTicker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mailroom-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .context("starting the epoch ticker thread")?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
