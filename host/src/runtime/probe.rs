//! A trial instantiation: what a host checks, besides compiling and linking, before a module
//! may replace a running one (a component whose start-up traps would fail every message).

use std::sync::Arc;

use super::HandlerModule;
use crate::capabilities::{CallContext, Grants, HandlerCaps, MemoryBackend};

impl HandlerModule {
    /// Instantiates the module once, under its memory and time limits, without calling
    /// `handle`. The instance gets no grants and an in-memory backend, so whatever its
    /// start-up code tries is refused and nothing leaves the host. Fails with a sentence
    /// saying what went wrong.
    pub async fn probe(&self) -> Result<(), String> {
        let caps = Arc::new(HandlerCaps {
            name: self.caps.name.clone(),
            grants: Grants::default(),
            settings: self.caps.settings.clone(),
            max_publishes: 0,
            log_budget: 0,
            backend: Arc::new(MemoryBackend::new(1 << 20)),
            metrics: Arc::default(),
        });
        let call = CallContext::new(caps, "probe".into(), 0);
        let (mut store, capture) = self.new_store(call);
        store.set_epoch_deadline(1);
        let instantiated =
            tokio::time::timeout(self.limits.timeout, self.pre.instantiate_async(&mut store)).await;
        let stderr = capture.take().stderr;
        let said = String::from_utf8_lossy(&stderr[..stderr.len().min(300)])
            .trim()
            .replace('\n', " ");
        // One line: the reason ends up in logs and in `mailroom ls`.
        let one_line = |err: wasmtime::Error| {
            format!("{err:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        match instantiated {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) if said.is_empty() => Err(format!(
                "module fails when instantiated (before any message): {}",
                one_line(err)
            )),
            Ok(Err(err)) => Err(format!(
                "module fails when instantiated (before any message): {}; it wrote: {said}",
                one_line(err)
            )),
            Err(_) => Err(format!(
                "module does not finish instantiating within its time limit of {:?}",
                self.limits.timeout
            )),
        }
    }
}
