//! What a running host reports about itself: per handler its state, counters and consumer
//! backlog, the NATS connection, the version and the uptime. The HTTP endpoint
//! ([`crate::admin`]) and the summary line ([`crate::summary`]) both read it from here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer};
use async_nats::Client;
use futures::future::join_all;

use crate::config::Config;
use crate::health;
use crate::telemetry::{handler_status, Metrics};

/// How long a scrape or a summary waits for the server's consumer info.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// A cheap-to-clone view of a running host.
#[derive(Clone)]
pub struct HostStatus {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Metrics,
    client: Client,
    js: jetstream::Context,
    /// `(handler, stream, consumer)` of every configured handler.
    consumers: Vec<(String, String, String)>,
    started: Instant,
}

impl HostStatus {
    /// The status of the host running `config` with these metrics on this connection.
    pub fn new(config: &Config, metrics: Metrics, client: Client) -> HostStatus {
        HostStatus {
            inner: Arc::new(Inner {
                js: jetstream::new(client.clone()),
                consumers: config
                    .handlers
                    .iter()
                    .map(|h| (h.name.clone(), h.stream.clone(), h.consumer.clone()))
                    .collect(),
                metrics,
                client,
                started: Instant::now(),
            }),
        }
    }

    /// Every handler's live metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Whether the NATS connection is up.
    pub fn nats_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// Connected to NATS and every handler running; otherwise what is not, one per line.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let handlers: Vec<_> = self
            .inner
            .metrics
            .handlers()
            .map(|(name, m)| (name, m.lifecycle.get(), m.lifecycle.error()))
            .collect();
        health::readiness(
            self.nats_connected(),
            handlers
                .iter()
                .map(|(name, state, error)| (name.as_str(), *state, error.clone())),
        )
    }

    /// Each handler's consumer backlog, `num_pending + num_ack_pending`, as the server
    /// reports it; handlers whose consumer did not answer in time are left out.
    pub async fn backlogs(&self) -> Vec<(String, u64)> {
        let js = &self.inner.js;
        let asks = self
            .inner
            .consumers
            .iter()
            .map(|(handler, stream, consumer)| async move {
                let info = tokio::time::timeout(
                    INFO_TIMEOUT,
                    js.get_consumer_from_stream::<consumer::Config, _, _>(consumer, stream),
                )
                .await
                .ok()?
                .ok()?;
                let info = info.cached_info();
                Some((
                    handler.clone(),
                    info.num_pending + info.num_ack_pending as u64,
                ))
            });
        join_all(asks).await.into_iter().flatten().collect()
    }

    /// The `/status` document.
    pub async fn json(&self) -> serde_json::Value {
        let backlogs = self.backlogs().await;
        let handlers: Vec<serde_json::Value> = self
            .inner
            .metrics
            .handlers()
            .map(|(name, m)| {
                let backlog = backlogs.iter().find(|(n, _)| *n == name).map(|(_, b)| *b);
                handler_status(&name, &m, backlog)
            })
            .collect();
        let state = match self.inner.client.connection_state() {
            State::Connected => "connected",
            State::Disconnected => "disconnected",
            State::Pending => "connecting",
        };
        let info = self.inner.client.server_info();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.inner.started.elapsed().as_secs(),
            "ready": self.readiness().is_ok(),
            "nats": {
                "state": state,
                "server": info.server_name,
                "server_version": info.version,
            },
            "handlers": handlers,
        })
    }
}
