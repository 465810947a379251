//! A minimal HTTP endpoint: `GET /metrics` answers the host's counters in Prometheus text
//! format, `GET /status` answers them as JSON with each handler's blocked keys.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::Metrics;

/// Binds `addr` and serves until `shutdown`.
pub async fn spawn(
    addr: &str,
    metrics: Metrics,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
    let connections = tracker.clone();
    tracker.spawn(async move {
        loop {
            let (mut socket, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::warn!("metrics endpoint accept failed: {err}");
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            connections.spawn(async move {
                let mut request = [0u8; 1024];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let first_line = String::from_utf8_lossy(&request[..n]);
                let response = if first_line.starts_with("GET /metrics") {
                    let body = metrics.render_prometheus();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else if first_line.starts_with("GET /status") {
                    let body = metrics.render_status();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
                };
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(())
}
