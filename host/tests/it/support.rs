//! Test support: a real nats-server per test, configs, modules, and waiting on JetStream state.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use mailroom::nats_server::NatsServer;
use mailroom::{Config, RunningHost};
use tokio_util::sync::CancellationToken;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The compiled guest `name`; the suite needs `cargo xtask test` (or `cargo xtask guests`).
pub fn wasm(name: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run the suite with `cargo xtask test`, which builds the guest modules \
         (or build them with `cargo xtask guests`)",
        path.display()
    );
    path
}

/// A nats-server with JetStream for one test, plus a client.
pub struct Env {
    pub server: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl Env {
    pub async fn new() -> Env {
        let server = NatsServer::start()
            .unwrap_or_else(|err| panic!("cannot start nats-server for the test: {err:#}"));
        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = jetstream::new(client.clone());
        Env { server, client, js }
    }

    /// Parses a config (module paths may use `{enrich}`-style placeholders for guests) and
    /// points it at this server, with a shared compile cache.
    pub fn config(&self, text: &str) -> Config {
        let mut text = text.to_owned();
        for guest in ["enrich", "counter", "flaky", "noop"] {
            let placeholder = format!("{{{guest}}}");
            if text.contains(&placeholder) {
                text = text.replace(&placeholder, &wasm(guest).display().to_string());
            }
        }
        let mut config = Config::parse(&text, &workspace()).expect("test config is valid");
        config.nats.url = self.server.url();
        config.host.cache_dir = Some(target_dir().join("mailroom-test-cache"));
        config
    }

    pub async fn start(&self, config: Config) -> Host {
        let shutdown = CancellationToken::new();
        let running = mailroom::start(config, self.client.clone(), shutdown.clone())
            .await
            .expect("host starts");
        Host { running, shutdown }
    }

    pub async fn publish(&self, subject: &str, payload: impl Into<bytes::Bytes>) -> u64 {
        self.js
            .publish(subject.to_owned(), payload.into())
            .await
            .expect("publish")
            .await
            .expect("publish stored")
            .sequence
    }

    /// Publishes many messages, awaiting the stores in windows (much faster than one by one).
    pub async fn publish_many(&self, messages: impl IntoIterator<Item = (String, bytes::Bytes)>) {
        let mut window = Vec::with_capacity(512);
        for (subject, payload) in messages {
            window.push(self.js.publish(subject, payload).await.expect("publish"));
            if window.len() == 512 {
                for ack in window.drain(..) {
                    ack.await.expect("publish stored");
                }
            }
        }
        for ack in window {
            ack.await.expect("publish stored");
        }
    }

    pub async fn consumer_info(&self, stream: &str, consumer: &str) -> jetstream::consumer::Info {
        let mut c: PullConsumer = self
            .js
            .get_consumer_from_stream(consumer, stream)
            .await
            .expect("consumer exists");
        c.info().await.expect("consumer info").clone()
    }

    /// Waits until the consumer holds nothing: no pending message, none awaiting an ack.
    pub async fn settled(
        &self,
        stream: &str,
        consumer: &str,
        within: Duration,
    ) -> jetstream::consumer::Info {
        let deadline = Instant::now() + within;
        loop {
            let info = self.consumer_info(stream, consumer).await;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "consumer {consumer} not settled within {within:?}: {} pending, {} awaiting ack",
                info.num_pending,
                info.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn stream_count(&self, stream: &str) -> u64 {
        let mut s = self.js.get_stream(stream).await.expect("stream exists");
        s.info().await.expect("stream info").state.messages
    }

    /// Every message stored in `stream`, in order.
    pub async fn stream_messages(&self, stream: &str) -> Vec<jetstream::message::StreamMessage> {
        let mut s = self.js.get_stream(stream).await.expect("stream exists");
        let state = s.info().await.expect("stream info").state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(m) = s.get_raw_message(seq).await {
                out.push(m);
            }
        }
        out
    }
}

/// Every message of `stream`, read in batches by an ephemeral consumer (much faster than one
/// request per message).
pub async fn all_messages(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<(String, bytes::Bytes, u64)> {
    use futures::StreamExt as _;
    // On a cluster whose node just restarted, the stream may still be electing a leader or
    // catching the node up: creating the reader is retried for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (s, consumer): (_, PullConsumer) = loop {
        let attempt = async {
            let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            let c = s
                .create_consumer(jetstream::consumer::pull::Config {
                    ack_policy: jetstream::consumer::AckPolicy::None,
                    inactive_threshold: Duration::from_secs(30),
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((s, c))
        };
        match attempt.await {
            Ok(both) => break both,
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot read stream {stream}: {err}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let total = s.cached_info().state.messages;
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .expect("fetch");
        let before = out.len();
        while let Some(Ok(m)) = batch.next().await {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            out.push((m.subject.to_string(), m.payload.clone(), seq));
        }
        if out.len() == before {
            break;
        }
    }
    out
}

pub struct Host {
    pub running: RunningHost,
    pub shutdown: CancellationToken,
}

impl Host {
    pub fn metrics(&self, handler: &str) -> mailroom::telemetry::MetricsSnapshot {
        self.running
            .metrics()
            .snapshot()
            .into_iter()
            .find(|(n, _)| n == handler)
            .map(|(_, m)| m)
            .unwrap_or_else(|| panic!("no handler {handler}"))
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.running.wait())
            .await
            .expect("host drains within 30s");
    }
}

pub fn header(m: &jetstream::message::StreamMessage, name: &str) -> String {
    m.headers
        .get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_else(|| panic!("header {name} missing; headers: {:?}", m.headers))
}

/// A `mailroom run` process with its metrics endpoint.
pub struct HostProcess {
    child: Child,
    metrics_port: u16,
    log: PathBuf,
}

impl HostProcess {
    pub fn spawn(dir: &Path, name: &str, config: &str, url: &str) -> HostProcess {
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .env(
                "XDG_CACHE_HOME",
                target_dir().join("mailroom-test-cache-cli"),
            )
            .env("MAILROOM_LOG", "info")
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--nats-url")
            .arg(url)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let host = HostProcess {
            child,
            metrics_port,
            log,
        };
        // Ready means its streams exist and every handler runs: publishing before that could
        // race the host creating the stream.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !host.ready() {
            assert!(
                Instant::now() < deadline,
                "host {name} did not become ready:\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        host
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return false;
        };
        let mut body = String::new();
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .and_then(|()| stream.read_to_string(&mut body))
            .is_ok()
            && body.starts_with("HTTP/1.1 200")
    }

    /// The handler's metrics from `/metrics`, by series name without the `mailroom_` prefix.
    pub fn try_metrics(&self) -> Option<HashMap<String, f64>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).ok()?;
        let mut out = HashMap::new();
        for line in body.lines().filter(|l| l.starts_with("mailroom_")) {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?.trim_start_matches("mailroom_");
            out.insert(name.to_owned(), value.parse().ok()?);
        }
        Some(out)
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.try_metrics()
            .and_then(|m| m.get(name).copied())
            .unwrap_or_else(|| panic!("no metric {name}:\n{}", self.log()))
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-TERM`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// Waits for the process to exit (after a SIGTERM) and returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "host did not exit within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The test failed: keep the host's log (its temporary directory goes) and show
            // its last warnings, which usually say why.
            let kept = target_dir().join("failed-test-logs");
            let _ = std::fs::create_dir_all(&kept);
            let name = self.log.file_name().map_or_else(
                || "host.log".to_owned(),
                |n| n.to_string_lossy().into_owned(),
            );
            let copy = kept.join(format!("{}-{name}", self.child.id()));
            let _ = std::fs::copy(&self.log, &copy);
            let log = self.log();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            eprintln!(
                "host log kept at {}; its last warnings:\n{}",
                copy.display(),
                warnings[warnings.len().saturating_sub(8)..].join("\n")
            );
        }
    }
}

pub async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 3-node nats-server cluster on loopback for one test, plus a client connected to all of
/// its nodes.
pub struct ClusterEnv {
    pub cluster: mailroom::nats_server::NatsCluster,
    pub js: jetstream::Context,
}

impl ClusterEnv {
    pub async fn new() -> ClusterEnv {
        let cluster = mailroom::nats_server::NatsCluster::start(3).unwrap_or_else(|err| {
            panic!("cannot start a nats-server cluster for the test: {err:#}")
        });
        let addrs = mailroom::config::server_addrs(&cluster.urls()).expect("cluster urls");
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(addrs)
            .await
            .expect("connect to the cluster");
        let js = jetstream::new(client.clone());
        // Ready once the nodes elected a meta leader and every node joined it: a stream with
        // three replicas can be placed.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let placed = js
                .create_stream(jetstream::stream::Config {
                    name: "READY".into(),
                    subjects: vec!["ready.probe".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await;
            if placed.is_ok() {
                let _ = js.delete_stream("READY").await;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster's JetStream never became ready: {placed:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        ClusterEnv { cluster, js }
    }

    /// The node leading `stream`.
    pub async fn stream_leader(&mut self, stream: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = self.js.get_stream(stream).await {
                if let Ok(info) = s.info().await {
                    if let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                        if let Some(i) = self.cluster.index_of(&leader) {
                            return i;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "stream {stream} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node leading consumer `consumer` of `stream`.
    pub async fn consumer_leader(&mut self, stream: &str, consumer: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = self
                .js
                .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                    consumer, stream,
                )
                .await
            {
                if let Ok(info) = c.info().await {
                    if let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                        if let Some(i) = self.cluster.index_of(&leader) {
                            return i;
                        }
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "consumer {consumer} has no leader"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes a node other than `node` lead `stream` (a leader stepdown, repeated until the
    /// election lands elsewhere), so that killing `node` later does not take `stream` down too.
    pub async fn move_stream_leader_off(&mut self, stream: &str, node: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.stream_leader(stream).await == node {
            assert!(
                Instant::now() < deadline,
                "stream {stream} keeps electing n{node}"
            );
            let _ = self
                .js
                .client()
                .request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                    "".into(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Makes a node other than `node` lead consumer `consumer` of `stream`.
    pub async fn move_consumer_leader_off(&mut self, stream: &str, consumer: &str, node: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.consumer_leader(stream, consumer).await == node {
            assert!(
                Instant::now() < deadline,
                "consumer {consumer} keeps electing n{node}"
            );
            let _ = self
                .js
                .client()
                .request(
                    format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"),
                    "".into(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A consumer of `stream` that has a leader now, and that leader. Partition consumers come
    /// and go (a new lease epoch is a new consumer), so whichever is there is taken.
    pub async fn some_consumer_leader(&mut self, stream: &str) -> (String, usize) {
        use futures::StreamExt as _;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = self.js.get_stream(stream).await {
                let names: Vec<String> = s
                    .consumer_names()
                    .filter_map(|n| async move { n.ok() })
                    .collect()
                    .await;
                for name in names {
                    let Ok(info) = s.consumer_info(&name).await else {
                        continue;
                    };
                    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
                    if let Some(i) = leader.and_then(|l| self.cluster.index_of(&l)) {
                        return (name, i);
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no consumer of {stream} has a leader"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn count(&self, stream: &str) -> u64 {
        match self.js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        }
    }
}
