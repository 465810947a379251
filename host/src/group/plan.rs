//! Which live host should own which partition: bounded-load rendezvous hashing.
//!
//! Every host computes the plan from the same inputs (the partition count and the sorted ids
//! of the live, non-draining hosts), so they agree without talking. The plan only says where
//! partitions should go; leases decide who owns one (a host acquires a partition only when
//! its lease is free and releases one only when the plan gives it to another live host), so
//! two hosts with different views at a moment only delay a move, never double an owner.
//!
//! Properties (property-tested below):
//! - deterministic: the same hosts in any order give the same plan;
//! - balanced: every host gets `floor(partitions / hosts)` or one more;
//! - stable: when a host joins or leaves, few partitions move (about what balance requires).

/// The host index (into the sorted host list) that should own each partition.
pub fn assign(partitions: u32, hosts: &[&str]) -> Vec<usize> {
    if hosts.is_empty() {
        return Vec::new();
    }
    let mut sorted: Vec<(usize, &str)> = hosts.iter().copied().enumerate().collect();
    sorted.sort_by(|a, b| a.1.cmp(b.1));
    // Every host gets `floor` partitions, and `extra` of them one more.
    let floor = partitions as usize / hosts.len();
    let mut extra = partitions as usize % hosts.len();
    let mut load = vec![0usize; hosts.len()];
    let mut plan = Vec::with_capacity(partitions as usize);
    let mut ranked: Vec<(u64, usize)> = Vec::with_capacity(hosts.len());
    for partition in 0..partitions {
        ranked.clear();
        ranked.extend(
            sorted
                .iter()
                .map(|(index, id)| (score(partition, id), *index)),
        );
        // Highest score first; ties (practically impossible) by host order.
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let chosen = ranked
            .iter()
            .map(|(_, index)| *index)
            .find(|index| load[*index] < floor || (load[*index] == floor && extra > 0))
            .unwrap_or(ranked[0].1);
        if load[chosen] == floor {
            extra = extra.saturating_sub(1);
        }
        load[chosen] += 1;
        plan.push(chosen);
    }
    plan
}

/// The rendezvous score of `host` for `partition`: a 64-bit mix of both.
fn score(partition: u32, host: &str) -> u64 {
    // FNV-1a over the host id, then the partition, then a finalizer (splitmix64) so close
    // inputs land far apart.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes().chain(partition.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owners(partitions: u32, hosts: &[String]) -> Vec<String> {
        let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
        assign(partitions, &refs)
            .into_iter()
            .map(|i| hosts[i].clone())
            .collect()
    }

    fn hosts() -> impl Strategy<Value = Vec<String>> {
        prop::collection::btree_set("[a-z]{1,8}-[0-9a-f]{6}", 1..9)
            .prop_map(|set| set.into_iter().collect())
    }

    proptest! {
        #[test]
        fn deterministic_and_balanced(partitions in 1u32..300, hosts in hosts(), seed in any::<u64>()) {
            let plan = owners(partitions, &hosts);
            let mut shuffled = hosts.clone();
            fastrand::Rng::with_seed(seed).shuffle(&mut shuffled);
            prop_assert_eq!(&plan, &owners(partitions, &shuffled));
            let floor = partitions as usize / hosts.len();
            for host in &hosts {
                let n = plan.iter().filter(|o| *o == host).count();
                prop_assert!(n == floor || n == floor + 1, "{} owns {}, not {} or {}", host, n, floor, floor + 1);
            }
        }

        #[test]
        fn few_partitions_move_when_a_host_joins_or_leaves(partitions in 8u32..300, hosts in hosts(), newcomer in "[a-z]{1,8}-[0-9a-f]{6}") {
            prop_assume!(!hosts.contains(&newcomer));
            let before = owners(partitions, &hosts);
            let mut joined = hosts.clone();
            joined.push(newcomer.clone());
            let after = owners(partitions, &joined);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            // The newcomer must get about partitions / (hosts + 1); the bounded load moves a
            // few more. Allow twice the ideal plus one per host.
            let ideal = (partitions as usize) / joined.len();
            prop_assert!(moved <= 2 * ideal + joined.len() + 1, "{} moved, ideal {}", moved, ideal);
            // Leaving is the mirror image: back to the old plan.
            prop_assert_eq!(owners(partitions, &hosts), before);
        }
    }

    #[test]
    fn small_cases() {
        assert!(assign(16, &[]).is_empty());
        assert_eq!(assign(4, &["only"]), vec![0, 0, 0, 0]);
        let plan = assign(16, &["a", "b", "c"]);
        let counts: Vec<usize> = (0..3)
            .map(|h| plan.iter().filter(|o| **o == h).count())
            .collect();
        assert!(counts.iter().all(|c| (5..=6).contains(c)), "{counts:?}");
    }
}
