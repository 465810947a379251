//! Integration tests: the host against real nats-server processes, and the CLI binary.

mod cli;
mod end_to_end;
mod engine;
mod faults;
mod sandbox;
mod security;
mod support;
