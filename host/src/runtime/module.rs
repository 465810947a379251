//! Loading handler modules: validate, compile (or load the cached compilation), pre-link.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::contract::{self, Pre};
use super::instance::Limits;
use super::Runtime;
use crate::capabilities::HandlerCaps;

/// A handler module, compiled and linked, ready to run messages in fresh (or warm, reused)
/// instances.
pub struct HandlerModule {
    pub(super) name: Arc<str>,
    pub(super) pre: Pre,
    /// The `mailroom:handler` version the component was built against.
    pub(super) version: &'static str,
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

    /// The `mailroom:handler` contract version the component was built against.
    pub fn contract_version(&self) -> &'static str {
        self.version
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
        let component = self.compile(path, &limits)?;
        let shown = path.display();
        let imported = contract::imported_version(&component, &self.engine);
        let version = match imported.as_deref() {
            None => contract::VERSIONS[0],
            Some(v) => contract::VERSIONS
                .iter()
                .copied()
                .find(|known| *known == v)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "module {shown} was built against mailroom:handler@{v}, which this host \
                         does not know (it runs {}): upgrade the host, or build the handler \
                         with an SDK for one of those versions",
                        contract::VERSIONS.join(" and ")
                    )
                })?,
        };
        let pre = self.linker.instantiate_pre(&component).map_err(|err| {
            let imports = contract::import_names(&component, &self.engine);
            anyhow::anyhow!(
                "module {shown} needs something the host does not provide: {err}. \
                 Mailroom provides the mailroom:handler imports (publish, kv, log, config; \
                 versions {}) and WASI 0.2 (wasm32-wasip2) without network or files{}",
                contract::VERSIONS.join(", "),
                import_hint(&imports)
            )
        })?;
        let pre = Pre::new(pre, Some(version)).map_err(|err| {
            anyhow::anyhow!(
                "module {shown} is not a mailroom handler: {err}. It must export the \
                 mailroom:handler/handler world's `handle` function; build it with \
                 mailroom-sdk's export! macro (Python: componentize-py -w handler; \
                 JavaScript: export `handle` from the module given to componentize)"
            )
        })?;
        Ok(HandlerModule {
            name: caps.name.clone(),
            pre,
            version,
            limits,
            isolation,
            caps,
            _ticker: self._ticker.clone(),
        })
    }

    /// Reads, validates and compiles `path`, through the on-disk cache when one is configured.
    fn compile(&self, path: &Path, limits: &Limits) -> anyhow::Result<Component> {
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
        check_initial_memory(&bytes, limits.memory)
            .map_err(|err| anyhow::anyhow!("module {shown} {err}"))?;
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

/// A hint for imports the host will never provide, naming the build flags that leave them out.
fn import_hint(imports: &[String]) -> String {
    if imports.iter().any(|i| i.starts_with("wasi:http/")) {
        return ". It imports wasi:http, which handlers cannot use (publish through \
                mailroom:handler/publish instead). A JavaScript component built with \
                componentize-js or jco includes it by default: build with \
                `--disable http fetch-event` (StarlingMonkey), or use jco's QuickJS backend \
                (`jco componentize --backend quickjs --backend-qjs-disable-async`)"
            .to_owned();
    }
    let foreign: Vec<&str> = imports
        .iter()
        .map(String::as_str)
        .filter(|i| !i.starts_with("wasi:") && !i.starts_with("mailroom:handler/"))
        .collect();
    if foreign.is_empty() {
        String::new()
    } else {
        format!(". Imports the host does not know: {}", foreign.join(", "))
    }
}

/// Refuses a module whose initial memory is above the handler's limit before compiling it,
/// saying in MiB what the limit must be raised to.
fn check_initial_memory(bytes: &[u8], limit: usize) -> Result<(), String> {
    let mut largest: u64 = 0;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        // A malformed module is the compiler's to report, with its own words.
        let Ok(payload) = payload else { return Ok(()) };
        if let wasmparser::Payload::MemorySection(reader) = payload {
            for memory in reader.into_iter().flatten() {
                let page = memory.page_size_log2.map_or(65536u64, |log2| 1u64 << log2);
                largest = largest.max(memory.initial.saturating_mul(page));
            }
        }
    }
    if largest > limit as u64 {
        let mib = |b: u64| b.div_ceil(1 << 20);
        return Err(format!(
            "starts with {} MiB of linear memory ({largest} bytes), more than the handler's \
             memory limit of {} MiB: raise `limits.memory` to at least \"{}MiB\"",
            mib(largest),
            (limit as u64) >> 20,
            mib(largest)
        ));
    }
    Ok(())
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
