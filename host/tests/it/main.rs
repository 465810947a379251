//! Integration tests: the host against real nats-server processes, and the CLI binary.

mod cli;
mod cluster;
mod correctness;
mod deploy;
mod dlq;
mod end_to_end;
mod engine;
mod faults;
mod operate;
mod partitions;
mod polyglot;
mod push;
mod sandbox;
mod security;
mod spans;
mod state;
mod support;
mod templates;
