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
    #[serde(default)]
    pub telemetry: RawTelemetry,
    #[serde(default)]
    pub deploy: RawDeploy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeploy {
    pub watch: Option<bool>,
    pub handlers: Option<Vec<String>>,
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub publish: RawGrant,
    #[serde(default)]
    pub kv: RawGrant,
    pub max_memory: Option<String>,
    pub instances: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNats {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
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
    pub id: Option<String>,
    pub lease_ttl: Option<String>,
    pub drain_timeout: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub cache: Option<bool>,
    pub epoch_tick: Option<String>,
    pub metrics_addr: Option<String>,
    pub on_handler_error: Option<String>,
    pub summary_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
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
    pub consumer_kind: Option<String>,
    pub deliver_group: Option<String>,
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
    pub partitions: Option<u32>,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub breaker: RawBreaker,
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
pub struct RawBreaker {
    pub trip_after: Option<u32>,
    pub first_probe: Option<String>,
    pub max_probe: Option<String>,
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
