//! The execution checker of the order tests: the `flaky` guest's `span` command records the
//! start and end of every execution of every key in KV bucket `spans`; [`check`] counts lost,
//! duplicated, reordered and overlapping executions.

use std::collections::{BTreeMap, HashMap};

use crate::support::all_messages;

/// One execution, as the guest recorded it.
#[derive(Debug, Clone)]
pub struct Span {
    pub key: String,
    pub seq: u64,
    pub start: u128,
    pub end: u128,
    pub attempt: u32,
    pub host: String,
}

/// What the checker found.
#[derive(Debug, Default)]
#[allow(dead_code)] // `executions` is for the printed verdict.
pub struct Verdict {
    pub messages: usize,
    pub executions: usize,
    pub reruns: usize,
    pub order_violations: usize,
    pub overlaps: usize,
    pub overlaps_across_hosts: usize,
    /// The first order violation found, spelled out (for a failing test's message).
    pub first_violation: Option<String>,
}

pub async fn spans_of(js: &async_nats::jetstream::Context) -> Vec<Span> {
    all_messages(js, "KV_spans")
        .await
        .into_iter()
        .filter_map(|(_, payload, _)| {
            let text = String::from_utf8(payload.to_vec()).ok()?;
            let f: Vec<&str> = text.split(' ').collect();
            Some(Span {
                key: f.first()?.to_string(),
                seq: f.get(1)?.parse().ok()?,
                start: f.get(2)?.parse().ok()?,
                end: f.get(3)?.parse().ok()?,
                attempt: f.get(4)?.parse().ok()?,
                host: f.get(5)?.to_string(),
            })
        })
        .collect()
}

pub fn check(spans: &[Span]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Span>> = BTreeMap::new();
    let mut runs: HashMap<u64, usize> = HashMap::new();
    for s in spans {
        by_key.entry(&s.key).or_default().push(s);
        *runs.entry(s.seq).or_default() += 1;
    }
    let mut v = Verdict {
        messages: runs.len(),
        executions: spans.len(),
        reruns: spans.len() - runs.len(),
        ..Verdict::default()
    };
    for list in by_key.values_mut() {
        list.sort_by_key(|s| s.start);
        let mut highest: Option<&Span> = None;
        for pair in list.windows(2) {
            if pair[1].start < pair[0].end {
                v.overlaps += 1;
                if pair[0].host != pair[1].host {
                    v.overlaps_across_hosts += 1;
                }
            }
        }
        for s in list.iter() {
            match highest {
                Some(h) if s.seq < h.seq => {
                    v.order_violations += 1;
                    v.first_violation.get_or_insert_with(|| {
                        format!(
                            "{}: seq {} (attempt {} on {}) started at {} after seq {} (attempt {} on {}) started at {}",
                            s.key, s.seq, s.attempt, s.host, s.start, h.seq, h.attempt, h.host, h.start
                        )
                    });
                }
                Some(h) if s.seq <= h.seq => {}
                _ => highest = Some(s),
            }
        }
    }
    v
}

/// The spans, once at least `expected` of them are readable. On a cluster whose node just
/// restarted, a read can come back short (stream info from a node still catching up); every
/// message that has its output wrote its span first, so a short read is read again.
pub async fn spans_at_least(js: &async_nats::jetstream::Context, expected: usize) -> Vec<Span> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let spans = spans_of(js).await;
        if spans.len() >= expected || std::time::Instant::now() >= deadline {
            return spans;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
