//! `mailroom new`: each template is created, unit-tested, built and invoked as its README says.
//! Rust always; Python and JavaScript when `cargo xtask guests` installed their toolchains
//! (under `<target>/guest-tools`), skipping with the reason otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::target_dir;

fn mailroom() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailroom"));
    cmd.env(
        "XDG_CACHE_HOME",
        target_dir().join("mailroom-test-cache-cli"),
    )
    .env("MAILROOM_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|err| panic!("cannot start {what}: {err}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn create(name: &str, lang: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    let out = run(
        mailroom()
            .args(["new", name, "--lang", lang, "--dir"])
            .arg(&dir),
        "mailroom new",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("README.md"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    (tmp, dir)
}

/// Invokes the built module as the template's README does; returns (exit code, stdout).
fn invoke(module: &Path, data: &str) -> (Option<i32>, String) {
    let out = mailroom()
        .arg("invoke")
        .arg(module)
        .args(["--subject", "orders.eu", "--data", data])
        .args(["--setting", "output-subject=summaries"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

fn check_invokes(module: &Path, name: &str, missing_id_error: &str) {
    let (code, out) = invoke(module, r#"{"id":7}"#);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            r#"{{"handled_by":"{name}","id":7,"subject":"orders.eu"}}"#
        )) || out.contains(&format!(
            r#"{{"id":7,"subject":"orders.eu","handled_by":"{name}"}}"#
        )),
        "{out}"
    );
    let (code, out) = invoke(module, "{}");
    assert!(matches!(code, Some(3) | Some(4)), "{out}");
    assert!(out.contains(missing_id_error), "{out}");
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}

#[test]
fn the_rust_template_tests_builds_and_invokes() {
    let (_tmp, dir) = create("audit-log", "rust");
    // One target directory for every run, so the SDK and serde are compiled once.
    let target = target_dir().join("mailroom-new-rust");
    run(
        cargo()
            .arg("test")
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target),
        "cargo test in the new crate",
    );
    run(
        cargo()
            .args(["build", "--target", "wasm32-wasip2", "--release"])
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target),
        "cargo build of the new crate",
    );
    let module = target.join("wasm32-wasip2/release/audit_log.wasm");
    check_invokes(&module, "audit-log", "missing field `id`");
    // Its mailroom.toml names the module where cargo puts it by default.
    let config = std::fs::read_to_string(dir.join("mailroom.toml")).unwrap();
    assert!(
        config.contains("module = \"target/wasm32-wasip2/release/audit_log.wasm\""),
        "{config}"
    );
}

/// The toolchain xtask installed for `lang`, or `None` with the reason printed.
fn tool(lang: &str, relative: &str) -> Option<PathBuf> {
    let tools = target_dir().join("guest-tools");
    let path = tools.join(lang).join(relative);
    if path.exists() {
        return Some(path);
    }
    let reason = std::fs::read_to_string(tools.join(format!("{lang}.unavailable")))
        .unwrap_or_else(|_| "not installed: run `cargo xtask guests`".to_owned());
    eprintln!(
        "SKIPPED: the {lang} template needs its toolchain: {}",
        reason.trim()
    );
    None
}

#[test]
fn the_python_template_tests_builds_and_invokes() {
    let Some(componentize) = tool("py", "bin/componentize-py") else {
        return;
    };
    let python = componentize.with_file_name("python");
    let (_tmp, dir) = create("audit", "python");
    run(
        Command::new(&python)
            .args(["-m", "unittest", "-q"])
            .current_dir(&dir),
        "python -m unittest",
    );
    run(
        Command::new(&componentize)
            .args([
                "-d",
                "wit",
                "-w",
                "handler",
                "componentize",
                "app",
                "-p",
                ".",
                "-o",
            ])
            .arg("audit.wasm")
            .current_dir(&dir),
        "componentize-py",
    );
    // A Python exception is a failed attempt whose reason is the exception.
    check_invokes(&dir.join("audit.wasm"), "audit", "KeyError: 'id'");
}

#[test]
fn the_javascript_template_tests_builds_and_invokes() {
    let Some(jco) = tool("js", "node_modules/.bin/jco") else {
        return;
    };
    let (_tmp, dir) = create("audit", "js");
    run(
        Command::new("node").arg("--test").current_dir(&dir),
        "node --test",
    );
    run(
        Command::new(&jco)
            .args(["componentize", "app.js", "--wit", "wit", "-n", "handler"])
            .args(["--backend", "quickjs", "--backend-qjs-disable-async"])
            .args(["-o", "audit.wasm"])
            .current_dir(&dir),
        "jco componentize",
    );
    // A JavaScript error is a failed attempt whose reason is the error's message.
    check_invokes(&dir.join("audit.wasm"), "audit", "the order has no id");
}
