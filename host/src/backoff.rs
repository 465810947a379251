//! When a failed message is tried again: the retry policy and its backoff.
//!
//! A pure function of the attempt number (and a jitter draw), so it is unit-tested without
//! clocks.

use std::time::Duration;

/// How long to wait before each retry.
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// Fixed delays: the n-th retry waits `delays[n-1]`; the last one repeats.
    List(Vec<Duration>),
    /// `initial * multiplier^(n-1)`, capped at `max`.
    Exponential {
        /// Delay before the first retry.
        initial: Duration,
        /// Growth per retry.
        multiplier: f64,
        /// The cap.
        max: Duration,
    },
}

/// What happens when an ordered message fails its last allowed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExhausted {
    /// Dead-letter and terminate it; its key moves on (the default).
    DeadLetter,
    /// Keep retrying it, at the backoff delay for its attempt (capped by the policy); its key
    /// stays blocked (reported in logs, metrics and `/status`) while other keys continue.
    Block,
}

/// How often and when a failed message is retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included. The failure of the last one dead-letters the
    /// message.
    pub max_attempts: u32,
    /// The delay schedule.
    pub backoff: Backoff,
    /// Random spread applied to each delay: `0.2` means ±20%.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::Exponential {
                initial: Duration::from_secs(1),
                multiplier: 2.0,
                max: Duration::from_secs(60),
            },
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Whether a failure of `attempt` (1-based) is the last one allowed.
    pub fn is_last(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// The delay before the retry that follows failed `attempt` (1-based), without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let n = attempt.max(1);
        match &self.backoff {
            Backoff::List(delays) => {
                let index = (n as usize - 1).min(delays.len().saturating_sub(1));
                delays.get(index).copied().unwrap_or_default()
            }
            Backoff::Exponential {
                initial,
                multiplier,
                max,
            } => {
                let factor = multiplier.powi(n.saturating_sub(1).min(64) as i32);
                let secs = initial.as_secs_f64() * factor;
                if !secs.is_finite() || secs >= max.as_secs_f64() {
                    *max
                } else {
                    Duration::from_secs_f64(secs)
                }
            }
        }
    }

    /// The delay before the retry that follows failed `attempt`, with jitter drawn from
    /// `unit`, a number in `[0, 1)`.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt);
        let spread = (unit.clamp(0.0, 1.0) * 2.0 - 1.0) * self.jitter;
        base.mul_f64((1.0 + spread).max(0.0))
    }

    /// The delay before the retry that follows failed `attempt`, with random jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp() -> RetryPolicy {
        RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn exponential_doubles_up_to_the_cap() {
        let p = exp();
        let secs: Vec<u64> = (1..=9).map(|a| p.base_delay(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn list_repeats_its_last_delay() {
        let p = RetryPolicy {
            backoff: Backoff::List(vec![Duration::from_millis(100), Duration::from_secs(5)]),
            ..exp()
        };
        assert_eq!(p.base_delay(1), Duration::from_millis(100));
        assert_eq!(p.base_delay(2), Duration::from_secs(5));
        assert_eq!(p.base_delay(7), Duration::from_secs(5));
    }

    #[test]
    fn jitter_spreads_around_the_base() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..exp()
        };
        assert_eq!(p.delay_with(2, 0.0), Duration::from_secs(1));
        assert_eq!(p.delay_with(2, 0.5), Duration::from_secs(2));
        assert_eq!(p.delay_with(2, 1.0), Duration::from_secs(3));
        for _ in 0..100 {
            let d = p.delay(2);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(3),
                "{d:?}"
            );
        }
    }

    #[test]
    fn last_attempt() {
        let p = exp();
        assert!(!p.is_last(4));
        assert!(p.is_last(5));
        assert!(p.is_last(6));
    }
}
