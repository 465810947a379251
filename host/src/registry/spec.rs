//! The `[[handler]]` table of a deploy: read from `--handler-config FILE`, changed by
//! `--set key=value`, stored as TOML text, and read back into a validated `HandlerConfig`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::config::{handler_from_table, HandlerConfig};

/// The table of handler `name`: `file`'s (a `[[handler]]` table, or a host file whose
/// `[[handler]]` of that name is taken), then each `sets` entry applied in order. Returns the
/// table and notes for the user (e.g. a `module` key that was ignored).
pub fn build_table(
    name: &str,
    file: Option<&Path>,
    sets: &[(String, String)],
) -> anyhow::Result<(toml::Table, Vec<String>)> {
    let mut notes = Vec::new();
    let mut table = match file {
        None => toml::Table::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --handler-config {}", path.display()))?;
            let doc: toml::Table = toml::from_str(&text)
                .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
            pick_handler(name, doc).with_context(|| format!("{}", path.display()))?
        }
    };
    if table.remove("module").is_some() {
        notes.push(format!(
            "the handler table's module was ignored: {name} is deployed with the module given \
             on the command line"
        ));
    }
    for (key, value) in sets {
        set(&mut table, key, value).with_context(|| format!("--set {key}={value}"))?;
    }
    Ok((table, notes))
}

/// The one `[[handler]]` of `doc` named `name` (or its only one), or `doc` itself when it has
/// no `[[handler]]` array.
fn pick_handler(name: &str, mut doc: toml::Table) -> anyhow::Result<toml::Table> {
    let Some(handlers) = doc.remove("handler") else {
        return Ok(doc);
    };
    let toml::Value::Array(handlers) = handlers else {
        bail!("`handler` must be a [[handler]] table");
    };
    let tables: Vec<toml::Table> = handlers
        .into_iter()
        .filter_map(|v| match v {
            toml::Value::Table(t) => Some(t),
            _ => None,
        })
        .collect();
    let named = |t: &toml::Table| t.get("name").and_then(|n| n.as_str()) == Some(name);
    if let Some(table) = tables.iter().find(|t| named(t)) {
        return Ok(table.clone());
    }
    match tables.as_slice() {
        [only] if only.get("name").is_none() => Ok(only.clone()),
        _ => bail!(
            "it has no [[handler]] named {name:?} (it has {:?})",
            tables
                .iter()
                .filter_map(|t| t.get("name").and_then(|n| n.as_str()))
                .collect::<Vec<_>>()
        ),
    }
}

/// Sets `key` (dotted for sub-tables: `limits.memory`, `config.output-subject`) to `value`,
/// read as a TOML value (`4`, `true`, `["a.>"]`) or else as a string. Under `config.` the
/// rest of the key is one setting and the value is always a string.
pub fn set(table: &mut toml::Table, key: &str, value: &str) -> anyhow::Result<()> {
    let (path, value): (Vec<&str>, toml::Value) = match key.strip_prefix("config.") {
        Some(setting) => (
            vec!["config", setting],
            toml::Value::String(value.to_owned()),
        ),
        None => (key.split('.').collect(), parse_value(value)),
    };
    if path.iter().any(|p| p.is_empty()) {
        bail!("the key has an empty part; write it as name or table.name");
    }
    let (last, parents) = path.split_last().expect("split yields one part at least");
    let mut at = table;
    for part in parents {
        let entry = at
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("{part} is not a table, so it has no {last}"),
        };
    }
    at.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

/// The table as stored in a [`super::SpecRecord`].
pub fn render(table: &toml::Table) -> anyhow::Result<String> {
    toml::to_string(table).context("writing the handler table as TOML")
}

/// Reads a stored table back.
pub fn parse(text: &str) -> anyhow::Result<toml::Table> {
    toml::from_str(text).map_err(|err| anyhow::anyhow!("the stored handler table: {err}"))
}

/// The validated config of a stored revision of `name`, with `module` as its module file.
pub fn config_of(name: &str, handler: &str, module: PathBuf) -> anyhow::Result<HandlerConfig> {
    handler_from_table(name, parse(handler)?, module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_typed_and_nested() {
        let mut t = toml::Table::new();
        set(&mut t, "stream", "ORDERS").unwrap();
        set(&mut t, "partitions", "4").unwrap();
        set(&mut t, "publish.allow", "[\"out.>\"]").unwrap();
        set(&mut t, "config.version", "2").unwrap();
        set(&mut t, "config.a.b", "x y").unwrap();
        set(&mut t, "limits.memory", "32MiB").unwrap();
        let h = handler_from_table("h", t.clone(), "/m".into()).unwrap();
        assert_eq!(h.stream, "ORDERS");
        assert_eq!(h.partitions, Some(4));
        assert_eq!(h.publish_allow[0].as_str(), "out.>");
        assert_eq!(h.settings["version"], "2", "settings stay strings");
        assert_eq!(h.settings["a.b"], "x y");
        assert_eq!(h.limits.memory, 32 << 20);
        assert!(
            set(&mut t, "stream.x", "1").is_err(),
            "stream is not a table"
        );
        assert!(set(&mut t, "a..b", "1").is_err());
        let back = parse(&render(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn a_host_file_gives_its_handler_of_that_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(
            &path,
            "[[handler]]\nname = \"a\"\nmodule = \"a.wasm\"\nstream = \"S\"\n\
             [[handler]]\nname = \"b\"\nmodule = \"b.wasm\"\nstream = \"T\"\n",
        )
        .unwrap();
        let (t, notes) =
            build_table("b", Some(&path), &[("max_workers".into(), "2".into())]).unwrap();
        assert_eq!(t["stream"].as_str(), Some("T"));
        assert_eq!(t["max_workers"].as_integer(), Some(2));
        assert!(!t.contains_key("module"));
        assert_eq!(notes.len(), 1, "{notes:?}");
        let err = build_table("c", Some(&path), &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("no [[handler]] named \"c\""),
            "{err:#}"
        );
        std::fs::write(&path, "stream = \"S\"\n[config]\nk = \"v\"\n").unwrap();
        let (t, notes) = build_table("x", Some(&path), &[]).unwrap();
        assert_eq!(t["config"]["k"].as_str(), Some("v"));
        assert!(notes.is_empty());
    }
}
