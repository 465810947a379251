//! The Python and JavaScript guests: their toolchains, installed under the target directory
//! (never globally), and their builds.
//!
//! - Python: componentize-py in a venv at `<target>/guest-tools/py`;
//! - JavaScript: jco (QuickJS backend) in `<target>/guest-tools/js/node_modules`.
//!
//! A toolchain that cannot be had (no python3 or npm, or the package registry cannot be
//! reached) is not an error: `<target>/guest-tools/<lang>.unavailable` records why, the guest is
//! not built, and the tests that need it skip with that reason. A build that fails is an error.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{bail, Context as _};

/// The exact toolchain versions the README documents.
pub const COMPONENTIZE_PY: &str = "0.25.1";
pub const JCO: &str = "1.35.0";
pub const COMPONENTIZE_QJS: &str = "0.4.5";

/// A language's guests: where its toolchain lives and what to build.
struct Lang {
    name: &'static str,
    /// `(output name, entry file, extra inputs)` relative to the workspace.
    guests: &'static [(&'static str, &'static str)],
    helper: &'static str,
}

const PYTHON: Lang = Lang {
    name: "py",
    guests: &[("enrich-py", "examples/enrich-py/app.py")],
    helper: "sdk/python/mailroom.py",
};

const JAVASCRIPT: Lang = Lang {
    name: "js",
    guests: &[("enrich-js", "examples/enrich-js/app.js")],
    helper: "sdk/js/mailroom.js",
};

fn tools_dir(target: &Path) -> PathBuf {
    target.join("guest-tools")
}

fn marker(target: &Path, lang: &Lang) -> PathBuf {
    tools_dir(target).join(format!("{}.unavailable", lang.name))
}

/// Builds the Python and JavaScript guests whose toolchains can be had.
pub fn build(root: &Path, target: &Path) -> anyhow::Result<()> {
    let out_dir = target.join("wasm32-wasip2/release");
    fs::create_dir_all(&out_dir)?;
    for lang in [&PYTHON, &JAVASCRIPT] {
        let tool = match ensure_tool(target, lang) {
            Ok(tool) => {
                let _ = fs::remove_file(marker(target, lang));
                tool
            }
            Err(why) => {
                eprintln!("xtask: skipping the {} guests: {why:#}", lang.name);
                fs::create_dir_all(tools_dir(target))?;
                fs::write(marker(target, lang), format!("{why:#}\n"))?;
                continue;
            }
        };
        for (name, entry) in lang.guests {
            let out = out_dir.join(format!("{name}.wasm"));
            let inputs = [
                root.join(entry),
                root.join(lang.helper),
                root.join("sdk/wit/handler.wit"),
            ];
            if newer_than_all(&out, &inputs) {
                continue;
            }
            let mut cmd = build_command(lang, &tool, root, &root.join(entry), &out);
            crate::status(&mut cmd, &format!("the {name}.wasm build"))?;
        }
    }
    Ok(())
}

/// The command that builds `entry` into `out` with the language's toolchain `tool`.
fn build_command(lang_name: &Lang, tool: &Path, root: &Path, entry: &Path, out: &Path) -> Command {
    let wit = root.join("sdk/wit");
    let dir = entry.parent().unwrap_or(root);
    match lang_name.name {
        "py" => {
            let mut cmd = Command::new(tool);
            let module = entry.file_stem().and_then(|s| s.to_str()).unwrap_or("app");
            cmd.arg("-d")
                .arg(&wit)
                .args(["-w", "handler", "componentize", module, "-p"])
                .arg(dir)
                .arg("-p")
                .arg(root.join("sdk/python"))
                .arg("-o")
                .arg(out);
            cmd
        }
        _ => {
            let mut cmd = Command::new(tool);
            cmd.arg("componentize")
                .arg(entry)
                .arg("--wit")
                .arg(&wit)
                .args([
                    "-n",
                    "handler",
                    "--backend",
                    "quickjs",
                    "--backend-qjs-disable-async",
                ])
                .arg("--cwd")
                .arg(root)
                .arg("-o")
                .arg(out);
            cmd
        }
    }
}

fn newer_than_all(out: &Path, inputs: &[PathBuf]) -> bool {
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(out) else {
        return false;
    };
    inputs
        .iter()
        .all(|i| modified(i).is_some_and(|m: SystemTime| m <= built))
}

/// The toolchain's executable, installing it when missing or at another version.
fn ensure_tool(target: &Path, lang: &Lang) -> anyhow::Result<PathBuf> {
    let dir = tools_dir(target).join(lang.name);
    match lang.name {
        "py" => {
            let tool = dir.join("bin/componentize-py");
            let version = Command::new(&tool).arg("--version").output();
            if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(COMPONENTIZE_PY)) {
                return Ok(tool);
            }
            let python = ["python3", "python"]
                .into_iter()
                .find(|p| Command::new(p).arg("--version").output().is_ok())
                .context("no python3 on PATH to make the venv with")?;
            run(
                Command::new(python).args(["-m", "venv"]).arg(&dir),
                "python3 -m venv",
            )?;
            run(
                Command::new(dir.join("bin/pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check"])
                    .arg(format!("componentize-py=={COMPONENTIZE_PY}")),
                "pip install componentize-py (is the package registry reachable?)",
            )?;
            Ok(tool)
        }
        _ => {
            let tool = dir.join("node_modules/.bin/jco");
            let manifest = dir.join("node_modules/@bytecodealliance/jco/package.json");
            let installed = fs::read_to_string(&manifest).unwrap_or_default();
            if tool.exists() && installed.contains(&format!("\"version\": \"{JCO}\"")) {
                return Ok(tool);
            }
            fs::create_dir_all(&dir)?;
            fs::write(
                dir.join("package.json"),
                format!(
                    "{{\"private\": true, \"dependencies\": {{\"@bytecodealliance/jco\": \"{JCO}\", \
                     \"componentize-qjs\": \"{COMPONENTIZE_QJS}\"}}}}\n"
                ),
            )?;
            Command::new("npm")
                .arg("--version")
                .output()
                .context("no npm on PATH to install jco with")?;
            run(
                Command::new("npm")
                    .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(&dir),
                "npm install jco (is the package registry reachable?)",
            )?;
            Ok(tool)
        }
    }
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
