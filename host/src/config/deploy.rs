//! `[deploy]`: whether this host runs the handlers deployed through NATS (`mailroom deploy`),
//! which of them, and the most a deployed handler may be granted here (the ceiling). Also the
//! one way from a deployed `[[handler]]` table to a [`HandlerConfig`]: through the same checks
//! as a handler written in the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::{check_name, handler, opt_size, raw, HandlerConfig, NatsConfig};
use crate::capabilities::SubjectPattern;

/// Handlers deployed through NATS, as this host takes them.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    /// Run the deployed handlers (besides the file's). Default false.
    pub watch: bool,
    /// Only deployed handlers with these names (`"billing-*"`: a prefix); empty: every one.
    pub handlers: Vec<String>,
    /// Only deployed handlers with all these labels (`mailroom deploy --label k=v`).
    pub labels: BTreeMap<String, String>,
    /// The most a deployed handler may publish to: each of its `publish.allow` patterns must
    /// lie within one of these. Default: nothing.
    pub publish_allow: Vec<SubjectPattern>,
    /// The KV buckets a deployed handler may be granted (`"*"`: any). Default: none.
    pub kv_allow: Vec<String>,
    /// The largest `limits.memory` a deployed handler may ask for. Default 64MiB.
    pub max_memory: usize,
    /// Instances (pool slots) reserved for deployed handlers, which bounds the sum of their
    /// `max_workers` on this host. Default 64.
    pub instances: u32,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            watch: false,
            handlers: Vec::new(),
            labels: BTreeMap::new(),
            publish_allow: Vec::new(),
            kv_allow: Vec::new(),
            max_memory: 64 << 20,
            instances: 64,
        }
    }
}

impl DeployConfig {
    /// One line for `mailroom validate`: what this host takes from the registry.
    pub fn describe(&self) -> String {
        let handlers = if self.handlers.is_empty() {
            "every deployed handler".to_owned()
        } else {
            format!("deployed handlers {:?}", self.handlers)
        };
        let labels = if self.labels.is_empty() {
            String::new()
        } else {
            format!(" labelled {:?}", self.labels)
        };
        format!(
            "deploy: runs {handlers}{labels}, granting at most publish {:?} and KV {:?}, \
             limits.memory {} bytes, {} instances",
            self.publish_allow
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>(),
            self.kv_allow,
            self.max_memory,
            self.instances
        )
    }

    /// Whether this host runs deployed handler `name` with `labels`.
    pub fn selects(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        let named = self.handlers.is_empty()
            || self.handlers.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => p == name,
            });
        named && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Checks a deployed handler against this host's ceiling. `others` is the `max_workers`
    /// of the other deployed handlers running here. The error names the grant and the
    /// setting that would allow it.
    pub fn admits(&self, h: &HandlerConfig, others: usize) -> Result<(), String> {
        for pattern in &h.publish_allow {
            if !self.publish_allow.iter().any(|c| pattern.within(c)) {
                return Err(format!(
                    "handler {} asks for publish.allow {:?}, which this host does not grant to \
                     deployed handlers (deploy.publish = {{ allow = {:?} }}); deploy it with a \
                     narrower publish.allow, or widen the host's deploy.publish.allow",
                    h.name,
                    pattern.as_str(),
                    self.publish_allow
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                ));
            }
        }
        for bucket in &h.kv_allow {
            let granted = self
                .kv_allow
                .iter()
                .any(|c| c == "*" || (c == bucket && bucket != "*"));
            if !granted {
                return Err(format!(
                    "handler {} asks for kv.allow {bucket:?}, which this host does not grant to \
                     deployed handlers (deploy.kv = {{ allow = {:?} }}); deploy it without that \
                     bucket, or add it to the host's deploy.kv.allow",
                    h.name, self.kv_allow
                ));
            }
        }
        if h.limits.memory > self.max_memory {
            return Err(format!(
                "handler {} asks for limits.memory = {} bytes, above this host's \
                 deploy.max_memory ({} bytes)",
                h.name, h.limits.memory, self.max_memory
            ));
        }
        if others + h.max_workers > self.instances as usize {
            return Err(format!(
                "handler {} asks for max_workers = {}, but only {} of this host's \
                 deploy.instances = {} are free for deployed handlers",
                h.name,
                h.max_workers,
                (self.instances as usize).saturating_sub(others),
                self.instances
            ));
        }
        Ok(())
    }
}

pub(super) fn convert_deploy(d: raw::RawDeploy) -> anyhow::Result<DeployConfig> {
    let defaults = DeployConfig::default();
    let handlers = d.handlers.unwrap_or_default();
    for pattern in &handlers {
        check_name("deploy.handlers: handler", pattern.trim_end_matches('*'))?;
    }
    let labels = d.labels.unwrap_or_default();
    for (k, v) in &labels {
        check_label(k, v).map_err(|e| anyhow::anyhow!("deploy.labels: {e}"))?;
    }
    let mut publish_allow = Vec::new();
    for pattern in &d.publish.allow {
        publish_allow.push(
            SubjectPattern::parse(pattern)
                .map_err(|e| anyhow::anyhow!("deploy.publish.allow: {e}"))?,
        );
    }
    for bucket in &d.kv.allow {
        if bucket != "*" {
            check_name("deploy.kv.allow: bucket", bucket)?;
        }
    }
    let max_memory =
        opt_size("deploy", "max_memory", d.max_memory)?.unwrap_or(defaults.max_memory as u64);
    if !((1 << 20)..=(4 << 30)).contains(&max_memory) {
        bail!("deploy: max_memory must be between 1MiB and 4GiB, got {max_memory} bytes");
    }
    let instances = d.instances.unwrap_or(defaults.instances);
    if !(1..=4096).contains(&instances) {
        bail!("deploy: instances must be between 1 and 4096, got {instances}");
    }
    Ok(DeployConfig {
        watch: d.watch.unwrap_or(false),
        handlers,
        labels,
        publish_allow,
        kv_allow: d.kv.allow,
        max_memory: max_memory as usize,
        instances,
    })
}

/// A label (`mailroom deploy --label k=v`, `deploy.labels`): a name-like key and a value
/// without spaces.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    check_name("label", key).map_err(|e| format!("{e:#}"))?;
    if value.is_empty() || value.len() > 128 || value.chars().any(char::is_whitespace) {
        return Err(format!(
            "label {key}: value {value:?} must be 1 to 128 characters without spaces"
        ));
    }
    Ok(())
}

/// Warnings for a `[deploy]` that would run handlers unable to do anything.
pub(super) fn warnings(d: &DeployConfig) -> Vec<String> {
    if d.watch && d.publish_allow.is_empty() && d.kv_allow.is_empty() {
        return vec![
            "deploy.watch is on but deploy.publish.allow and deploy.kv.allow are empty: \
             deployed handlers that publish or use KV are refused on this host"
                .to_owned(),
        ];
    }
    Vec::new()
}

/// Turns the `[[handler]]` table of a deployed handler `name` into its validated config, with
/// `module` as its module file. The table must not set `name` (other than to `name`) nor
/// `module` (the module is deployed with it).
pub fn handler_from_table(
    name: &str,
    mut table: toml::Table,
    module: PathBuf,
) -> anyhow::Result<HandlerConfig> {
    match table.remove("name") {
        None => {}
        Some(toml::Value::String(n)) if n == name => {}
        Some(other) => bail!(
            "the handler table names {other}, but it is deployed as {name:?}; remove name \
             from the table or make them agree"
        ),
    }
    if table.contains_key("module") {
        bail!(
            "the handler table sets module; a deployed handler's module is the file given to \
             `mailroom deploy`, so remove module from the table"
        );
    }
    table.insert("name".into(), toml::Value::String(name.to_owned()));
    table.insert(
        "module".into(),
        toml::Value::String(module.display().to_string()),
    );
    let raw: raw::RawHandler = toml::Value::Table(table)
        .try_into()
        .map_err(|err| anyhow::anyhow!("handler {name:?}: {err}"))?;
    handler::convert_handler(raw, &|p| p)
}

/// Reads only the `[nats]` section of a host's file (which may have no handlers): how the
/// deploy commands connect, with the same credentials as `mailroom run`.
pub fn load_connection(path: &Path) -> anyhow::Result<NatsConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let raw: raw::RawConfig = toml::from_str(&text)
        .map_err(|err| anyhow::anyhow!("{err}"))
        .with_context(|| format!("invalid config {}", path.display()))?;
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    super::nats::convert_nats(raw.nats, &resolve)
        .with_context(|| format!("invalid config {}", path.display()))
}

/// The connection settings of a host without a file: the defaults, at `url`.
pub fn default_connection(url: Option<String>) -> anyhow::Result<NatsConfig> {
    let mut nats = super::nats::convert_nats(raw::RawNats::default(), &|p| p)?;
    if let Some(url) = url {
        super::server_addrs(&url).map_err(|e| anyhow::anyhow!("--nats-url: {e:#}"))?;
        nats.url = url;
    }
    Ok(nats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    fn deploy(text: &str) -> DeployConfig {
        convert_deploy(toml::from_str(text).unwrap()).unwrap()
    }

    #[test]
    fn a_deployed_table_goes_through_the_handler_checks() {
        let h = handler_from_table(
            "enrich",
            table("stream = \"ORDERS\"\nordering = \"none\"\nconfig = { a = \"1\" }"),
            "/m.wasm".into(),
        )
        .unwrap();
        assert_eq!(h.name, "enrich");
        assert_eq!(h.module, PathBuf::from("/m.wasm"));
        assert_eq!(h.settings["a"], "1");
        let err = handler_from_table("e", table("stream = \"S\"\nmax_workers = 0"), "/m".into())
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("max_workers must be between"),
            "{err:#}"
        );
        let err = handler_from_table("e", table("stream = \"S\"\nmodule = \"x\""), "/m".into())
            .unwrap_err();
        assert!(format!("{err:#}").contains("remove module"), "{err:#}");
        let err = handler_from_table("e", table("stream = \"S\"\nname = \"f\""), "/m".into())
            .unwrap_err();
        assert!(format!("{err:#}").contains("deployed as \"e\""), "{err:#}");
        let err =
            handler_from_table("e", table("stream = \"S\"\ncolour = 1"), "/m".into()).unwrap_err();
        assert!(format!("{err:#}").contains("colour"), "{err:#}");
    }

    #[test]
    fn selection_by_name_prefix_and_labels() {
        let all = deploy("watch = true");
        let labels = BTreeMap::from([("tier".to_owned(), "edge".to_owned())]);
        assert!(all.selects("anything", &BTreeMap::new()));
        let some = deploy("handlers = [\"billing-*\", \"enrich\"]\nlabels = { tier = \"edge\" }");
        assert!(some.selects("billing-eu", &labels));
        assert!(some.selects("enrich", &labels));
        assert!(
            !some.selects("enrich", &BTreeMap::new()),
            "a label is missing"
        );
        assert!(!some.selects("counter", &labels));
    }

    #[test]
    fn the_ceiling_names_the_grant_it_refuses() {
        let ceiling = deploy(
            "publish = { allow = [\"out.>\"] }\nkv = { allow = [\"counts\"] }\ninstances = 20",
        );
        let h = |extra: &str| {
            handler_from_table("h", table(&format!("stream = \"S\"\n{extra}")), "/m".into())
                .unwrap()
        };
        assert_eq!(
            ceiling.admits(&h("publish = { allow = [\"out.eu.*\"] }"), 0),
            Ok(())
        );
        let err = ceiling
            .admits(&h("publish = { allow = [\"out.>\", \"billing.>\"] }"), 0)
            .unwrap_err();
        assert!(err.contains("publish.allow \"billing.>\""), "{err}");
        assert!(err.contains("deploy.publish"), "{err}");
        let err = ceiling
            .admits(&h("kv = { allow = [\"*\"] }"), 0)
            .unwrap_err();
        assert!(err.contains("kv.allow \"*\""), "{err}");
        assert_eq!(
            ceiling.admits(&h("kv = { allow = [\"counts\"] }"), 0),
            Ok(())
        );
        let err = ceiling.admits(&h("max_workers = 16"), 10).unwrap_err();
        assert!(
            err.contains("only 10 of this host's deploy.instances = 20"),
            "{err}"
        );
        let err = ceiling
            .admits(&h("limits = { memory = \"128MiB\" }"), 0)
            .unwrap_err();
        assert!(err.contains("deploy.max_memory"), "{err}");
        let open = deploy("kv = { allow = [\"*\"] }");
        assert_eq!(open.admits(&h("kv = { allow = [\"*\"] }"), 0), Ok(()));
    }

    #[test]
    fn only_a_watching_host_may_have_no_handlers() {
        let base = std::path::Path::new("/etc/mailroom");
        let err = crate::Config::parse("", base).unwrap_err();
        assert!(
            format!("{err:#}").contains("[deploy] watch = true"),
            "{err:#}"
        );
        let watching = crate::Config::parse("[deploy]\nwatch = true", base).unwrap();
        assert!(watching.handlers.is_empty() && watching.deploy.watch);
        assert!(
            watching.warnings[0].contains("deploy.publish.allow"),
            "{:?}",
            watching.warnings
        );
        let flagged = crate::Config::parse_with("", base, true).unwrap();
        assert!(flagged.deploy.watch, "run --watch");
        assert!(watching
            .deploy
            .describe()
            .contains("every deployed handler"));
    }

    #[test]
    fn bad_deploy_settings_are_refused() {
        let bad = |text: &str| {
            format!(
                "{:#}",
                convert_deploy(toml::from_str(text).unwrap()).unwrap_err()
            )
        };
        assert!(bad("instances = 0").contains("instances must be between"));
        assert!(bad("handlers = [\"a.b\"]").contains("is not valid"));
        assert!(bad("publish = { allow = [\"a..b\"] }").contains("deploy.publish.allow"));
        assert!(bad("labels = { tier = \"a b\" }").contains("without spaces"));
        assert!(bad("max_memory = \"1KiB\"").contains("max_memory must be between"));
    }
}
