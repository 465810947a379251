//! Deployed modules on a machine: checking one exactly as a host does before it may run, and
//! the local files downloaded modules are kept in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use super::ModuleRef;
use crate::capabilities::Backend;
use crate::config::HandlerConfig;
use crate::runtime::{HandlerModule, Runtime};
use crate::telemetry::HandlerMetrics;

/// Loads `handler.module` as a host does (reads it, refuses what is not a component,
/// compiles it through the compile cache, links it against the `mailroom:handler` world with
/// the handler's grants, settings and limits), then instantiates it once without calling it.
/// Compiling runs on a blocking thread, so messages keep flowing meanwhile.
pub async fn check(
    runtime: &Runtime,
    handler: &HandlerConfig,
    backend: Arc<dyn Backend>,
    metrics: Arc<HandlerMetrics>,
) -> anyhow::Result<HandlerModule> {
    let (runtime, handler) = (runtime.clone(), handler.clone());
    let module = tokio::task::spawn_blocking(move || {
        crate::host::load(&runtime, &handler, backend, metrics)
    })
    .await
    .context("the module check was cancelled")??;
    module.probe().await.map_err(anyhow::Error::msg)?;
    Ok(module)
}

/// Where downloaded modules are written: `<cache_dir>/modules`, or a temporary directory
/// (removed on drop) when the host has no compile cache.
pub struct ModuleFiles {
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl ModuleFiles {
    /// Opens (creates) the directory.
    pub fn new(cache_dir: Option<&Path>) -> anyhow::Result<ModuleFiles> {
        match cache_dir {
            Some(dir) => {
                let dir = dir.join("modules");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Ok(ModuleFiles { dir, _temp: None })
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("mailroom-modules-")
                    .tempdir()
                    .context("creating a directory for downloaded modules")?;
                Ok(ModuleFiles {
                    dir: temp.path().to_path_buf(),
                    _temp: Some(temp),
                })
            }
        }
    }

    /// The file of `module`.
    pub fn path(&self, module: &ModuleRef) -> PathBuf {
        self.dir.join(format!("{}.wasm", module.object_name()))
    }

    /// The file of `module` if it is here already with the right content.
    pub fn existing(&self, module: &ModuleRef) -> Option<PathBuf> {
        let path = self.path(module);
        let bytes = std::fs::read(&path).ok()?;
        (super::sha256_hex(&bytes) == module.sha256).then_some(path)
    }

    /// Writes verified `bytes` as `module`'s file (a temporary file renamed into place, so a
    /// reader never sees half of it).
    pub fn write(&self, module: &ModuleRef, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let path = self.path(module);
        let tmp = tempfile::NamedTempFile::new_in(&self.dir)
            .with_context(|| format!("writing into {}", self.dir.display()))?;
        std::fs::write(tmp.path(), bytes)
            .with_context(|| format!("writing {}", tmp.path().display()))?;
        tmp.persist(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}
