//! The circuit breaker: when a handler fails every attempt of many consecutive messages
//! (a missing setting, a dependency down), running more of them only burns their attempts
//! into dead letters. After `trip_after` failures in a row with no success, across keys, the
//! breaker opens (a failure counts when it is a message's second or later failed attempt, or
//! its last: many messages failing once at the same time, each then succeeding on its retry,
//! is not a broken handler): the host stops pulling for the handler and keeps what it holds (kept alive
//! by progress acks); one message runs as a probe after `first_probe`, then at doubling
//! intervals up to `max_probe`; the first success closes it again.
//!
//! [`Breaker`] is the pure state machine (time passed in); the consumer asks it before every
//! message ([`Breaker::admit`]) and tells it every result ([`Breaker::record`]).

use std::time::{Duration, Instant};

/// The breaker's settings (`breaker = { ... }` in a handler's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed executions that open the breaker; 0 never opens it.
    pub trip_after: u32,
    /// How long the breaker stays open before the first probe.
    pub first_probe: Duration,
    /// The longest interval between probes.
    pub max_probe: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            trip_after: 20,
            first_probe: Duration::from_secs(1),
            max_probe: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Messages run freely.
    Closed,
    /// Nothing runs until `probe_at`; then one message does.
    Open {
        probe_at: Instant,
        interval: Duration,
    },
    /// One probe is running; nothing else starts until it ends.
    Probing { interval: Duration },
}

/// What a worker may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run a message.
    Run,
    /// Wait until this instant, then ask again.
    WaitUntil(Instant),
    /// Wait until the running probe ends, then ask again.
    Hold,
}

/// A change worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The breaker opened (or a probe failed and it stays open for `next_probe`).
    Opened {
        /// When the next probe runs.
        next_probe: Duration,
        /// Whether it was closed before (a trip) or a probe failed.
        tripped: bool,
    },
    /// A success closed it.
    Closed,
}

/// The circuit breaker of one handler.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    failures: u32,
    state: State,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            failures: 0,
            state: State::Closed,
        }
    }

    /// Whether messages run freely.
    #[cfg(test)]
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Asks to start a message at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Run,
            State::Open { probe_at, interval } if now >= probe_at => {
                self.state = State::Probing { interval };
                Admit::Run
            }
            State::Open { probe_at, .. } => Admit::WaitUntil(probe_at),
            State::Probing { .. } => Admit::Hold,
        }
    }

    /// Records how an execution ended.
    pub fn record(&mut self, ok: bool, now: Instant) -> Option<Change> {
        if ok {
            self.failures = 0;
            let was_closed = self.state == State::Closed;
            self.state = State::Closed;
            return (!was_closed).then_some(Change::Closed);
        }
        self.failures = self.failures.saturating_add(1);
        match self.state {
            State::Closed
                if self.config.trip_after > 0 && self.failures >= self.config.trip_after =>
            {
                let interval = self.config.first_probe;
                self.state = State::Open {
                    probe_at: now + interval,
                    interval,
                };
                Some(Change::Opened {
                    next_probe: interval,
                    tripped: true,
                })
            }
            State::Probing { interval } => {
                let interval = (interval * 2).min(self.config.max_probe);
                self.state = State::Open {
                    probe_at: now + interval,
                    interval,
                };
                Some(Change::Opened {
                    next_probe: interval,
                    tripped: false,
                })
            }
            // Failures of messages that started before the breaker opened change nothing.
            _ => None,
        }
    }

    /// A probe ended without a result (handed back at a drain, say): let another one run.
    pub fn probe_abandoned(&mut self, now: Instant) {
        if let State::Probing { interval } = self.state {
            self.state = State::Open {
                probe_at: now,
                interval,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            trip_after: 3,
            first_probe: Duration::from_secs(1),
            max_probe: Duration::from_secs(4),
        }
    }

    #[test]
    fn trips_after_consecutive_failures_probes_with_backoff_and_closes_on_success() {
        let t0 = Instant::now();
        let mut b = Breaker::new(config());
        assert_eq!(b.record(false, t0), None);
        assert_eq!(b.record(true, t0), None, "a success resets the count");
        assert_eq!(b.record(false, t0), None);
        assert_eq!(b.record(false, t0), None);
        assert_eq!(
            b.record(false, t0),
            Some(Change::Opened {
                next_probe: Duration::from_secs(1),
                tripped: true
            })
        );
        assert!(!b.is_closed());
        assert_eq!(b.admit(t0), Admit::WaitUntil(t0 + Duration::from_secs(1)));
        // Messages already running finish; their failures do not move the probe.
        assert_eq!(b.record(false, t0), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Admit::Run, "the probe");
        assert_eq!(b.admit(t1), Admit::Hold, "one probe at a time");
        assert_eq!(
            b.record(false, t1),
            Some(Change::Opened {
                next_probe: Duration::from_secs(2),
                tripped: false
            })
        );
        let t3 = t1 + Duration::from_secs(2);
        assert_eq!(b.admit(t3), Admit::Run);
        b.record(false, t3);
        let t7 = t3 + Duration::from_secs(4);
        assert_eq!(b.admit(t7), Admit::Run);
        assert_eq!(
            b.record(false, t7),
            Some(Change::Opened {
                next_probe: Duration::from_secs(4),
                tripped: false
            }),
            "capped at max_probe"
        );
        let t11 = t7 + Duration::from_secs(4);
        assert_eq!(b.admit(t11), Admit::Run);
        assert_eq!(b.record(true, t11), Some(Change::Closed));
        assert!(b.is_closed());
        assert_eq!(b.admit(t11), Admit::Run);
    }

    #[test]
    fn zero_never_trips_and_abandoned_probes_are_replaced() {
        let t0 = Instant::now();
        let mut off = Breaker::new(BreakerConfig {
            trip_after: 0,
            ..config()
        });
        for _ in 0..1000 {
            assert_eq!(off.record(false, t0), None);
        }
        assert!(off.is_closed());
        let mut b = Breaker::new(config());
        for _ in 0..3 {
            b.record(false, t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.admit(t1), Admit::Run);
        b.probe_abandoned(t1);
        assert_eq!(b.admit(t1), Admit::Run, "another probe may run at once");
    }
}
