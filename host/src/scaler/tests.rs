//! The scaler against simulated handlers, in simulated time: I/O-bound, CPU-bound (on a host
//! that keeps some of its cores for other processes, and on one that gives them all), failing,
//! slow, noisy, with outlier windows, and backlogs that come in bursts.

use super::*;

/// The consumer's scale tick.
const TICK_MS: u64 = 100;
const TICK: Duration = Duration::from_millis(TICK_MS);

/// Ticks in `ms` milliseconds of simulated time.
const fn ticks_for(ms: u64) -> usize {
    (ms / TICK_MS) as usize
}

fn config() -> ScalerConfig {
    ScalerConfig {
        min: 1,
        max: 16,
        cooldown: Duration::from_secs(5),
        // Long, so that a test reaching `max` soon after a plateau shows the hold was ended
        // by evidence rather than by time.
        plateau_hold: Duration::from_secs(30),
        cores: 2,
    }
}

/// A simulated handler on a simulated host.
#[derive(Debug, Clone, Copy)]
struct Handler {
    /// Wall time a worker spends per message when it has a core, in seconds.
    service: f64,
    /// CPU time per message this process spends, in seconds.
    cpu: f64,
    /// Cores this process can actually get (other processes take the rest).
    available: f64,
    /// Each window's completions vary uniformly within ±`noise` of the model.
    noise: f64,
    /// Every attempt fails.
    failing: bool,
}

/// `flaky sleep:1`: a 1 ms wait that takes ~2.3 ms, ~40 µs of CPU.
const IO: Handler = Handler {
    service: 0.0023,
    cpu: 0.000_04,
    available: 1.6,
    noise: 0.0,
    failing: false,
};

/// `noop` with a fresh instance: ~40 µs of CPU and nothing else, on two cores of which a
/// co-located nats-server takes 0.4.
const CPU: Handler = Handler {
    service: 0.000_04,
    cpu: 0.000_04,
    available: 1.6,
    noise: 0.0,
    failing: false,
};

struct Sim {
    scaler: Scaler,
    handler: Handler,
    now: Instant,
    workers: usize,
    backlog: f64,
    /// Multiplies the next window's completions once (an outlier), then resets to 1.
    next_window: f64,
    rng: u64,
    history: Vec<usize>,
}

impl Sim {
    fn new(handler: Handler, backlog: f64) -> Sim {
        Sim::with_config(handler, backlog, config())
    }

    fn with_config(handler: Handler, backlog: f64, config: ScalerConfig) -> Sim {
        let workers = config.min;
        Sim {
            scaler: Scaler::new(config),
            handler,
            now: Instant::now(),
            workers,
            backlog,
            next_window: 1.0,
            rng: 0x9E37_79B9_7F4A_7C15,
            history: Vec::new(),
        }
    }

    fn seeded(mut self, seed: u64) -> Sim {
        self.rng ^= seed.wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1;
        self
    }

    /// Uniform in [0, 1), xorshift64.
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Messages per second the pool completes at its size.
    fn rate(&self) -> f64 {
        let h = self.handler;
        (self.workers as f64 / h.service).min(h.available / h.cpu)
    }

    fn tick(&mut self) -> Decision {
        self.tick_with(None)
    }

    /// A tick in which the process also used `extra` CPU for something else.
    fn tick_with_cpu(&mut self, extra: Duration) -> Decision {
        self.tick_with(Some(extra))
    }

    fn tick_with(&mut self, extra: Option<Duration>) -> Decision {
        let h = self.handler;
        let noise = 1.0 + h.noise * (2.0 * self.uniform() - 1.0);
        let factor = std::mem::replace(&mut self.next_window, 1.0);
        let attempted = self.rate() * TICK.as_secs_f64() * noise * factor;
        let (completed, failed) = if h.failing {
            (0.0, attempted)
        } else {
            let done = attempted.min(self.backlog);
            self.backlog -= done;
            (done, 0.0)
        };
        let busy = if self.backlog > 0.0 { self.workers } else { 0 };
        self.now += TICK;
        let d = self.scaler.decide(&Observation {
            now: self.now,
            backlog: self.backlog as u64,
            runnable_keys: None,
            workers: self.workers,
            busy,
            ready: usize::from(self.backlog > 0.0),
            completed: completed as u64,
            failed: failed as u64,
            elapsed: TICK,
            cpu: Some(
                Duration::from_secs_f64((completed + failed) * h.cpu) + extra.unwrap_or_default(),
            ),
        });
        self.workers = d.target;
        self.history.push(self.workers);
        d
    }

    /// Ticks until the pool has `max` workers; the number of ticks, if within `limit`.
    fn ticks_to(&mut self, workers: usize, limit: usize) -> Option<usize> {
        (1..=limit).find(|_| {
            self.tick();
            self.workers == workers
        })
    }
}

#[test]
fn an_io_bound_backlog_grows_the_pool_to_max_within_two_seconds_then_it_shrinks_after_the_cooldown()
{
    let mut sim = Sim::new(IO, 50_000.0);
    let ticks = sim.ticks_to(16, ticks_for(100_000)).expect("reached max");
    // One tick to see the backlog, one to measure 1 worker, one to measure 4.
    assert!(ticks <= ticks_for(2_000), "reached max after {ticks} ticks");
    while sim.backlog > 0.0 {
        sim.tick();
        assert_eq!(sim.workers, 16, "left max while the backlog drained");
    }
    for _ in 0..=ticks_for(5_000) {
        sim.tick();
    }
    assert_eq!(sim.workers, 1, "back to min after the cooldown");
}

#[test]
fn a_noisy_io_bound_handler_still_reaches_max_within_two_seconds_and_stays_there() {
    for seed in 1..=200 {
        let mut sim = Sim::new(Handler { noise: 0.3, ..IO }, 1e6).seeded(seed);
        let ticks = sim.ticks_to(16, ticks_for(100_000)).expect("reached max");
        assert!(
            ticks <= ticks_for(2_000),
            "seed {seed}: reached max after {ticks} ticks"
        );
        for _ in 0..ticks_for(25_000) {
            sim.tick();
            assert_eq!(sim.workers, 16, "seed {seed}: left max with a backlog");
        }
    }
}

#[test]
fn one_bad_window_right_after_a_growth_does_not_stop_the_growth() {
    let mut sim = Sim::new(IO, 50_000.0);
    sim.ticks_to(4, ticks_for(100_000)).expect("grew to 4");
    sim.next_window = 0.1; // a stall: 10% of the usual completions
    let ticks = sim.ticks_to(16, ticks_for(100_000)).expect("reached max");
    assert!(
        ticks <= ticks_for(750),
        "reached max {ticks} ticks after the stall"
    );
}

#[test]
fn an_outlier_reference_is_found_out_and_growth_resumes_without_waiting_for_the_hold() {
    let mut sim = Sim::new(IO, 1e6);
    sim.ticks_to(4, ticks_for(100_000)).expect("grew to 4");
    // The one measurement at 4 workers is three times too good, and it is the reference the
    // next size is judged against.
    sim.next_window = 3.0;
    sim.ticks_to(16, ticks_for(100_000)).expect("reached max");
    // At 16 the per-worker rate looks like a third of the best: two measurements agree, and
    // the pool settles at 7. Seven workers then do clearly less than 16 did, which proves the
    // reference wrong: growth resumes long before `plateau_hold` (30 s here).
    let start = sim.history.len();
    for _ in 0..ticks_for(25_000) {
        sim.tick();
    }
    let after = &sim.history[start..];
    let below = after.iter().filter(|&&w| w < 16).count();
    assert!(
        below <= ticks_for(2_000),
        "below max for {below} ticks: {after:?}"
    );
    assert!(
        after[ticks_for(5_000)..].iter().all(|&w| w == 16),
        "{after:?}"
    );
}

#[test]
fn a_cpu_bound_handler_stops_growing_near_the_core_count() {
    let mut sim = Sim::new(CPU, f64::MAX);
    for _ in 0..ticks_for(100_000) {
        sim.tick();
    }
    let above = sim.history.iter().filter(|&&w| w > 4).count();
    assert_eq!(above, 0, "grew past twice the cores: {:?}", sim.history);
    // Settled at 3 (the throughput of 1.6 cores at the one-worker rate, plus one); probes
    // of 4 after every hold come back.
    let settled = sim.history[ticks_for(10_000)..]
        .iter()
        .filter(|&&w| w == 3)
        .count();
    assert!(
        settled * 10 >= (sim.history.len() - ticks_for(10_000)) * 9,
        "not settled at 3: {:?}",
        sim.history
    );
}

#[test]
fn a_fast_handler_whose_worker_is_never_seen_busy_still_grows_while_work_waits_to_start() {
    let mut scaler = Scaler::new(config());
    let now = Instant::now();
    let mut workers = 1;
    for i in 1..=6 {
        let d = scaler.decide(&Observation {
            now: now + TICK * i,
            backlog: 100_000,
            runnable_keys: None,
            workers,
            busy: 0,
            ready: 500,
            completed: 2_500 * workers as u64,
            failed: 0,
            elapsed: TICK,
            cpu: None,
        });
        workers = d.target;
    }
    assert_eq!(workers, 16);
}

#[test]
fn busy_cores_alone_do_not_stop_an_io_bound_pool() {
    // Someone else in the process keeps the cores busy; the workers keep their rate.
    let mut sim = Sim::new(IO, 1e6);
    let reached = (1..=ticks_for(100_000))
        .find(|_| {
            let d = sim.tick_with_cpu(Duration::from_millis(480));
            assert_ne!(d.reason, Reason::Cpu, "{:?}", sim.history);
            sim.workers == 16
        })
        .expect("reached max");
    assert!(
        reached <= ticks_for(3_000),
        "reached max after {reached} ticks: {:?}",
        sim.history
    );
}

#[test]
fn a_host_whose_cores_this_process_keeps_busy_stops_at_the_cores() {
    // All of both cores go to this process: the CPU guard stops the growth at the cores plus
    // one (the size that carries the measured throughput at the one-worker rate, plus one).
    let mut sim = Sim::new(
        Handler {
            available: 2.0,
            ..CPU
        },
        f64::MAX,
    );
    let mut reasons = Vec::new();
    for _ in 0..ticks_for(50_000) {
        reasons.push(sim.tick().reason);
    }
    assert!(
        sim.history.iter().all(|&w| w <= 4),
        "grew past twice the cores: {:?}",
        sim.history
    );
    let settled = sim.history[ticks_for(10_000)..]
        .iter()
        .filter(|&&w| w <= 3)
        .count();
    assert!(
        settled * 10 >= (sim.history.len() - ticks_for(10_000)) * 9,
        "not settled at the cores plus one: {:?}",
        sim.history
    );
    assert!(reasons.contains(&Reason::Cpu), "{reasons:?}");
}

#[test]
fn a_noisy_cpu_bound_handler_still_stops_near_the_core_count() {
    for seed in 1..=100 {
        let mut sim = Sim::new(Handler { noise: 0.3, ..CPU }, f64::MAX).seeded(seed);
        for _ in 0..ticks_for(100_000) {
            sim.tick();
        }
        let above = sim.history.iter().filter(|&&w| w > 4).count();
        assert!(
            above * 100 <= sim.history.len() * 5,
            "seed {seed}: above 4 workers in {above} of {} ticks: {:?}",
            sim.history.len(),
            sim.history
        );
        let mut sorted = sim.history.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        assert!(
            (2..=4).contains(&median),
            "seed {seed}: mostly at {median}: {:?}",
            sim.history
        );
    }
}

#[test]
fn a_failing_handler_does_not_grow() {
    let mut sim = Sim::new(
        Handler {
            failing: true,
            ..IO
        },
        50_000.0,
    );
    for _ in 0..200 {
        let d = sim.tick();
        assert_eq!(sim.workers, 1, "{d:?}");
        assert_eq!(d.reason, Reason::Failing);
    }
}

#[test]
fn a_handler_too_slow_to_measure_grows_after_a_second_saturated() {
    // Two seconds per message: a quarter-second window sees no completion at all.
    let mut sim = Sim::new(
        Handler {
            service: 2.0,
            cpu: 0.000_1,
            ..IO
        },
        10_000.0,
    );
    let ticks = sim.ticks_to(16, ticks_for(100_000)).expect("reached max");
    assert!(ticks <= ticks_for(3_000), "reached max after {ticks} ticks");
}

#[test]
fn every_burst_reaches_max_as_fast_as_the_first_and_the_pool_returns_to_min_between() {
    let mut sim = Sim::new(IO, 0.0);
    for burst in 1..=3 {
        for _ in 0..ticks_for(2_000) {
            sim.tick();
            assert_eq!(sim.workers, 1, "burst {burst}: grew while idle");
        }
        sim.backlog = 50_000.0;
        let ticks = sim.ticks_to(16, ticks_for(100_000)).expect("reached max");
        assert!(
            ticks <= ticks_for(2_000),
            "burst {burst}: reached max after {ticks} ticks"
        );
        while sim.backlog > 0.0 {
            sim.tick();
        }
        let back = sim.ticks_to(1, ticks_for(100_000)).expect("back to min");
        assert!(
            back <= ticks_for(5_000) + 1,
            "burst {burst}: back to min {back} ticks after draining"
        );
    }
}

#[test]
fn no_shrink_before_the_cooldown() {
    let mut sim = Sim::new(IO, 2_000.0);
    while sim.backlog > 0.0 {
        sim.tick();
    }
    let grown = sim.workers;
    assert!(grown > 1);
    for _ in 0..ticks_for(5_000) - 1 {
        sim.tick();
        assert_eq!(sim.workers, grown, "shrunk inside the cooldown");
    }
    sim.tick();
    sim.tick();
    assert_eq!(sim.workers, 1);
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
            ready: 0,
            completed: 100 * workers as u64,
            failed: 0,
            elapsed: TICK,
            cpu: None,
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
            ready: 0,
            completed: 0,
            failed: 0,
            elapsed: TICK,
            cpu: None,
        });
        assert!(d.target >= 6, "{d:?}");
        workers = d.target;
    }
    assert_eq!(
        workers, 6,
        "shrunk to the six busy workers after the cooldown"
    );
}
