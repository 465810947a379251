//! `[nats]`: how to reach NATS (URLs, authentication, TLS).

use std::path::PathBuf;

use anyhow::bail;

use super::raw;

/// How to connect to NATS. Secrets are never logged (`Debug` redacts them).
#[derive(Clone, Default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// How long the first connection is tried; `None` tries forever. Default 30s.
    pub connect_timeout: Option<std::time::Duration>,
    /// Connection name shown by the server.
    pub name: String,
    /// A `.creds` file (JWT and nkey seed).
    pub credentials: Option<PathBuf>,
    /// A file holding an nkey seed.
    pub nkey_seed_file: Option<PathBuf>,
    /// Token authentication.
    pub token: Option<String>,
    /// User and password authentication.
    pub user_password: Option<(String, String)>,
    /// TLS settings.
    pub tls: Option<TlsConfig>,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("connect_timeout", &self.connect_timeout)
            .field("name", &self.name)
            .field("credentials", &self.credentials)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "user_password",
                &self.user_password.as_ref().map(|(u, _)| (u, "<redacted>")),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

/// TLS for the NATS connection.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// A CA certificate (PEM) to trust in addition to the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub key: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub required: bool,
}

pub(super) fn convert_nats(
    n: raw::RawNats,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> anyhow::Result<NatsConfig> {
    let user_password = match (n.user, n.password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => bail!("nats: user and password go together; set both or neither"),
    };
    let auth_methods = [
        n.credentials.is_some(),
        n.nkey_seed_file.is_some(),
        n.token.is_some(),
        user_password.is_some(),
    ];
    if auth_methods.iter().filter(|x| **x).count() > 1 {
        bail!("nats: choose one of credentials, nkey_seed_file, token, or user/password");
    }
    if let Some(tls) = &n.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            bail!("nats.tls: cert and key go together; set both or neither");
        }
    }
    let url = n.url.unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    server_addrs(&url).map_err(|e| anyhow::anyhow!("nats.url: {e:#}"))?;
    let connect_timeout = match n.connect_timeout {
        None => Some(std::time::Duration::from_secs(30)),
        Some(text) => {
            let d = super::parse_duration(&text)
                .map_err(|e| anyhow::anyhow!("nats.connect_timeout: {e}"))?;
            (!d.is_zero()).then_some(d)
        }
    };
    for (what, path) in [
        ("credentials", &n.credentials),
        ("nkey_seed_file", &n.nkey_seed_file),
    ] {
        if let Some(path) = path {
            let path = resolve(path.clone());
            if !path.is_file() {
                bail!(
                    "nats.{what}: {} does not exist or is not a file",
                    path.display()
                );
            }
        }
    }
    if let Some(tls) = &n.tls {
        for (what, path) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
            if let Some(path) = path {
                let path = resolve(path.clone());
                if !path.is_file() {
                    bail!(
                        "nats.tls.{what}: {} does not exist or is not a file",
                        path.display()
                    );
                }
            }
        }
    }
    Ok(NatsConfig {
        connect_timeout,
        url,
        name: n.name.unwrap_or_else(|| "mailroom".to_owned()),
        credentials: n.credentials.map(resolve),
        nkey_seed_file: n.nkey_seed_file.map(resolve),
        token: n.token,
        user_password,
        tls: n.tls.map(|t| TlsConfig {
            ca: t.ca.map(resolve),
            cert: t.cert.map(resolve),
            key: t.key.map(resolve),
            required: t.required.unwrap_or(true),
        }),
    })
}

/// Parses a comma-separated list of server URLs (`nats://a:4222, nats://b:4222`, `tls://..`,
/// `ws://..`, or `host:port`).
pub fn server_addrs(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let mut addrs = Vec::new();
    for part in url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((scheme, _)) = part.split_once("://") {
            if !matches!(scheme, "nats" | "tls" | "ws" | "wss") {
                bail!(
                    "{part:?} has the scheme {scheme:?}; use nats://, tls://, ws:// or wss:// \
                     (or host:port)"
                );
            }
        }
        let addr = part.parse::<async_nats::ServerAddr>().map_err(|e| {
            anyhow::anyhow!("{part:?} is not a server URL ({e}); write it as nats://host:4222")
        })?;
        addrs.push(addr);
    }
    if addrs.is_empty() {
        bail!("no server URL given; write nats://host:4222 (comma-separate several)");
    }
    Ok(addrs)
}
