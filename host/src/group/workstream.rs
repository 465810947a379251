//! The partition work stream of a partitioned handler: a work-queue stream that sources the
//! handler's stream (which Mailroom never modifies) and prefixes every message's subject with
//! its partition, computed by the server from the message's ordering key:
//! `orders.eu.7` becomes `5.orders.eu.7` in `MR_<handler>_P<N>`.
//!
//! Invariants:
//! - Every message of one key lands in one partition: the partition is a hash of tokens that
//!   are all part of the key (a subset of the key's tokens is enough: equal keys have equal
//!   subsets). A message whose subject is too short to have a key still lands somewhere (the
//!   host dead-letters it as `no-key`, as without partitions).
//! - The stream's name carries the partition count, so a different count is a different
//!   stream: keys never map to two partitions of one stream.
//!
//! [`transforms`] is pure; [`ensure`] creates the stream.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};

use crate::config::HandlerConfig;
use crate::ordering::Ordering;

/// How many fixed-length patterns a `>` filter is expanded into, at most, to reach the key's
/// tokens.
const MAX_EXPANSION: usize = 16;

/// The work stream's name for `handler` with `partitions`.
pub fn name(handler: &str, partitions: u32) -> String {
    format!("MR_{handler}_P{partitions}")
}

/// One subject transform of the work stream's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    /// The filter it applies to.
    pub source: String,
    /// Where the message goes: `<partition>.<original subject>`.
    pub destination: String,
}

/// The transforms that partition the subjects `filters` into `partitions` by `ordering`.
/// `ordering` must be `subject` or `subject-tokens` (the config refuses the others).
pub fn transforms(filters: &[String], ordering: &Ordering, partitions: u32) -> Vec<Transform> {
    let mut out = Vec::new();
    for filter in filters {
        let tokens: Vec<&str> = filter.split('.').collect();
        match ordering {
            Ordering::SubjectTokens { first, last } => {
                expand(&tokens, *first, *last, partitions, &mut out)
            }
            // The whole subject is the key: the server hashes it whole.
            _ => out.push(transform(&tokens, &Hash::Whole, partitions)),
        }
    }
    out
}

/// What the partition token is computed from.
enum Hash {
    /// The whole subject.
    Whole,
    /// These wildcard positions (1-based, counting `*` tokens of the pattern).
    Wildcards(Vec<usize>),
    /// A fixed partition (the key is the same for every subject of the pattern).
    Fixed(u32),
}

/// Expands a filter ending in `>` into fixed-length patterns long enough to reach the key's
/// tokens `first..=last` (hashing the first key token alone when the key runs to the end of
/// the subject), and picks the key's wildcard positions in each.
fn expand(
    tokens: &[&str],
    first: usize,
    last: Option<usize>,
    partitions: u32,
    out: &mut Vec<Transform>,
) {
    let open = tokens.last() == Some(&">");
    if !open {
        out.push(transform(
            tokens,
            &key_hash(tokens, first, last, partitions),
            partitions,
        ));
        return;
    }
    let fixed = &tokens[..tokens.len() - 1];
    // The last key token worth spelling out, bounded so the pattern list stays short.
    let reach = last
        .unwrap_or(first)
        .max(first)
        .min(fixed.len() + MAX_EXPANSION);
    // Subjects of every length from the shortest the filter matches up to `reach` get a
    // fixed-length pattern; longer ones share the last pattern with its `>`.
    for len in (fixed.len() + 1)..=reach.max(fixed.len() + 1) {
        let mut pattern: Vec<&str> = fixed.to_vec();
        pattern.resize(len, "*");
        if len == reach.max(fixed.len() + 1) {
            // The longest: open-ended for longer subjects too.
            let mut open_pattern = pattern.clone();
            open_pattern.push(">");
            let hash = key_hash(&pattern, first, last, partitions);
            out.push(transform(&pattern, &hash, partitions));
            out.push(transform(&open_pattern, &hash, partitions));
        } else {
            let hash = key_hash(&pattern, first, last, partitions);
            out.push(transform(&pattern, &hash, partitions));
        }
    }
}

/// The hash for subjects matching the fixed-length `pattern` with key tokens `first..=last`.
fn key_hash(pattern: &[&str], first: usize, last: Option<usize>, partitions: u32) -> Hash {
    if pattern.len() < first {
        // Too short to have a key: the host dead-letters these; any partition will do.
        return Hash::Whole;
    }
    let end = last.unwrap_or(pattern.len()).min(pattern.len());
    let mut wildcard = 0;
    let mut positions = Vec::new();
    let mut literal_key = String::new();
    for (i, token) in pattern.iter().enumerate() {
        let position = i + 1;
        if *token == "*" {
            wildcard += 1;
        }
        if (first..=end).contains(&position) {
            if *token == "*" {
                positions.push(wildcard);
            } else {
                literal_key.push_str(token);
                literal_key.push('.');
            }
        }
    }
    if positions.is_empty() {
        Hash::Fixed(fnv1a(literal_key.as_bytes()) % partitions)
    } else {
        Hash::Wildcards(positions)
    }
}

fn transform(pattern: &[&str], hash: &Hash, partitions: u32) -> Transform {
    let mut destination = match hash {
        Hash::Whole => format!("{{{{partition({partitions})}}}}"),
        Hash::Wildcards(positions) => {
            let list: Vec<String> = positions.iter().map(|p| p.to_string()).collect();
            format!("{{{{partition({partitions},{})}}}}", list.join(","))
        }
        Hash::Fixed(p) => p.to_string(),
    };
    let mut wildcard = 0;
    for token in pattern {
        destination.push('.');
        if *token == "*" {
            wildcard += 1;
            destination.push_str(&format!("{{{{wildcard({wildcard})}}}}"));
        } else {
            destination.push_str(token);
        }
    }
    Transform {
        source: pattern.join("."),
        destination,
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The metadata key of a work stream whose sourcing was stopped by a change of the partition
/// count: the last origin sequence it sources (later ones belong to the next generation).
pub const CUTOVER: &str = "mailroom.cutover";

/// Creates the work stream of `handler` (partitioned into `partitions`) if it does not exist,
/// sourcing the handler's stream from `start` (its first message when `None`); an existing one
/// is checked to source the handler's stream with the same transforms. Returns its name.
pub async fn ensure(
    js: &jetstream::Context,
    handler: &HandlerConfig,
    partitions: u32,
    start: Option<u64>,
) -> anyhow::Result<String> {
    let mut origin = js.get_stream(&handler.stream).await.with_context(|| {
        format!(
            "handler {}: stream {} is not available; declare it with [[stream]] in the config \
             or create it",
            handler.name, handler.stream
        )
    })?;
    let origin = origin.info().await?.config.clone();
    let filters = if handler.filter_subjects.is_empty() {
        origin.subjects.clone()
    } else {
        handler.filter_subjects.clone()
    };
    let wanted = transforms(&filters, &handler.ordering, partitions);
    let name = name(&handler.name, partitions);
    let source = stream::Source {
        name: handler.stream.clone(),
        subject_transforms: wanted
            .iter()
            .map(|t| stream::SubjectTransform {
                source: t.source.clone(),
                destination: t.destination.clone(),
            })
            .collect(),
        start_sequence: start,
        ..Default::default()
    };
    if let Ok(mut existing) = js.get_stream(&name).await {
        let config = existing.info().await?.config.clone();
        if config.metadata.contains_key(CUTOVER) {
            anyhow::bail!(
                "handler {}: another host started this handler with a different partition \
                 count, so {name} no longer receives messages (the hosts with the new count \
                 finish what is left in it); set partitions in this host's config to the count \
                 the others use (mailroom status shows it)",
                handler.name
            );
        }
        let same = config.sources.as_ref().is_some_and(|sources| {
            sources.len() == 1 && sources[0].subject_transforms == source.subject_transforms
        });
        if !same {
            anyhow::bail!(
                "handler {}: the partition work stream {name} exists but partitions its \
                 messages differently (another ordering or other subjects); the keys of its \
                 unprocessed messages would land in other partitions. Run the old \
                 configuration until {name} is empty, then delete it (nats stream rm {name}) \
                 and start with the new one",
                handler.name
            );
        }
        return Ok(name);
    }
    js.create_stream(stream::Config {
        name: name.clone(),
        description: Some(format!(
            "Mailroom: {} partitions of stream {} for handler {}",
            partitions, handler.stream, handler.name
        )),
        retention: stream::RetentionPolicy::WorkQueue,
        storage: origin.storage,
        num_replicas: origin.num_replicas,
        duplicate_window: if origin.duplicate_window.is_zero() {
            Duration::from_secs(120)
        } else {
            origin.duplicate_window
        },
        sources: Some(vec![source]),
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating the partition work stream {name}"))?;
    tracing::info!(handler = %handler.name, stream = %name, partitions, "created the partition work stream");
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(filters: &[&str], ordering: &str, n: u32) -> Vec<(String, String)> {
        let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        transforms(&filters, &Ordering::parse(ordering).unwrap(), n)
            .into_iter()
            .map(|t| (t.source, t.destination))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn by_subject_the_server_hashes_the_whole_subject() {
        assert_eq!(
            t(&["orders.>"], "subject", 16),
            pairs(&[("orders.>", "{{partition(16)}}.orders.>")])
        );
        assert_eq!(
            t(&["orders.*.created"], "subject", 4),
            pairs(&[(
                "orders.*.created",
                "{{partition(4)}}.orders.{{wildcard(1)}}.created"
            )])
        );
    }

    #[test]
    fn by_tokens_the_key_tokens_are_hashed_in_every_subject_length() {
        assert_eq!(
            t(&["orders.>"], "subject-tokens:2..2", 8),
            pairs(&[
                ("orders.*", "{{partition(8,1)}}.orders.{{wildcard(1)}}"),
                ("orders.*.>", "{{partition(8,1)}}.orders.{{wildcard(1)}}.>"),
            ])
        );
        assert_eq!(
            t(&["orders.>"], "subject-tokens:2..3", 8),
            pairs(&[
                ("orders.*", "{{partition(8,1)}}.orders.{{wildcard(1)}}"),
                (
                    "orders.*.*",
                    "{{partition(8,1,2)}}.orders.{{wildcard(1)}}.{{wildcard(2)}}"
                ),
                (
                    "orders.*.*.>",
                    "{{partition(8,1,2)}}.orders.{{wildcard(1)}}.{{wildcard(2)}}.>"
                ),
            ])
        );
        // A key running to the end is hashed by its first token (equal keys, equal hashes).
        assert_eq!(
            t(&["orders.>"], "subject-tokens:2..", 8),
            pairs(&[
                ("orders.*", "{{partition(8,1)}}.orders.{{wildcard(1)}}"),
                ("orders.*.>", "{{partition(8,1)}}.orders.{{wildcard(1)}}.>"),
            ])
        );
    }

    #[test]
    fn literal_key_tokens_and_short_subjects() {
        // Token 1 is the key but literal in the filter: one partition for all of them.
        let fixed = t(&["orders.*"], "subject-tokens:1..1", 8);
        assert_eq!(fixed.len(), 1);
        let p = fnv1a(b"orders.") % 8;
        assert_eq!(fixed[0].1, format!("{p}.orders.{{{{wildcard(1)}}}}"));
        // A key at token 3 under `a.>`: 2-token subjects have none (whole-subject hash; the
        // host dead-letters them), longer ones hash token 3 (wildcard 2).
        assert_eq!(
            t(&["a.>"], "subject-tokens:3..3", 4),
            pairs(&[
                ("a.*", "{{partition(4)}}.a.{{wildcard(1)}}"),
                (
                    "a.*.*",
                    "{{partition(4,2)}}.a.{{wildcard(1)}}.{{wildcard(2)}}"
                ),
                (
                    "a.*.*.>",
                    "{{partition(4,2)}}.a.{{wildcard(1)}}.{{wildcard(2)}}.>"
                ),
            ])
        );
    }

    #[test]
    fn names_carry_the_partition_count() {
        assert_eq!(name("counter", 16), "MR_counter_P16");
        assert_ne!(name("counter", 16), name("counter", 32));
    }
}
