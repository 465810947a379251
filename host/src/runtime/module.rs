//! Loading handler modules: validate, compile (or load the cached compilation), pre-link.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::HandlerPre;
use super::instance::{HostState, Limits};
use super::Runtime;
use crate::capabilities::HandlerCaps;

/// A handler module, compiled and linked, ready to run messages in fresh (or warm, reused)
/// instances.
pub struct HandlerModule {
    pub(super) name: Arc<str>,
    pub(super) pre: HandlerPre<HostState>,
    pub(super) limits: Limits,
    pub(super) isolation: super::Isolation,
    pub(super) caps: Arc<HandlerCaps>,
    /// Keeps the engine's epoch ticking for as long as the module can run: without it time
    /// limits never fire and a spinning guest never yields its thread.
    pub(super) _ticker: Arc<super::EpochTicker>,
}

impl std::fmt::Debug for HandlerModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerModule")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl HandlerModule {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The handler's capabilities (grants, settings, backend).
    pub fn caps(&self) -> &Arc<HandlerCaps> {
        &self.caps
    }
}

const WASM_MAGIC: &[u8] = b"\0asm";
/// Version and layer of a core module (`01 00 00 00`).
const CORE_MODULE_VERSION: &[u8] = &[0x01, 0x00, 0x00, 0x00];

impl Runtime {
    /// Loads the module at `path` as handler `caps.name`.
    ///
    /// Fails with an error that names the file and what is wrong with it: unreadable, not
    /// WebAssembly, a core module rather than a component, an import the host does not provide,
    /// or no `handle` export of the `mailroom:handler/handler` world.
    pub fn load_handler(
        &self,
        path: &Path,
        limits: Limits,
        isolation: super::Isolation,
        caps: Arc<HandlerCaps>,
    ) -> anyhow::Result<HandlerModule> {
        let component = self.compile(path)?;
        let shown = path.display();
        let pre = self.linker.instantiate_pre(&component).map_err(|err| {
            anyhow::anyhow!(
                "module {shown} needs something the host does not provide: {err}. \
                 Mailroom provides the mailroom:handler@0.1.0 imports (publish, kv, log, config) \
                 and WASI 0.2 (wasm32-wasip2)"
            )
        })?;
        let pre = HandlerPre::new(pre).map_err(|err| {
            anyhow::anyhow!(
                "module {shown} is not a mailroom handler: {err}. It must export the \
                 mailroom:handler/handler world's `handle` function; build it with \
                 mailroom-sdk's export! macro"
            )
        })?;
        Ok(HandlerModule {
            name: caps.name.clone(),
            pre,
            limits,
            isolation,
            caps,
            _ticker: self._ticker.clone(),
        })
    }

    /// Reads, validates and compiles `path`, through the on-disk cache when one is configured.
    fn compile(&self, path: &Path) -> anyhow::Result<Component> {
        let shown = path.display();
        let bytes = std::fs::read(path).with_context(|| {
            format!("cannot read module {shown}: build the handler first, or fix the path")
        })?;
        if !bytes.starts_with(WASM_MAGIC) {
            bail!(
                "module {shown} is not WebAssembly (it does not start with \\0asm); \
                 point `module` at the .wasm file built with --target wasm32-wasip2"
            );
        }
        if bytes.get(4..8) == Some(CORE_MODULE_VERSION) {
            bail!(
                "module {shown} is a core WebAssembly module, not a component; build it \
                 with `cargo build --target wasm32-wasip2` (which emits components) or wrap it \
                 with `wasm-tools component new`"
            );
        }
        let Some(cache_dir) = &self.cache_dir else {
            return Component::from_binary(&self.engine, &bytes)
                .map_err(|err| anyhow::anyhow!("module {shown} does not compile: {err:#}"));
        };
        let cached = cache_dir.join(format!("{}.cwasm", self.cache_key(&bytes)));
        if cached.exists() {
            // SAFETY: the cache directory belongs to this host and is written only by
            // `store_cached` below with the output of `Component::serialize` for exactly this
            // engine configuration (the file name hashes the module bytes and the engine's
            // compatibility hash). A file that fails wasmtime's own header checks is
            // recompiled instead.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => {
                    tracing::debug!(module = %shown, cache = %cached.display(), "loaded compiled module from cache");
                    return Ok(component);
                }
                Err(err) => tracing::warn!(
                    cache = %cached.display(),
                    "ignoring unusable cached compilation: {err:#}"
                ),
            }
        }
        let component = Component::from_binary(&self.engine, &bytes)
            .map_err(|err| anyhow::anyhow!("module {shown} does not compile: {err:#}"))?;
        if let Err(err) = store_cached(&component, cache_dir, &cached) {
            tracing::warn!(cache = %cached.display(), "cannot cache compiled module: {err:#}");
        }
        Ok(component)
    }

    fn cache_key(&self, bytes: &[u8]) -> String {
        struct ShaHasher(Sha256);
        impl Hasher for ShaHasher {
            fn finish(&self) -> u64 {
                0
            }
            fn write(&mut self, bytes: &[u8]) {
                self.0.update(bytes);
            }
        }
        let mut hasher = ShaHasher(Sha256::new());
        hasher.write(bytes);
        hasher.write(env!("CARGO_PKG_VERSION").as_bytes());
        std::hash::Hash::hash(&self.engine.precompile_compatibility_hash(), &mut hasher);
        let digest = hasher.0.finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn store_cached(component: &Component, dir: &Path, target: &PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = component.serialize().map_err(anyhow::Error::from)?;
    // Write then rename, so a concurrent host never reads a half-written file.
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), bytes)?;
    tmp.persist(target)?;
    Ok(())
}
