//! Connecting to NATS with the configured authentication and TLS.
//!
//! Secrets (token, password, seeds) are passed to the client and never logged.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};

use crate::config::{server_addrs, NatsConfig};

/// Connects to the servers of `nats.url`. A server that is not up yet is tried again every
/// half second for `nats.connect_timeout` (`None`: forever); an error that trying again
/// cannot fix (a bad URL, a missing or bad credentials or CA file, refused authentication or
/// TLS) fails at once. Once connected, the client reconnects forever in the background.
pub async fn connect(nats: &NatsConfig) -> anyhow::Result<Client> {
    let addrs = server_addrs(&nats.url)?;
    let give_up = nats.connect_timeout.map(|t| Instant::now() + t);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let options = options(nats).await?;
        match options.connect(addrs.clone()).await {
            Ok(client) => {
                tracing::info!(url = %nats.url, "connected to NATS");
                return Ok(client);
            }
            Err(err)
                if matches!(
                    err.kind(),
                    ConnectErrorKind::ServerParse
                        | ConnectErrorKind::Authentication
                        | ConnectErrorKind::AuthorizationViolation
                        | ConnectErrorKind::Tls
                ) =>
            {
                return Err(err).with_context(|| {
                    format!(
                        "cannot connect to NATS at {}: the server refused the connection's \
                         credentials or TLS settings; check [nats] in the config",
                        nats.url
                    )
                })
            }
            Err(err) if give_up.is_none_or(|t| Instant::now() < t) => {
                tracing::warn!(url = %nats.url, attempt, "cannot connect to NATS yet: {err}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => {
                return Err(err).with_context(|| {
                    format!(
                        "cannot connect to NATS at {} within {} ({attempt} attempts); is \
                         nats-server running there? (nats.connect_timeout or \
                         --connect-timeout waits longer; 0 waits forever)",
                        nats.url,
                        humantime::format_duration(nats.connect_timeout.unwrap_or_default())
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
