//! Mailroom: runs WebAssembly message handlers for NATS JetStream streams.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of these modules and the
//! invariants they keep.

pub mod backoff;
pub mod capabilities;
pub mod config;
pub mod connect;
pub mod consumer;
pub mod dev;
pub mod executor;
pub mod host;
pub mod invoke;
mod metrics_server;
pub mod nats_server;
pub mod ordering;
pub mod pool;
pub mod runtime;
pub mod scaler;
pub mod telemetry;

pub use config::Config;
pub use host::{run, start, RunningHost};
