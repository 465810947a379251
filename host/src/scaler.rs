//! The autoscaler: how many workers a handler should have, decided from what it observes.
//!
//! [`Scaler::decide`] is a pure function of its inputs and its own memory (no clock, no I/O),
//! so it is tested with simulated time below. The consumer calls it on a ticker and applies
//! the target to the [`Pool`](crate::pool::Pool).
//!
//! Policy:
//! - **Up, quickly**, while every worker is busy and work waits: double (quadruple when the
//!   backlog is 64 times the workers or more; at least +1), never above `max`, and in ordered
//!   mode never above the number of keys that could run. Each size is measured once before
//!   the next growth (a tenth of a second at least, see [`MIN_SAMPLE`]).
//! - **Judge growth by the per-worker completion rate**, not by one window's throughput: a
//!   saturated pool of `w` workers completing `x` messages a second gives each worker `x / w`
//!   a second, the inverse of its service time (Little's law). An I/O-bound handler keeps that
//!   rate as it grows; a CPU-bound one loses it once the workers outnumber the cores, because
//!   each message now waits for a core. Growth has stopped paying when the rate at the current
//!   size is below half the best rate measured at any size, in three measurements in a row (the
//!   gradient idea of TCP Vegas and Netflix's concurrency limits, with a noise margin: one odd
//!   window never decides anything).
//! - **The host's own CPU**: a measurement in which this process kept 90% of the cores busy
//!   while the per-worker rate was below 80% of the best counts as saturation too (busy cores
//!   alone may be another handler's), and a growth step is cut to the size the CPU would carry
//!   (from the CPU time used per worker; but at least a doubling while the workers keep the
//!   best rate, one worker once they lost some), so a CPU-bound handler approaches the core
//!   count instead of overshooting it fourfold.
//! - **Settle, then check the verdict**: on saturation the pool goes to the size that carries
//!   the measured throughput at the best per-worker rate, plus one (at most the current size),
//!   and holds it for `plateau_hold`. The hold ends early when measurements at the settled
//!   size show the verdict was wrong: a pool settled at half the size it came from or less
//!   kept under 70% of the throughput the larger one had, over eight measurements (so the
//!   handler scales with its workers, and the best rate it was judged against was an outlier,
//!   which is dropped), or its workers run at 80% of the best rate again with CPU to spare
//!   (three measurements). After the hold, growth probes again. The first size of a busy
//!   period, the reference of the whole ramp, is measured twice.
//! - **Not into a failing dependency**: while half or more of the attempts fail, do not grow.
//! - **Down after a cooldown** once the backlog is gone (or more workers than runnable keys):
//!   straight to the largest of `min`, the workers still busy, and the work that could run
//!   now. What was learnt about sizes is forgotten then: the next backlog is measured afresh.
//!
//! A handler slower than the measurement needs (fewer than [`MIN_SAMPLE_COMPLETIONS`] messages
//! per second at its size) cannot be judged this way; after [`SPARSE_AFTER`] saturated at one
//! size it grows without a measurement, bounded by the CPU guard.

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
    /// How long to hold a size at which growing stopped helping before probing again.
    pub plateau_hold: Duration,
    /// Cores this process may use (`std::thread::available_parallelism`).
    pub cores: usize,
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
    /// Messages (unordered) or keys (ordered) a worker could start now and none has yet.
    pub ready: usize,
    /// Messages settled successfully since the last tick.
    pub completed: u64,
    /// Failed attempts since the last tick.
    pub failed: u64,
    /// Time since the last tick.
    pub elapsed: Duration,
    /// CPU time (user + system, all threads) this process used since the last tick; `None`
    /// where the operating system does not say.
    pub cpu: Option<Duration>,
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
    /// Measuring the current size before growing again.
    Measuring,
    /// Growth stopped raising the per-worker rate: settled, not growing for a while.
    Plateau,
    /// This process keeps the cores busy: more workers cannot help.
    Cpu,
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
            Reason::Cpu => "cpu",
            Reason::Failing => "failing",
            Reason::Idle => "idle",
        }
    }
}

/// The shortest measurement: one tick of the consumer's ticker. Windows are closed at ticks,
/// so a measurement is one or more whole ticks.
pub const MIN_SAMPLE: Duration = Duration::from_millis(100);
/// A measurement needs this many completions, or its rate is mostly rounding.
pub const MIN_SAMPLE_COMPLETIONS: u64 = 8;
/// Saturated this long at one size without a measurement: grow anyway (slow handlers).
pub const SPARSE_AFTER: Duration = Duration::from_secs(1);
/// Per-worker rate below this share of the best: growth stopped paying.
const SATURATED_GRADIENT: f64 = 0.5;
/// Measurements in a row that must agree before the pool settles.
const STRIKES: u32 = 3;
/// Share of the cores this process may keep busy before more workers count as useless.
const CPU_BUSY: f64 = 0.9;
/// A settled pool whose per-worker rate is back at this share of the best may grow again.
const RECOVERED_GRADIENT: f64 = 0.8;
/// A settled pool must keep this share of the throughput it settled from...
const KEPT_THROUGHPUT: f64 = 0.7;
/// ...when it is at most this share of the size it settled from (closer sizes differ by less
/// than the noise of a measurement).
const INFORMATIVE_SHRINK: f64 = 0.5;
/// Measurements kept per size (their median is the size's rate).
const SAMPLES_PER_SIZE: usize = 8;
/// Sizes remembered within one busy period.
const SIZES_KEPT: usize = 8;

/// Completions accumulated over consecutive clean ticks at one size.
#[derive(Debug, Clone)]
struct Window {
    completed: u64,
    elapsed: Duration,
    cpu: Option<Duration>,
}

/// One finished measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Messages per second.
    rate: f64,
    /// Share of the cores this process kept busy.
    cpu_share: Option<f64>,
}

/// What was measured at one pool size.
#[derive(Debug, Clone)]
struct SizeRecord {
    workers: usize,
    /// Total rates, oldest first.
    rates: Vec<f64>,
}

impl SizeRecord {
    fn median_rate(&self) -> f64 {
        median(&self.rates)
    }

    fn per_worker(&self) -> f64 {
        self.median_rate() / self.workers.max(1) as f64
    }
}

/// A size the pool settled at, and what it must keep.
#[derive(Debug, Clone)]
struct Plateau {
    size: usize,
    until: Instant,
    /// The size it settled from, and its throughput.
    from: usize,
    from_rate: f64,
    /// Rates measured at `size` since.
    rates: Vec<f64>,
}

/// The controller's memory between ticks.
#[derive(Debug, Clone)]
pub struct Scaler {
    config: ScalerConfig,
    quiet_since: Option<Instant>,
    /// The previous tick ended saturated with this many workers: the window since is clean if
    /// the size still holds.
    clean_at: Option<usize>,
    window: Option<Window>,
    /// When the pool became saturated at its current size.
    saturated_since: Option<(usize, Instant)>,
    sizes: Vec<SizeRecord>,
    strikes: u32,
    plateau: Option<Plateau>,
    /// The CPU share of the latest measurement.
    cpu_share: Option<f64>,
}

impl Scaler {
    /// A controller with `config`.
    pub fn new(config: ScalerConfig) -> Scaler {
        Scaler {
            config,
            quiet_since: None,
            clean_at: None,
            window: None,
            saturated_since: None,
            sizes: Vec::new(),
            strikes: 0,
            plateau: None,
            cpu_share: None,
        }
    }

    /// The target for the situation in `o`.
    pub fn decide(&mut self, o: &Observation) -> Decision {
        let (min, max) = (self.config.min, self.config.max);
        let keep = |reason| Decision {
            target: o.workers.clamp(min, max),
            reason,
        };

        // Work that more workers could take on.
        let useful = match o.runnable_keys {
            Some(keys) => keys,
            None => o
                .busy
                .saturating_add(usize::try_from(o.backlog).unwrap_or(usize::MAX)),
        };
        // Work a worker could start now but none has means every worker is busy, even when
        // the tick happened to see one between two messages (a fast handler's worker is, for a
        // good part of its time, and on a shared runtime thread the tick only runs then).
        let saturated = (o.busy >= o.workers || o.ready > 0) && o.backlog > 0;

        // Shrink when idle (or more workers than work) past the cooldown.
        let quiet = o.backlog == 0 || useful < o.workers;
        if quiet && !saturated {
            self.forget();
            let since = *self.quiet_since.get_or_insert(o.now);
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
            // Failures say nothing about what more workers could do: measure afresh after.
            self.clean_at = None;
            self.window = None;
            self.strikes = 0;
            return keep(Reason::Failing);
        }

        let sample = self.measure(o, saturated);
        if let Some(sample) = sample {
            self.cpu_share = sample.cpu_share;
            self.record(o.workers, sample.rate);
        }
        // The cores are busy *and* the workers lost per-worker rate: CPU-bound. Busy cores
        // alone may be someone else's (another handler, or the bench publishing); an I/O-bound
        // pool still gains from more workers then.
        let cpu_busy = self.cpu_share.is_some_and(|share| share >= CPU_BUSY)
            && self.gradient(o.workers) < RECOVERED_GRADIENT;

        if let Some(sample) = sample {
            if self.plateau.is_some() {
                self.check_plateau(o.workers, sample.rate, cpu_busy);
            } else {
                let gradient = self.gradient(o.workers);
                if gradient < SATURATED_GRADIENT || cpu_busy {
                    self.strikes += 1;
                } else {
                    self.strikes = 0;
                }
                if self.strikes >= STRIKES {
                    return self.settle(o);
                }
            }
        }
        if let Some(plateau) = &self.plateau {
            if o.now < plateau.until {
                return keep(Reason::Plateau);
            }
            self.plateau = None;
        }

        if !saturated || o.workers >= self.config.max || o.workers >= useful {
            return keep(Reason::Steady);
        }
        if cpu_busy {
            return keep(Reason::Cpu);
        }
        // The first size of a busy period is the reference of the whole ramp: measured twice.
        let needed = if self.sizes.len() <= 1 { 2 } else { 1 };
        let measured = self
            .size(o.workers)
            .is_some_and(|record| record.rates.len() >= needed);
        let sparse = self
            .saturated_since
            .is_some_and(|(_, since)| o.now.duration_since(since) >= SPARSE_AFTER);
        if self.strikes > 0 || !(measured || sparse) {
            return keep(Reason::Measuring);
        }

        // A deep backlog (many times what the workers hold) quadruples the pool.
        let factor = if o.backlog >= 64 * o.workers as u64 {
            4
        } else {
            2
        };
        let mut target = (o.workers * factor)
            .max(o.workers + 1)
            .min(self.config.max)
            .min(useful.max(o.workers + 1));
        if let Some(share) = self.cpu_share.filter(|share| *share > 0.0) {
            // The CPU per worker measured now, extrapolated: no step past what the cores
            // would carry. The step is still a doubling while the workers keep the best
            // per-worker rate (the CPU is then someone else's), and one worker once they lost
            // some of it.
            let carried = (o.workers as f64 * CPU_BUSY / share).floor() as usize;
            let least = if self.gradient(o.workers) >= RECOVERED_GRADIENT {
                o.workers * 2
            } else {
                o.workers + 1
            };
            target = target.min(carried.max(least));
        }
        self.grown(o, target);
        Decision {
            target,
            reason: Reason::Backlog,
        }
    }

    /// Forgets what was learnt in a busy period.
    fn forget(&mut self) {
        self.clean_at = None;
        self.window = None;
        self.saturated_since = None;
        self.sizes.clear();
        self.strikes = 0;
        self.plateau = None;
        self.cpu_share = None;
    }

    /// Adds the window since the last tick to the measurement at the current size, if it was
    /// saturated throughout at that size; returns the measurement once it has enough.
    fn measure(&mut self, o: &Observation, saturated: bool) -> Option<Sample> {
        if saturated {
            if self.saturated_since.is_none_or(|(w, _)| w != o.workers) {
                self.saturated_since = Some((o.workers, o.now));
            }
        } else {
            self.saturated_since = None;
        }
        let clean = saturated && self.clean_at == Some(o.workers);
        self.clean_at = saturated.then_some(o.workers);
        if !clean {
            self.window = None;
            return None;
        }
        // A clean window continues the measurement of its size (a size change is never clean).
        let window = self.window.get_or_insert(Window {
            completed: 0,
            elapsed: Duration::ZERO,
            cpu: Some(Duration::ZERO),
        });
        window.completed += o.completed;
        window.elapsed += o.elapsed;
        window.cpu = match (window.cpu, o.cpu) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        if window.completed < MIN_SAMPLE_COMPLETIONS || window.elapsed < MIN_SAMPLE {
            return None;
        }
        let secs = window.elapsed.as_secs_f64().max(1e-3);
        let sample = Sample {
            rate: window.completed as f64 / secs,
            cpu_share: window
                .cpu
                .map(|cpu| cpu.as_secs_f64() / secs / self.config.cores.max(1) as f64),
        };
        self.window = None;
        Some(sample)
    }

    fn size(&self, workers: usize) -> Option<&SizeRecord> {
        self.sizes.iter().find(|s| s.workers == workers)
    }

    fn record(&mut self, workers: usize, rate: f64) {
        match self.sizes.iter_mut().position(|s| s.workers == workers) {
            Some(i) => {
                let mut record = self.sizes.remove(i);
                if record.rates.len() == SAMPLES_PER_SIZE {
                    record.rates.remove(0);
                }
                record.rates.push(rate);
                self.sizes.push(record);
            }
            None => {
                if self.sizes.len() == SIZES_KEPT {
                    self.sizes.remove(0);
                }
                self.sizes.push(SizeRecord {
                    workers,
                    rates: vec![rate],
                });
            }
        }
    }

    /// The best per-worker rate measured at any size.
    fn best_per_worker(&self) -> Option<f64> {
        self.sizes
            .iter()
            .map(SizeRecord::per_worker)
            .max_by(f64::total_cmp)
    }

    /// The per-worker rate at `workers` as a share of the best (1 when unknown).
    fn gradient(&self, workers: usize) -> f64 {
        match (self.size(workers), self.best_per_worker()) {
            (Some(record), Some(best)) if best > 0.0 => record.per_worker() / best,
            _ => 1.0,
        }
    }

    /// Growth stopped paying at `o.workers`: go to the size that carries the throughput
    /// measured there at the best per-worker rate, plus one, and hold it.
    fn settle(&mut self, o: &Observation) -> Decision {
        let rate = self.size(o.workers).map_or(0.0, SizeRecord::median_rate);
        let best = self.best_per_worker().unwrap_or(0.0);
        let effective = if best > 0.0 { rate / best } else { 0.0 };
        let target = (effective.ceil() as usize + 1)
            .min(o.workers)
            .clamp(self.config.min, self.config.max);
        self.strikes = 0;
        self.window = None;
        self.clean_at = Some(target);
        self.plateau = Some(Plateau {
            size: target,
            until: o.now + self.config.plateau_hold,
            from: o.workers,
            from_rate: rate,
            rates: Vec::new(),
        });
        Decision {
            target,
            reason: Reason::Plateau,
        }
    }

    /// A measurement while settled: ends the hold when it shows the verdict was wrong.
    fn check_plateau(&mut self, workers: usize, rate: f64, cpu_busy: bool) {
        let Some(plateau) = &mut self.plateau else {
            return;
        };
        if workers != plateau.size {
            return;
        }
        plateau.rates.push(rate);
        let size = plateau.size;
        let n = plateau.rates.len();
        // Only a clearly smaller pool tells the two apart (an I/O-bound handler loses
        // throughput in proportion, a CPU-bound one keeps it), and only over eight
        // measurements: single windows differ by more than the test needs.
        let informative = size as f64 <= INFORMATIVE_SHRINK * plateau.from as f64;
        let lost = informative
            && n >= SAMPLES_PER_SIZE
            && median(&plateau.rates[n - SAMPLES_PER_SIZE..]) < KEPT_THROUGHPUT * plateau.from_rate;
        if lost {
            // The smaller pool does clearly less than the larger one did: the best
            // per-worker rate it was judged against was too good to be true. Only that
            // measurement is dropped; the others still stand.
            if let Some(best) = self
                .sizes
                .iter()
                .filter(|s| s.workers < size)
                .max_by(|a, b| a.per_worker().total_cmp(&b.per_worker()))
                .map(|s| s.workers)
            {
                self.sizes.retain(|s| s.workers != best);
            }
            self.plateau = None;
        } else if n >= STRIKES as usize && self.gradient(size) >= RECOVERED_GRADIENT && !cpu_busy {
            self.plateau = None;
        }
    }

    fn grown(&mut self, o: &Observation, target: usize) {
        self.window = None;
        // The next window runs at the new size from its start (workers are spawned on this
        // tick), so it is a clean measurement of that size.
        self.clean_at = Some(target);
        self.saturated_since = Some((target, o.now));
    }
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

#[cfg(test)]
mod tests;
