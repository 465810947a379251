//! What kind of change a new revision is, decided from the validated configs alone (pure):
//! `deploy` says it before doing anything, and every host applies it the same way.
//!
//! - **Hot swap**: only the module, its settings, grants (`publish.allow`, `kv.allow`) or its
//!   per-call limits (`limits.memory`, `limits.output`, `limits.max_publishes`, `limits.log`)
//!   or `isolation` changed. These live in the loaded module, so the host swaps it under the
//!   running consumer: nothing is handed back, no consumer changes.
//! - **Drain and rebind**: anything else changed. The binding fields (stream, consumer,
//!   subjects, ordering, partitions) change how messages reach the host; the others (retry,
//!   workers, buffers, `ack_wait`, `dead_letter`, `limits.timeout`, …) are read by the
//!   consumer as it runs. Either way the host drains the handler (as on SIGTERM: partitions
//!   released gracefully, nothing lost or run twice) and starts it again with the new spec.
//!
//! Every field counts: one this module does not name is compared too, and a difference there
//! is a drain and rebind (the safe kind).

use std::fmt;
use std::path::PathBuf;

use crate::config::HandlerConfig;

use super::ModuleRef;

/// The kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The handler is not running yet (first deploy, or after an undeploy).
    New,
    /// Same module, same spec: nothing to do.
    Unchanged,
    /// The module is replaced under the running consumer.
    HotSwap,
    /// The handler is drained and started again.
    Rebind,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::New => "a new handler",
            Kind::Unchanged => "unchanged",
            Kind::HotSwap => "a hot swap",
            Kind::Rebind => "a drain and rebind",
        })
    }
}

/// A change and what it consists of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its kind.
    pub kind: Kind,
    /// What differs, for people (`module 1a2b3c… → 4d5e6f…`, `partitions`, …).
    pub what: Vec<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if !self.what.is_empty() {
            write!(f, " ({})", self.what.join(", "))?;
        }
        Ok(())
    }
}

/// Fields that change how the consumer is bound.
const BINDING: [&str; 5] = ["stream", "consumer", "subjects", "ordering", "partitions"];

/// The change from `old` (running, with its module) to `new`.
pub fn classify(
    old: Option<(&HandlerConfig, &ModuleRef)>,
    new: (&HandlerConfig, &ModuleRef),
) -> Change {
    let (new_config, new_module) = new;
    let Some((old_config, old_module)) = old else {
        return Change {
            kind: Kind::New,
            what: Vec::new(),
        };
    };
    let mut what = Vec::new();
    if old_module != new_module {
        what.push(format!(
            "module {}… → {}…",
            old_module.short(),
            new_module.short()
        ));
    }
    let (old_fields, new_fields) = (fields(old_config), fields(new_config));
    let mut rebind = Vec::new();
    for ((name, swappable, a), (_, _, b)) in old_fields.iter().zip(&new_fields) {
        if a != b {
            if *swappable {
                what.push((*name).to_owned());
            } else {
                rebind.push((*name).to_owned());
            }
        }
    }
    // Anything not named above (a field added later) still counts, as a drain and rebind.
    if rebind.is_empty() && normalized(old_config) != normalized(new_config) {
        rebind.push("other settings".to_owned());
    }
    let kind = match (rebind.is_empty(), what.is_empty()) {
        (true, true) => Kind::Unchanged,
        (true, false) => Kind::HotSwap,
        (false, _) => Kind::Rebind,
    };
    // Binding fields first: they are what makes it a rebind.
    rebind.sort_by_key(|f| !BINDING.contains(&f.as_str()));
    rebind.extend(what);
    Change { kind, what: rebind }
}

/// Every field by name, whether a hot swap can apply it, and its value as text.
fn fields(h: &HandlerConfig) -> Vec<(&'static str, bool, String)> {
    let d = |v: &dyn fmt::Debug| format!("{v:?}");
    vec![
        ("stream", false, d(&h.stream)),
        ("consumer", false, d(&h.consumer)),
        ("subjects", false, d(&h.filter_subjects)),
        ("ordering", false, d(&h.ordering)),
        ("partitions", false, d(&h.partitions)),
        ("on_missing_key", false, d(&h.on_missing_key)),
        ("on_exhausted", false, d(&h.on_exhausted)),
        ("workers", false, d(&(h.min_workers, h.max_workers))),
        ("max_buffered", false, d(&h.max_buffered)),
        ("prefetch", false, d(&h.prefetch)),
        ("max_keys", false, d(&h.max_keys)),
        ("max_ack_pending", false, d(&h.max_ack_pending)),
        ("scale_cooldown", false, d(&h.scale_cooldown)),
        ("ack_wait", false, d(&h.ack_wait)),
        ("dead_letter", false, d(&h.dead_letter)),
        ("retry", false, d(&h.retry)),
        ("breaker", false, d(&h.breaker)),
        ("limits.timeout", false, d(&h.limits.timeout)),
        ("isolation", true, d(&h.isolation)),
        ("limits.memory", true, d(&h.limits.memory)),
        ("limits.output", true, d(&h.limits.output_bytes)),
        ("limits.max_publishes", true, d(&h.max_publishes)),
        ("limits.log", true, d(&h.log_budget)),
        ("publish.allow", true, d(&h.publish_allow)),
        ("kv.allow", true, d(&h.kv_allow)),
        ("config", true, d(&h.settings)),
    ]
}

/// The config with every hot-swappable field (and the module path, which names a local
/// copy) blanked, as text: equal for two configs that differ only in what a swap applies.
fn normalized(h: &HandlerConfig) -> String {
    let mut h = h.clone();
    h.module = PathBuf::new();
    h.isolation = crate::runtime::Isolation::Fresh;
    h.limits.memory = 0;
    h.limits.output_bytes = 0;
    h.max_publishes = 0;
    h.log_budget = 0;
    h.publish_allow.clear();
    h.kv_allow.clear();
    h.settings.clear();
    format!("{h:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::handler_from_table;

    fn config(extra: &str) -> HandlerConfig {
        let table = toml::from_str(&format!("stream = \"S\"\n{extra}")).unwrap();
        handler_from_table("h", table, "/m/a.wasm".into()).unwrap()
    }

    fn module(c: char) -> ModuleRef {
        ModuleRef {
            sha256: c.to_string().repeat(64),
            size: 1,
        }
    }

    #[test]
    fn module_settings_grants_and_limits_are_hot_swaps() {
        let (a, b) = (module('a'), module('b'));
        let old = config("config = { v = \"1\" }");
        let change = classify(Some((&old, &a)), (&config("config = { v = \"1\" }"), &a));
        assert_eq!(change.kind, Kind::Unchanged);
        let change = classify(Some((&old, &a)), (&config("config = { v = \"2\" }"), &b));
        assert_eq!(change.kind, Kind::HotSwap);
        assert_eq!(
            change.what,
            ["module aaaaaaaaaaaa… → bbbbbbbbbbbb…", "config"]
        );
        let new = config(
            "publish = { allow = [\"o.>\"] }\nlimits = { memory = \"32MiB\" }\nisolation = \"reuse\"",
        );
        let change = classify(Some((&old, &a)), (&new, &a));
        assert_eq!(change.kind, Kind::HotSwap, "{change}");
        let mut moved = old.clone();
        moved.module = "/elsewhere/b.wasm".into();
        assert_eq!(
            classify(Some((&old, &a)), (&moved, &a)).kind,
            Kind::Unchanged
        );
    }

    #[test]
    fn binding_and_engine_changes_are_drain_and_rebind() {
        let a = module('a');
        let old = config("");
        for (extra, field) in [
            ("partitions = 4", "partitions"),
            ("subjects = [\"S.x\"]", "subjects"),
            ("ordering = \"none\"", "ordering"),
            ("consumer = \"h2\"", "consumer"),
            ("retry = { max_attempts = 2 }", "retry"),
            ("max_workers = 3", "workers"),
            ("limits = { timeout = \"1s\" }", "limits.timeout"),
        ] {
            let change = classify(Some((&old, &a)), (&config(extra), &module('b')));
            assert_eq!(change.kind, Kind::Rebind, "{extra}");
            assert_eq!(change.what[0], field, "{extra}: {change}");
            assert!(change.what.iter().any(|w| w.starts_with("module")));
        }
        let mut other = old.clone();
        other.stream = "T".into();
        let change = classify(Some((&old, &a)), (&other, &a));
        assert_eq!(change.to_string(), "a drain and rebind (stream)");
        assert_eq!(classify(None, (&old, &a)).kind, Kind::New);
    }
}
