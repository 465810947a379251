//! The targets the bench checks in every round (issue #11): each is a value taken from one
//! round's measurements (a ratio pairs two scenarios of the same round), compared with a
//! bound, printed after the round and summarised at the end.

use serde::Serialize;

use super::Measurement;
use crate::scenarios::Scenario;

/// One target over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is measured.
    pub name: String,
    /// The bound, in words (`<= 2.00`).
    pub target: String,
    /// The value in each round (`None`: the scenarios failed, or it never happened).
    pub values: Vec<Option<f64>>,
    /// Rounds that met the target.
    pub met: usize,
}

#[derive(Debug, Clone, Copy)]
enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

impl Bound {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtMost(b) => v <= b,
            Bound::AtLeast(b) => v >= b,
        }
    }

    fn describe(self) -> String {
        match self {
            Bound::AtMost(b) => format!("<= {b:.2}"),
            Bound::AtLeast(b) => format!(">= {b:.2}"),
        }
    }
}

/// One round's measurements, by scenario name.
pub struct Round<'a> {
    pub measurements: Vec<(&'a str, &'a Measurement)>,
}

impl Round<'_> {
    fn get(&self, name: &str) -> Option<&Measurement> {
        self.measurements
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| *m)
    }

    fn ratio(&self, a: &str, b: &str) -> Option<f64> {
        let (a, b) = (self.get(a)?, self.get(b)?);
        (b.msgs_per_s > 0.0).then(|| a.msgs_per_s / b.msgs_per_s)
    }
}

struct Rule {
    name: String,
    bound: Bound,
    needs: Vec<&'static str>,
    value: fn(&Round) -> Option<f64>,
}

/// The rules whose scenarios are all part of the run. `cores`: of this machine.
fn rules(scenarios: &[Scenario], cores: usize) -> Vec<Rule> {
    let settled_bound = 2.0 * cores as f64;
    let all = vec![
        Rule {
            name: "mailroom-io: seconds to max_workers".into(),
            bound: Bound::AtMost(2.0),
            needs: vec!["mailroom-io"],
            value: |r| r.get("mailroom-io")?.time_to_max_workers_s,
        },
        Rule {
            name: "mailroom-io/native-io".into(),
            bound: Bound::AtLeast(0.9),
            needs: vec!["mailroom-io", "native-io"],
            value: |r| r.ratio("mailroom-io", "native-io"),
        },
        Rule {
            name: "mailroom-io-bursts: seconds to max_workers, slowest burst".into(),
            bound: Bound::AtMost(2.0),
            needs: vec!["mailroom-io-bursts"],
            value: |r| {
                let bursts = &r.get("mailroom-io-bursts")?.bursts;
                bursts
                    .iter()
                    .map(|b| b.to_max_s)
                    .try_fold(0.0f64, |acc, t| Some(acc.max(t?)))
                    .filter(|_| !bursts.is_empty())
            },
        },
        Rule {
            name: format!("mailroom-noop-auto: workers settled at ({cores} cores)"),
            bound: Bound::AtMost(settled_bound),
            needs: vec!["mailroom-noop-auto"],
            value: |r| r.get("mailroom-noop-auto")?.workers_settled,
        },
        Rule {
            name: format!("mailroom-enrich-auto: workers settled at ({cores} cores)"),
            bound: Bound::AtMost(settled_bound),
            needs: vec!["mailroom-enrich-auto"],
            value: |r| r.get("mailroom-enrich-auto")?.workers_settled,
        },
        Rule {
            name: "mailroom-noop/wasmcloud-noop".into(),
            bound: Bound::AtLeast(5.0),
            needs: vec!["mailroom-noop", "wasmcloud-noop"],
            value: |r| r.ratio("mailroom-noop", "wasmcloud-noop"),
        },
        Rule {
            name: "mailroom-reuse/wasmcloud-pooled".into(),
            bound: Bound::AtLeast(3.0),
            needs: vec!["mailroom-reuse", "wasmcloud-pooled"],
            value: |r| r.ratio("mailroom-reuse", "wasmcloud-pooled"),
        },
    ];
    all.into_iter()
        .filter(|rule| {
            rule.needs
                .iter()
                .all(|n| scenarios.iter().any(|s| s.name == *n))
        })
        .collect()
}

/// Every check's value in one round, as lines to print after it.
pub fn round_lines(scenarios: &[Scenario], round: &Round, cores: usize) -> Vec<String> {
    rules(scenarios, cores)
        .iter()
        .map(|rule| {
            let value = (rule.value)(round);
            format!(
                "check {}: {} (target {}): {}",
                rule.name,
                value.map_or("n/a".to_owned(), |v| format!("{v:.3}")),
                rule.bound.describe(),
                if value.is_some_and(|v| rule.bound.holds(v)) {
                    "met"
                } else {
                    "MISSED"
                }
            )
        })
        .collect()
}

/// Every check over all rounds.
pub fn evaluate(scenarios: &[Scenario], rounds: &[Round], cores: usize) -> Vec<Check> {
    rules(scenarios, cores)
        .iter()
        .map(|rule| {
            let values: Vec<Option<f64>> = rounds.iter().map(|r| (rule.value)(r)).collect();
            Check {
                name: rule.name.clone(),
                target: rule.bound.describe(),
                met: values
                    .iter()
                    .filter(|v| v.is_some_and(|v| rule.bound.holds(v)))
                    .count(),
                values,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::{compare, Sizes};

    #[test]
    fn a_round_is_checked_against_each_bound() {
        let sizes = Sizes {
            messages: 1000,
            workers: 4,
            io_workers: 16,
            quick: true,
            peer_messages: 1000,
        };
        let scenarios = compare(&sizes);
        let io = Measurement {
            msgs_per_s: 900.0,
            time_to_max_workers_s: Some(1.5),
            ..Measurement::default()
        };
        let native = Measurement {
            msgs_per_s: 1000.0,
            ..Measurement::default()
        };
        let round = Round {
            measurements: vec![("mailroom-io", &io), ("native-io", &native)],
        };
        let checks = evaluate(&scenarios, &[round], 2);
        let by = |name: &str| checks.iter().find(|c| c.name == name).unwrap();
        assert_eq!(by("mailroom-io: seconds to max_workers").met, 1);
        assert_eq!(by("mailroom-io/native-io").met, 1);
        assert_eq!(by("mailroom-io/native-io").values, vec![Some(0.9)]);
        // Not measured in that round: missed, not met.
        let noop = by("mailroom-noop-auto: workers settled at (2 cores)");
        assert_eq!((noop.met, noop.values.clone()), (0, vec![None]));
        assert!(!checks.iter().any(|c| c.name.contains("wasmcloud")));
    }
}
