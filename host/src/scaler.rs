//! The autoscaler: how many workers a handler should have, decided from what it observes.
//!
//! [`Scaler::decide`] is a pure function of its inputs and its own memory (no clock, no I/O),
//! so it is tested with simulated time below. The consumer calls it on a ticker and applies
//! the target to the [`Pool`](crate::pool::Pool).
//!
//! Policy:
//! - **Up, quickly**, while there is more work than workers and every worker is busy: double
//!   (quadruple when the backlog is 64 times the workers or more; at least +1), never above
//!   `max`, and in ordered mode never above the number of keys that
//!   could run (a worker without a runnable key is waste).
//! - **Stop growing** when the last growth did not raise throughput by 10% (CPU-bound
//!   handlers on few cores): go back to the size before it, hold that for `plateau_hold`,
//!   then probe again.
//! - **Not into a failing dependency**: while half or more of the attempts fail, do not grow.
//! - **Down after a cooldown** once the backlog is gone (or more workers than runnable keys):
//!   straight to the largest of `min`, the workers still busy, and the work that could run
//!   now; never below work in flight.

use std::time::{Duration, Instant};

/// Scaler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalerConfig {
    /// Fewest workers.
    pub min: usize,
    /// Most workers.
    pub max: usize,
    /// How long the backlog must stay drained before shrinking.
    pub cooldown: Duration,
    /// How long to hold a size at which growing stopped helping before trying again.
    pub plateau_hold: Duration,
}

/// What the scaler sees at one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// When.
    pub now: Instant,
    /// Messages waiting: on the server for this consumer, plus fetched and not started.
    pub backlog: u64,
    /// Ordered mode: keys that could start now plus keys running. `None` when unordered.
    pub runnable_keys: Option<usize>,
    /// Workers alive.
    pub workers: usize,
    /// Workers running a message.
    pub busy: usize,
    /// Messages settled successfully since the last tick.
    pub completed: u64,
    /// Failed attempts since the last tick.
    pub failed: u64,
    /// Time since the last tick.
    pub elapsed: Duration,
}

/// A decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The new target size.
    pub target: usize,
    /// Why, for logs and metrics.
    pub reason: Reason,
}

/// Why the scaler chose its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// More work than workers: grown.
    Backlog,
    /// Nothing to change.
    Steady,
    /// Waiting to see whether the last growth raised throughput.
    Measuring,
    /// The last growth did not raise throughput: not growing for a while.
    Plateau,
    /// Too many attempts fail: not growing.
    Failing,
    /// Idle (or more workers than runnable keys) past the cooldown: shrunk.
    Idle,
}

impl Reason {
    /// A short name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Backlog => "backlog",
            Reason::Steady => "steady",
            Reason::Measuring => "measuring",
            Reason::Plateau => "plateau",
            Reason::Failing => "failing",
            Reason::Idle => "idle",
        }
    }
}

#[derive(Debug, Clone)]
struct Growth {
    /// The size before the growth, to return to if it did not help.
    from: usize,
    rate_before: f64,
    at: Instant,
    /// Completions and time since the growth, to judge it on its own window.
    completed: u64,
    elapsed: Duration,
}

/// The controller's memory between ticks.
#[derive(Debug, Clone)]
pub struct Scaler {
    config: ScalerConfig,
    growth: Option<Growth>,
    plateau_until: Option<Instant>,
    quiet_since: Option<Instant>,
    /// Throughput over recent ticks (messages per second), smoothed.
    rate: f64,
}

/// How long after a growth its effect is judged.
const MEASURE: Duration = Duration::from_millis(500);

impl Scaler {
    /// A controller with `config`.
    pub fn new(config: ScalerConfig) -> Scaler {
        Scaler {
            config,
            growth: None,
            plateau_until: None,
            quiet_since: None,
            rate: 0.0,
        }
    }

    /// The target for the situation in `o`.
    pub fn decide(&mut self, o: &Observation) -> Decision {
        let secs = o.elapsed.as_secs_f64().max(1e-3);
        let sample = o.completed as f64 / secs;
        self.rate = if self.rate == 0.0 {
            sample
        } else {
            0.5 * self.rate + 0.5 * sample
        };
        let keep = |reason| Decision {
            target: o.workers.clamp(self.config.min, self.config.max),
            reason,
        };

        // Work that more workers could take on.
        let useful = match o.runnable_keys {
            Some(keys) => keys,
            None => o.busy + usize::try_from(o.backlog).unwrap_or(usize::MAX),
        };
        let saturated = o.busy >= o.workers && o.backlog > 0;

        // Shrink when idle (or more workers than work) past the cooldown.
        let quiet = o.backlog == 0 || useful < o.workers;
        if quiet && !saturated {
            let since = *self.quiet_since.get_or_insert(o.now);
            self.growth = None;
            if o.now.duration_since(since) >= self.config.cooldown {
                let target = self.config.min.max(o.busy).max(useful.min(o.workers));
                let target = target.clamp(self.config.min, self.config.max);
                if target < o.workers {
                    self.quiet_since = None;
                    return Decision {
                        target,
                        reason: Reason::Idle,
                    };
                }
            }
            return keep(Reason::Steady);
        }
        self.quiet_since = None;

        let attempts = o.completed + o.failed;
        if attempts > 0 && o.failed * 2 >= attempts {
            self.growth = None;
            return keep(Reason::Failing);
        }

        if let Some(growth) = &mut self.growth {
            // The tick of the growth itself still ran at the old size.
            if o.now > growth.at {
                growth.completed += o.completed;
                growth.elapsed += o.elapsed;
            }
            if o.now.duration_since(growth.at) < MEASURE {
                return keep(Reason::Measuring);
            }
            let rate_after = growth.completed as f64 / growth.elapsed.as_secs_f64().max(1e-3);
            let helped = rate_after >= growth.rate_before * 1.1;
            let from = growth.from;
            // The window just measured is the baseline for the next growth.
            self.rate = rate_after;
            self.growth = None;
            if !helped {
                self.plateau_until = Some(o.now + self.config.plateau_hold);
                // Extra workers that add nothing only cost memory: go back.
                return Decision {
                    target: from.clamp(self.config.min, self.config.max),
                    reason: Reason::Plateau,
                };
            }
        }
        if self.plateau_until.is_some_and(|until| o.now < until) {
            return keep(Reason::Plateau);
        }
        self.plateau_until = None;

        if saturated && o.workers < self.config.max && o.workers < useful {
            // A deep backlog (many times what the workers hold) quadruples the pool.
            let factor = if o.backlog >= 64 * o.workers as u64 {
                4
            } else {
                2
            };
            let target = (o.workers * factor)
                .max(o.workers + 1)
                .min(self.config.max)
                .min(useful.max(o.workers + 1));
            self.growth = Some(Growth {
                from: o.workers,
                rate_before: self.rate,
                at: o.now,
                completed: 0,
                elapsed: Duration::ZERO,
            });
            return Decision {
                target,
                reason: Reason::Backlog,
            };
        }
        keep(Reason::Steady)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(250);

    fn config() -> ScalerConfig {
        ScalerConfig {
            min: 1,
            max: 16,
            cooldown: Duration::from_secs(5),
            plateau_hold: Duration::from_secs(30),
        }
    }

    /// A simulated handler: each worker completes `per_worker` messages per second, up to a
    /// ceiling (`cpu_limit` workers' worth), and a backlog drains accordingly.
    struct Sim {
        scaler: Scaler,
        now: Instant,
        workers: usize,
        backlog: f64,
        per_worker: f64,
        cpu_limit: usize,
        fail_all: bool,
    }

    impl Sim {
        fn new(backlog: f64, per_worker: f64, cpu_limit: usize) -> Sim {
            Sim {
                scaler: Scaler::new(config()),
                now: Instant::now(),
                workers: 1,
                backlog,
                per_worker,
                cpu_limit,
                fail_all: false,
            }
        }

        fn tick(&mut self) -> Decision {
            let effective = self.workers.min(self.cpu_limit) as f64;
            let can = effective * self.per_worker * TICK.as_secs_f64();
            let done = can.min(self.backlog);
            let (completed, failed) = if self.fail_all {
                (0.0, can)
            } else {
                (done, 0.0)
            };
            if !self.fail_all {
                self.backlog -= done;
            }
            let busy = if self.backlog > 0.0 { self.workers } else { 0 };
            self.now += TICK;
            let d = self.scaler.decide(&Observation {
                now: self.now,
                backlog: self.backlog as u64,
                runnable_keys: None,
                workers: self.workers,
                busy,
                completed: completed as u64,
                failed: failed as u64,
                elapsed: TICK,
            });
            self.workers = d.target;
            d
        }
    }

    #[test]
    fn a_backlog_grows_the_pool_to_max_then_it_shrinks_after_the_cooldown() {
        // I/O-bound: each worker does 100 msgs/s, no CPU ceiling below max.
        let mut sim = Sim::new(50_000.0, 100.0, 64);
        let mut ticks_to_max = None;
        for tick in 1..=400 {
            sim.tick();
            if sim.workers == 16 && ticks_to_max.is_none() {
                ticks_to_max = Some(tick);
            }
        }
        let ticks = ticks_to_max.expect("reached max");
        // 1 → 4 → 16 (a deep backlog quadruples), each growth judged half a second later.
        assert!(ticks <= 8, "reached max after {ticks} ticks");
        // Drain 50,000 at ~1,600/s ≈ 31s = 125 ticks, then 5s cooldown = 20 ticks.
        assert_eq!(sim.backlog, 0.0);
        assert_eq!(sim.workers, 1, "back to min after the cooldown");
    }

    #[test]
    fn no_shrink_before_the_cooldown() {
        let mut sim = Sim::new(2_000.0, 100.0, 64);
        while sim.backlog > 0.0 {
            sim.tick();
        }
        let grown = sim.workers;
        assert!(grown > 1);
        for _ in 0..(5_000 / 250 - 1) {
            sim.tick();
            assert_eq!(sim.workers, grown, "shrunk inside the cooldown");
        }
        sim.tick();
        sim.tick();
        assert_eq!(sim.workers, 1);
    }

    #[test]
    fn cpu_bound_growth_stops_at_the_plateau() {
        // Two cores: more than 2 workers does not add throughput.
        let mut sim = Sim::new(1_000_000.0, 1_000.0, 2);
        for _ in 0..100 {
            sim.tick();
        }
        assert!(
            sim.workers <= 4,
            "kept growing to {} without gain",
            sim.workers
        );
        assert!(sim.workers >= 2);
    }

    #[test]
    fn a_failing_handler_does_not_grow() {
        let mut sim = Sim::new(50_000.0, 100.0, 64);
        sim.fail_all = true;
        for _ in 0..200 {
            let d = sim.tick();
            assert_eq!(sim.workers, 1, "{d:?}");
        }
    }

    #[test]
    fn ordered_mode_never_exceeds_runnable_keys() {
        let mut scaler = Scaler::new(config());
        let now = Instant::now();
        let mut workers = 1;
        for i in 0..50 {
            let d = scaler.decide(&Observation {
                now: now + TICK * i,
                backlog: 10_000,
                runnable_keys: Some(3),
                workers,
                busy: workers,
                completed: 100 * workers as u64,
                failed: 0,
                elapsed: TICK,
            });
            workers = d.target;
            assert!(workers <= 3, "{workers} workers for 3 keys");
        }
        assert_eq!(workers, 3);
    }

    #[test]
    fn never_below_work_in_flight() {
        let mut scaler = Scaler::new(config());
        let now = Instant::now();
        let mut workers = 10;
        for i in 0..100 {
            let d = scaler.decide(&Observation {
                now: now + TICK * i,
                backlog: 0,
                runnable_keys: None,
                workers,
                busy: 6,
                completed: 0,
                failed: 0,
                elapsed: TICK,
            });
            assert!(d.target >= 6, "{d:?}");
            workers = d.target;
        }
        assert_eq!(
            workers, 6,
            "shrunk to the six busy workers after the cooldown"
        );
    }
}
