//! The lifecycle of a handler as operators see it (`/status`, `/readyz`,
//! `mailroom_handler_up`), and readiness as a pure function of it.
//!
//! The state lives in an atomic cell on the handler's [`crate::telemetry::HandlerMetrics`], so
//! every part of the host that holds the metrics can set it without a lock: `host/` sets
//! `starting`, `running`, `failed` and `stopped`; the consumer sets `tripped` and `draining`.
//! Reading it is a relaxed load (the endpoint and the summary read it a few times a minute).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Where a handler is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum HandlerState {
    /// Loading its module and binding its consumer (or waiting to try again).
    Starting = 0,
    /// Consuming.
    Running = 1,
    /// Could not start; the error says why. Under `on_handler_error = "retry"` it is tried
    /// again after a backoff.
    Failed = 2,
    /// Paused by the circuit breaker: its dependency keeps failing.
    Tripped = 3,
    /// Shutting down: it no longer pulls and lets running messages finish.
    Draining = 4,
    /// Drained and stopped.
    Stopped = 5,
}

impl HandlerState {
    fn from_u8(v: u8) -> HandlerState {
        match v {
            1 => HandlerState::Running,
            2 => HandlerState::Failed,
            3 => HandlerState::Tripped,
            4 => HandlerState::Draining,
            5 => HandlerState::Stopped,
            _ => HandlerState::Starting,
        }
    }

    /// The lowercase name used in `/status` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerState::Starting => "starting",
            HandlerState::Running => "running",
            HandlerState::Failed => "failed",
            HandlerState::Tripped => "tripped",
            HandlerState::Draining => "draining",
            HandlerState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for HandlerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handler's current [`HandlerState`] and the error that made it `failed` or `tripped`.
#[derive(Debug, Default)]
pub struct Lifecycle {
    state: AtomicU8,
    error: Mutex<Option<String>>,
}

impl Lifecycle {
    /// The current state.
    pub fn get(&self) -> HandlerState {
        HandlerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Moves to `state`. Entering `running`, `draining` or `stopped` clears the last error;
    /// use [`Lifecycle::fail`] or [`Lifecycle::trip`] to record one.
    pub fn set(&self, state: HandlerState) {
        if matches!(
            state,
            HandlerState::Running | HandlerState::Draining | HandlerState::Stopped
        ) {
            *self.lock() = None;
        }
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Moves to `failed` with the reason.
    pub fn fail(&self, error: impl Into<String>) {
        *self.lock() = Some(error.into());
        self.state
            .store(HandlerState::Failed as u8, Ordering::Relaxed);
    }

    /// Moves to `tripped` with the reason (the circuit breaker opened).
    pub fn trip(&self, reason: impl Into<String>) {
        *self.lock() = Some(reason.into());
        self.state
            .store(HandlerState::Tripped as u8, Ordering::Relaxed);
    }

    /// The error recorded with the current `failed` or `tripped` state.
    pub fn error(&self) -> Option<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A plain string: a panic while holding the lock cannot leave it inconsistent.
        self.error.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a host is ready: connected to NATS and every handler running. `Err` lists what is
/// not, one reason per line, for the body of a 503 from `/readyz`.
pub fn readiness<'a>(
    nats_connected: bool,
    handlers: impl IntoIterator<Item = (&'a str, HandlerState, Option<String>)>,
) -> Result<(), Vec<String>> {
    let mut not_ready = Vec::new();
    if !nats_connected {
        not_ready.push("nats: not connected".to_owned());
    }
    for (name, state, error) in handlers {
        if state != HandlerState::Running {
            not_ready.push(match error {
                Some(error) => format!("handler {name}: {state}: {error}"),
                None => format!("handler {name}: {state}"),
            });
        }
    }
    if not_ready.is_empty() {
        Ok(())
    } else {
        Err(not_ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_errors_follow_them() {
        let l = Lifecycle::default();
        assert_eq!(l.get(), HandlerState::Starting);
        l.fail("stream ORDERS not found");
        assert_eq!(l.get(), HandlerState::Failed);
        assert_eq!(l.error().as_deref(), Some("stream ORDERS not found"));
        l.set(HandlerState::Starting);
        assert_eq!(
            l.error().as_deref(),
            Some("stream ORDERS not found"),
            "a retry keeps showing why the last attempt failed"
        );
        l.set(HandlerState::Running);
        assert_eq!((l.get(), l.error()), (HandlerState::Running, None));
        l.trip("5 failures in a row");
        assert_eq!(l.get(), HandlerState::Tripped);
        for s in [
            HandlerState::Starting,
            HandlerState::Running,
            HandlerState::Failed,
            HandlerState::Tripped,
            HandlerState::Draining,
            HandlerState::Stopped,
        ] {
            assert_eq!(HandlerState::from_u8(s as u8), s);
        }
    }

    #[test]
    fn ready_only_when_connected_and_every_handler_runs() {
        let running = |n| (n, HandlerState::Running, None);
        assert_eq!(readiness(true, [running("a"), running("b")]), Ok(()));
        assert_eq!(
            readiness(false, [running("a")]),
            Err(vec!["nats: not connected".to_owned()])
        );
        let failed = ("b", HandlerState::Failed, Some("no stream".to_owned()));
        assert_eq!(
            readiness(true, [running("a"), failed]),
            Err(vec!["handler b: failed: no stream".to_owned()])
        );
        assert_eq!(
            readiness(true, [("c", HandlerState::Draining, None)]),
            Err(vec!["handler c: draining".to_owned()])
        );
    }
}
