//! A lock-free duration histogram, cheap enough for the message path.
//!
//! Each recording is three relaxed atomic adds and no lock: one into log-linear buckets (8 per
//! power of two, about 9% resolution, 1µs to about 12 days) that give the quantiles of
//! `/status` and the bench, one into fixed Prometheus buckets ([`BOUNDS_MICROS`]) exported as
//! `_bucket{le=..}`, and one into the sum. The exported buckets are counted exactly at their
//! bounds (a value equal to a bound is in that bound's bucket), so `le` means what Prometheus
//! says it means and histograms of several hosts can be summed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SUB_BUCKETS: u32 = 8;
const FINE_BUCKETS: usize = 40 * SUB_BUCKETS as usize;

/// Upper bounds of the exported buckets, in microseconds: 100µs to 5 minutes, roughly 1-2.5-5
/// per decade. A `+Inf` bucket follows.
pub const BOUNDS_MICROS: [u64; 19] = [
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
];

/// See the module documentation.
pub struct Histogram {
    fine: Box<[AtomicU64]>,
    exported: [AtomicU64; BOUNDS_MICROS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            fine: (0..FINE_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            exported: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish()
    }
}

/// The exported view of a [`Histogram`]: what a Prometheus histogram series needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// Sum of the recorded durations, in seconds.
    pub sum_seconds: f64,
    /// How many durations were recorded.
    pub count: u64,
    /// `(upper bound in seconds, count in this bucket alone)`, the last bound `+Inf`. Not
    /// cumulative: the encoder accumulates.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    fn fine_index(micros: u64) -> usize {
        let v = micros.max(1);
        let octave = 63 - v.leading_zeros();
        // The 3 bits below the leading one pick the sub-bucket.
        let sub = if octave >= 3 {
            (v >> (octave - 3)) & 7
        } else {
            (v << (3 - octave)) & 7
        };
        ((octave * SUB_BUCKETS) as usize + sub as usize).min(FINE_BUCKETS - 1)
    }

    /// The upper bound of fine bucket `i`, in microseconds.
    fn fine_upper(i: usize) -> u64 {
        let octave = (i / SUB_BUCKETS as usize) as u32;
        let sub = (i % SUB_BUCKETS as usize) as u64;
        let base = 1u64 << octave;
        base + (base * (sub + 1)) / SUB_BUCKETS as u64
    }

    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.fine[Self::fine_index(micros)].fetch_add(1, Ordering::Relaxed);
        // The first bound at or above the value: `le` is inclusive.
        let bucket = BOUNDS_MICROS.partition_point(|&bound| bound < micros);
        self.exported[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.exported
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// The `q` quantile (0..=1), as the upper bound of its fine bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .fine
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(Self::fine_upper(i)));
            }
        }
        None
    }

    /// The exported buckets, sum and count.
    pub fn exported(&self) -> Exported {
        let buckets: Vec<(f64, u64)> = BOUNDS_MICROS
            .iter()
            .map(|&b| b as f64 / 1e6)
            .chain([f64::INFINITY])
            .zip(self.exported.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        Exported {
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: buckets.iter().map(|(_, c)| c).sum(),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5).unwrap().as_micros() as f64;
        let p99 = h.quantile(0.99).unwrap().as_micros() as f64;
        assert!((500_000.0..=500_000.0 * 1.13).contains(&p50), "{p50}");
        assert!((990_000.0..=990_000.0 * 1.13).contains(&p99), "{p99}");
        h.record(Duration::ZERO);
        h.record(Duration::MAX);
        assert_eq!(h.count(), 1002);
    }

    #[test]
    fn fine_bounds_cover_their_values() {
        for v in [1u64, 2, 3, 7, 8, 9, 15, 16, 17, 100, 1000, 123_456, 1 << 30] {
            let i = Histogram::fine_index(v);
            assert!(Histogram::fine_upper(i) >= v, "{v} above bucket {i}");
            if i > 0 {
                assert!(Histogram::fine_upper(i - 1) <= v, "{v} belongs lower");
            }
        }
    }

    #[test]
    fn exported_buckets_are_exact_at_their_bounds() {
        let h = Histogram::default();
        // On a bound, just above it, far beyond the last one.
        h.record(Duration::from_millis(1));
        h.record(Duration::from_micros(1_001));
        h.record(Duration::from_secs(3600));
        h.record(Duration::ZERO);
        let e = h.exported();
        assert_eq!(e.count, 4);
        assert!(
            (e.sum_seconds - 3600.002001).abs() < 1e-9,
            "{}",
            e.sum_seconds
        );
        let at = |le: f64| e.buckets.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!(at(0.0001), 1, "zero is in the first bucket");
        assert_eq!(at(0.001), 1, "1ms is in le=0.001");
        assert_eq!(at(0.0025), 1, "1.001ms is in the next bucket");
        assert_eq!(at(f64::INFINITY), 1);
        assert_eq!(e.buckets.len(), BOUNDS_MICROS.len() + 1);
        assert_eq!(e.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
    }
}
