//! Test support: a real nats-server per test, configs, modules, and waiting on JetStream state.

use std::path::{Path, PathBuf};
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
