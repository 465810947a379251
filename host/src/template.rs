//! `mailroom new`: a ready handler project (the handler, a unit test, a host config snippet and
//! a README with the commands) in Rust, Python or JavaScript.
//!
//! The files are compiled into the binary (`host/templates/`), with the Python and JavaScript
//! helpers and the WIT contract copied from `sdk/`, so a project made anywhere builds without
//! this repository.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// componentize-py version the Python template and README are tested with.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// jco version the JavaScript template and README are tested with.
pub const JCO: &str = "1.35.0";
/// componentize-qjs version (jco's QuickJS backend) the JavaScript template pins.
pub const COMPONENTIZE_QJS: &str = "0.4.5";

/// The language of a new handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Rust with `mailroom-sdk`.
    Rust,
    /// Python with componentize-py.
    Python,
    /// JavaScript with jco's QuickJS backend.
    Js,
}

/// What a new project is made of.
#[derive(Debug, Clone)]
pub struct NewProject {
    /// The handler's name: the directory, crate or package, and `[[handler]]` name.
    pub name: String,
    /// The language.
    pub lang: Lang,
    /// Where to create it (a new or empty directory).
    pub dir: PathBuf,
    /// For Rust: the `mailroom-sdk` dependency line's value. `None`: the SDK this binary was
    /// built from when its sources are still there, else the registry's `0.2`.
    pub sdk: Option<String>,
}

const RUST: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
    ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
    ("README.md", include_str!("../templates/rust/README.md")),
    (
        "mailroom.toml",
        include_str!("../templates/rust/mailroom.toml"),
    ),
    (".gitignore", include_str!("../templates/rust/gitignore")),
];

const PYTHON: &[(&str, &str)] = &[
    ("app.py", include_str!("../templates/python/app.py")),
    ("logic.py", include_str!("../templates/python/logic.py")),
    (
        "test_logic.py",
        include_str!("../templates/python/test_logic.py"),
    ),
    ("mailroom.py", include_str!("../../sdk/python/mailroom.py")),
    ("wit/handler.wit", include_str!("../../sdk/wit/handler.wit")),
    ("README.md", include_str!("../templates/python/README.md")),
    (
        "mailroom.toml",
        include_str!("../templates/python/mailroom.toml"),
    ),
    (".gitignore", include_str!("../templates/python/gitignore")),
];

const JS: &[(&str, &str)] = &[
    ("app.js", include_str!("../templates/js/app.js")),
    ("logic.js", include_str!("../templates/js/logic.js")),
    (
        "logic.test.js",
        include_str!("../templates/js/logic.test.js"),
    ),
    ("mailroom.js", include_str!("../../sdk/js/mailroom.js")),
    ("wit/handler.wit", include_str!("../../sdk/wit/handler.wit")),
    ("package.json", include_str!("../templates/js/package.json")),
    ("README.md", include_str!("../templates/js/README.md")),
    (
        "mailroom.toml",
        include_str!("../templates/js/mailroom.toml"),
    ),
    (".gitignore", include_str!("../templates/js/gitignore")),
];

/// Checks a handler name: lowercase letters, digits, `-` and `_`, starting with a letter, so
/// that it is a valid crate, package, file and consumer name.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let starts = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !starts || !rest || name.len() > 64 {
        return Err(format!(
            "{name:?} is not a handler name: use lowercase letters, digits, '-' and '_', starting \
             with a letter (at most 64 characters), e.g. \"order-audit\""
        ));
    }
    Ok(())
}

/// The built component's file name: cargo turns `-` into `_` in library names.
pub fn module_file(name: &str, lang: Lang) -> String {
    match lang {
        Lang::Rust => format!("{}.wasm", name.replace('-', "_")),
        Lang::Python | Lang::Js => format!("{name}.wasm"),
    }
}

fn default_sdk() -> String {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    match sdk.join("Cargo.toml").is_file() {
        true => {
            let path = sdk.canonicalize().unwrap_or(sdk);
            format!("{{ path = {:?} }}", path.display().to_string())
        }
        false => "\"0.2\"".to_owned(),
    }
}

/// Writes the project and returns the files written, relative to its directory.
pub fn create(project: &NewProject) -> anyhow::Result<Vec<String>> {
    validate_name(&project.name).map_err(anyhow::Error::msg)?;
    let dir = &project.dir;
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} already exists and is not empty: choose another name or directory",
                dir.display()
            );
        }
    }
    let files = match project.lang {
        Lang::Rust => RUST,
        Lang::Python => PYTHON,
        Lang::Js => JS,
    };
    let sdk = project.sdk.clone().unwrap_or_else(default_sdk);
    let module = module_file(&project.name, project.lang);
    let mut written = Vec::new();
    for (path, text) in files {
        let text = text
            .replace("{{name}}", &project.name)
            .replace("{{module}}", &module)
            .replace("{{sdk_dependency}}", &format!("mailroom-sdk = {sdk}"))
            .replace("{{componentize_py}}", COMPONENTIZE_PY)
            .replace("{{jco}}", JCO)
            .replace("{{componentize_qjs}}", COMPONENTIZE_QJS);
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&target, text).with_context(|| format!("writing {}", target.display()))?;
        written.push((*path).to_owned());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_usable_everywhere() {
        assert!(validate_name("order-audit").is_ok());
        assert!(validate_name("audit_2").is_ok());
        for bad in ["", "Audit", "2fast", "a b", "a/b", "ü"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_placeholder_is_filled_and_an_existing_project_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            let project = NewProject {
                name: "audit".into(),
                lang,
                dir: dir.path().join(format!("{lang:?}")),
                sdk: Some("\"0.2\"".into()),
            };
            let files = create(&project).unwrap();
            for file in &files {
                let text = std::fs::read_to_string(project.dir.join(file)).unwrap();
                assert!(!text.contains("{{"), "{lang:?} {file} keeps a placeholder");
            }
            let err = create(&project).unwrap_err().to_string();
            assert!(err.contains("not empty"), "{err}");
        }
    }
}
