//! The tables derived from the medians: the ordering suite's rows and each suite's closing
//! ratio lines.

use super::{OrderingRow, RatioLine, ScenarioReport};
use crate::scenarios::{Scenario, Suite};

/// The ordering table, from the ordering suite's scenarios.
pub fn ordering_rows(scenarios: &[Scenario], reports: &[ScenarioReport]) -> Vec<OrderingRow> {
    let mut rows: Vec<OrderingRow> = Vec::new();
    for (s, r) in scenarios.iter().zip(reports) {
        let Some(cell) = s.cell else { continue };
        let rate = r.median.as_ref().map(|m| m.msgs_per_s);
        let i = match rows
            .iter()
            .position(|row| row.keys == cell.keys && row.handler == cell.handler)
        {
            Some(i) => i,
            None => {
                rows.push(OrderingRow {
                    keys: cell.keys,
                    handler: cell.handler.to_owned(),
                    messages: s.messages,
                    ordered_msgs_per_s: None,
                    unordered_msgs_per_s: None,
                    ratio: None,
                });
                rows.len() - 1
            }
        };
        if cell.ordered {
            rows[i].ordered_msgs_per_s = rate;
        } else {
            rows[i].unordered_msgs_per_s = rate;
        }
    }
    for row in &mut rows {
        row.ratio = match (row.ordered_msgs_per_s, row.unordered_msgs_per_s) {
            (Some(o), Some(u)) if u > 0.0 => Some(o / u),
            _ => None,
        };
    }
    rows
}

/// The closing ratio lines of a suite.
pub fn ratio_lines(suite: Suite, reports: &[ScenarioReport]) -> Vec<RatioLine> {
    let pairs: &[(&str, &str)] = match suite {
        Suite::Compare => &[
            ("mailroom-noop", "native"),
            ("mailroom-noop-ordered", "mailroom-noop"),
            ("mailroom-partitioned", "mailroom-noop-ordered"),
            ("mailroom-enrich", "native-enrich"),
            ("mailroom-io", "ideal"),
            ("mailroom-reuse", "native"),
            ("mailroom-io", "native-io"),
        ],
        Suite::Peers => &[
            ("mailroom-noop", "wasmcloud-noop"),
            ("mailroom-reuse", "wasmcloud-pooled"),
        ],
        Suite::Partitions => &[
            ("mailroom-io-partitioned-h2", "mailroom-io-partitioned-h1"),
            ("mailroom-io-partitioned-h3", "mailroom-io-partitioned-h1"),
        ],
        Suite::Ordering => &[],
    };
    pairs
        .iter()
        .copied()
        .map(|(name, base)| {
            let find = |n: &str| reports.iter().find(|r| r.name == n);
            let value = if base == "native-io" {
                // Not the scenario's own baseline: computed from both medians.
                match (
                    find(name).and_then(|r| r.median.as_ref()),
                    find(base).and_then(|r| r.median.as_ref()),
                ) {
                    (Some(a), Some(b)) if b.msgs_per_s > 0.0 => Some(a.msgs_per_s / b.msgs_per_s),
                    _ => None,
                }
            } else {
                find(name).and_then(|r| r.ratio)
            };
            RatioLine {
                name: format!("{name}/{base}"),
                value,
            }
        })
        .collect()
}
