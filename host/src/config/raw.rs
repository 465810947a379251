//! The configuration file as written: TOML deserialized as-is, before validation.
//!
//! Every table denies unknown fields, so a typo is an error that names the field instead of a
//! setting silently ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub nats: RawNats,
    #[serde(default)]
    pub host: RawHost,
    #[serde(default, rename = "stream")]
    pub streams: Vec<RawStream>,
    #[serde(default, rename = "bucket")]
    pub buckets: Vec<RawBucket>,
    #[serde(default, rename = "handler")]
    pub handlers: Vec<RawHandler>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNats {
    pub url: Option<String>,
    pub name: Option<String>,
    pub credentials: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub required: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub drain_timeout: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub cache: Option<bool>,
    pub epoch_tick: Option<String>,
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub name: String,
    pub subjects: Vec<String>,
    pub storage: Option<String>,
    pub duplicate_window: Option<String>,
    pub max_age: Option<String>,
    pub replicas: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucket {
    pub name: String,
    pub history: Option<i64>,
    pub storage: Option<String>,
    pub replicas: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHandler {
    pub name: String,
    pub module: PathBuf,
    pub stream: String,
    pub consumer: Option<String>,
    pub subjects: Option<Vec<String>>,
    pub concurrency: Option<u32>,
    pub min_workers: Option<u32>,
    pub max_workers: Option<u32>,
    pub ordering: Option<String>,
    pub on_missing_key: Option<String>,
    pub on_exhausted: Option<String>,
    pub max_buffered: Option<u32>,
    pub prefetch: Option<u32>,
    pub max_keys: Option<u32>,
    pub max_ack_pending: Option<i64>,
    pub scale_cooldown: Option<String>,
    pub isolation: Option<String>,
    pub reuse_limit: Option<u32>,
    pub ack_wait: Option<String>,
    pub dead_letter: Option<String>,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub publish: RawGrant,
    #[serde(default)]
    pub kv: RawGrant,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_attempts: Option<u32>,
    pub backoff: Option<Vec<String>>,
    pub initial: Option<String>,
    pub max: Option<String>,
    pub multiplier: Option<f64>,
    pub jitter: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub memory: Option<String>,
    pub timeout: Option<String>,
    pub max_publishes: Option<u32>,
    pub output: Option<String>,
    pub log: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    #[serde(default)]
    pub allow: Vec<String>,
}
