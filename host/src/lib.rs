//! Mailroom: runs WebAssembly message handlers for NATS JetStream streams.

pub mod backoff;
pub mod capabilities;
pub mod config;
pub mod runtime;
pub mod telemetry;
