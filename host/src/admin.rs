//! The host's HTTP endpoint (`host.metrics_addr`), served by axum:
//!
//! - `GET /healthz`: 200 while the process serves requests (liveness);
//! - `GET /readyz`: 200 when connected to NATS and every handler is running, else 503 with
//!   one line per reason (readiness);
//! - `GET /metrics`: Prometheus metrics ([`crate::telemetry::exposition`]), OpenMetrics when
//!   the scraper asks for it;
//! - `GET /status`: JSON with the version, uptime, NATS connection and, per handler, its
//!   state (and error), backlog, counters and blocked keys.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::status::HostStatus;
use crate::telemetry::exposition::{self, Format, HostGauges};

/// Binds `addr` and serves until `shutdown`; returns the bound address.
pub async fn spawn(
    addr: &str,
    status: HostStatus,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<std::net::SocketAddr> {
    serve(TcpListener::bind(addr).await?, status, shutdown, tracker)
}

/// Serves on a listener bound earlier (`mailroom run` binds it before connecting to NATS, so
/// an address in use fails at once).
pub fn serve(
    listener: TcpListener,
    status: HostStatus,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<std::net::SocketAddr> {
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "serving /healthz, /readyz, /metrics and /status");
    let app = router(status);
    tracker.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(err) = served {
            tracing::warn!("the HTTP endpoint stopped: {err}");
        }
    });
    Ok(local)
}

fn router(status: HostStatus) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_json))
        .with_state(status)
}

async fn readyz(State(status): State<HostStatus>) -> Response {
    match status.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", reasons.join("\n")),
        )
            .into_response(),
    }
}

async fn metrics(State(status): State<HostStatus>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let host = HostGauges {
        nats_connected: status.nats_connected(),
        backlogs: status.backlogs().await,
    };
    let body = exposition::render(status.metrics(), &host, format);
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

async fn status_json(State(status): State<HostStatus>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        status.json().await.to_string(),
    )
        .into_response()
}
