//! Handlers deployed through NATS: modules in a JetStream Object Store, specs as revisions of
//! a KV key, and the hosts that follow them.
//!
//! - `MR_MODULES` (Object Store): module bytes, named `sha256-<hex>` after their content, so
//!   an identical module is stored once however often it is deployed.
//! - `MR_REGISTRY` (KV, 64 values of history per key): key `<handler>` holds the handler's
//!   revisions, each a [`SpecRecord`]: the `[[handler]]` table (TOML, without `name` and
//!   `module`), the module's hash and size, labels, who deployed it and when, and whether it
//!   was a deploy, a rollback or an undeploy. A revision number counts per handler and is
//!   written with a compare-and-set on the key, so two deploys never get the same one.
//! - `MR_REGISTRY_HOSTS` (KV, entries expire after a minute unless renewed): key `<host id>`
//!   holds a [`HostRecord`]: what the host selects and, per deployed handler, the revision it
//!   runs and the last revision it refused, with the reason. `mailroom ls` reads it.
//!
//! [`commands`] is the client side (`deploy`, `ls`, `history`, `rollback`, `undeploy`),
//! [`follow`] the host side (watch, download, check, then hot swap or drain and rebind),
//! [`change`] the pure decision between the two, [`reload`] `mailroom dev --watch`.
//!
//! Invariants:
//! - A module runs only after its bytes hashed to the name it was deployed under
//!   ([`store::Registry::download`]) and it passed the host's own checks: compiled, linked
//!   against the `mailroom:handler` world, instantiated once ([`module::check`]), and its spec
//!   within the host's `[deploy]` ceiling. Anything short of that leaves the running revision
//!   in place and is reported in the host's record.
//! - The registry knows nothing about messages: a hot swap is `ModuleSlot::swap` (see
//!   `runtime::slot`), a drain and rebind is the handler's own stop token and a new launch.

pub mod change;
pub mod commands;
pub(crate) mod follow;
pub mod module;
pub mod reload;
pub mod spec;
pub mod store;
pub mod view;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use store::Registry;

/// The KV bucket of handler specs.
pub const SPECS: &str = "MR_REGISTRY";
/// The KV bucket of host reports.
pub const HOSTS: &str = "MR_REGISTRY_HOSTS";
/// The Object Store bucket of modules.
pub const MODULES: &str = "MR_MODULES";
/// Revisions kept per handler.
pub const HISTORY: i64 = 64;

/// A deployed module: its SHA-256 and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRef {
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

impl ModuleRef {
    /// The reference of `bytes`.
    pub fn of(bytes: &[u8]) -> ModuleRef {
        ModuleRef {
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        }
    }

    /// Its name in `MR_MODULES`.
    pub fn object_name(&self) -> String {
        format!("sha256-{}", self.sha256)
    }

    /// The first 12 hex digits, for people.
    pub fn short(&self) -> &str {
        &self.sha256[..self.sha256.len().min(12)]
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How a revision came about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Origin {
    /// `mailroom deploy`.
    Deploy,
    /// `mailroom rollback`: a copy of revision `to`.
    Rollback {
        /// The revision copied.
        to: u64,
    },
    /// `mailroom undeploy`: hosts drain the handler and stop it.
    Undeploy,
}

/// One revision of a deployed handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecRecord {
    /// The handler's name (also the key).
    pub name: String,
    /// The handler's revision number: 1, 2, 3, … per handler.
    pub revision: u64,
    /// The `[[handler]]` table as TOML, without `name` and `module`.
    pub handler: String,
    /// The module.
    pub module: ModuleRef,
    /// Labels hosts select on (`deploy.labels`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub deployed_at: u64,
    /// `user@machine` of whoever wrote it.
    #[serde(default)]
    pub deployed_by: String,
    /// Deploy, rollback or undeploy.
    pub origin: Origin,
}

impl SpecRecord {
    /// Whether hosts should run it (it is not an undeploy).
    pub fn is_live(&self) -> bool {
        self.origin != Origin::Undeploy
    }
}

/// What one host reports about the deployed handlers it selects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's label (`host.id` or the machine's name).
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// When it started, in seconds since the Unix epoch.
    pub started: u64,
    /// When it last wrote this record.
    pub updated: u64,
    /// Its `deploy.handlers` selector (empty: every handler).
    #[serde(default)]
    pub select_handlers: Vec<String>,
    /// Its `deploy.labels` selector.
    #[serde(default)]
    pub select_labels: BTreeMap<String, String>,
    /// Handlers named in its own file (a deployed handler of that name is refused there).
    #[serde(default)]
    pub file_handlers: Vec<String>,
    /// Per deployed handler it selects.
    #[serde(default)]
    pub handlers: BTreeMap<String, HandlerReport>,
}

/// One host's state of one deployed handler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerReport {
    /// The revision it runs (`None`: not running, e.g. undeployed or never started).
    pub running: Option<u64>,
    /// The module of that revision.
    #[serde(default)]
    pub module: Option<String>,
    /// A revision it is downloading and checking now.
    #[serde(default)]
    pub preparing: Option<u64>,
    /// The last revision it could not run, and why (it keeps running `running`).
    #[serde(default)]
    pub failed: Option<(u64, String)>,
    /// When this changed last, in seconds since the Unix epoch.
    pub since: u64,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
