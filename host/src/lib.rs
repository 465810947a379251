//! Mailroom: runs WebAssembly message handlers for NATS JetStream streams.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of these modules and the
//! invariants they keep.

pub mod admin;
pub mod backoff;
pub mod capabilities;
pub mod config;
pub mod connect;
pub mod consumer;
pub mod cpu;
pub mod dev;
pub mod dlq;
pub mod executor;
pub mod fence;
pub mod fleet;
pub mod group;
pub mod health;
pub mod host;
pub mod invoke;
pub mod nats_server;
pub mod ordering;
pub mod pool;
pub mod registry;
pub mod runtime;
pub mod scaler;
pub mod signals;
pub mod status;
pub mod summary;
pub mod telemetry;
pub mod template;
pub mod trace;
pub mod validate;

pub use config::Config;
pub use host::{run, start, RunningHost};
