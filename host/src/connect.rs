//! Connecting to NATS with the configured authentication and TLS.
//!
//! Secrets (token, password, seeds) are passed to the client and never logged.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::{Client, ConnectOptions, Event};

use crate::config::NatsConfig;

/// How long the first connection is retried before giving up.
const INITIAL_ATTEMPTS: u32 = 10;

/// Connects to `nats.url`, retrying the first connection for a few seconds (the server may be
/// starting too), then reconnecting forever in the background.
pub async fn connect(nats: &NatsConfig) -> anyhow::Result<Client> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match options(nats).await?.connect(nats.url.as_str()).await {
            Ok(client) => {
                tracing::info!(url = %nats.url, "connected to NATS");
                return Ok(client);
            }
            Err(err) if attempt < INITIAL_ATTEMPTS => {
                tracing::warn!(url = %nats.url, attempt, "cannot connect to NATS yet: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "cannot connect to NATS at {} after {attempt} attempts; is nats-server \
                         running there, and are the credentials and TLS settings right?",
                        nats.url
                    )
                })
            }
        }
    }
}

/// Builds the client options for `nats`.
pub async fn options(nats: &NatsConfig) -> anyhow::Result<ConnectOptions> {
    let mut opts = if let Some(path) = &nats.credentials {
        ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials file {}", path.display()))?
    } else if let Some(path) = &nats.nkey_seed_file {
        let seed = std::fs::read_to_string(path)
            .with_context(|| format!("reading nkey seed file {}", path.display()))?;
        ConnectOptions::with_nkey(seed.trim().to_owned())
    } else if let Some(token) = &nats.token {
        ConnectOptions::with_token(token.clone())
    } else if let Some((user, password)) = &nats.user_password {
        ConnectOptions::with_user_and_password(user.clone(), password.clone())
    } else {
        ConnectOptions::new()
    };
    if let Some(tls) = &nats.tls {
        if let Some(ca) = &tls.ca {
            opts = opts.add_root_certificates(ca.clone());
        }
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                opts = opts.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            _ => anyhow::bail!("nats.tls: cert and key go together; set both or neither"),
        }
        opts = opts.require_tls(tls.required);
    }
    Ok(opts
        .name(&nats.name)
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("NATS connection (re)established"),
                Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                other => tracing::debug!("NATS event: {other}"),
            }
        }))
}
