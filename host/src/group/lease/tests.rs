//! The lease protocol on a simulated clock: several hosts, a compare-and-set KV store with a
//! TTL, writes that take time to arrive, views that lag, hosts that pause, crash and join.
//! Checks: no two hosts ever use one partition at the same moment; once the churn stops,
//! every partition ends up owned by one live host, balanced.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

const TTL: Duration = Duration::from_secs(10);

/// The simulated KV bucket: lease holder, revision, and when the last write arrived.
#[derive(Default)]
struct Kv {
    revision: u64,
    leases: BTreeMap<u32, (String, u64, Instant)>,
    hosts: BTreeMap<String, (bool, Instant)>,
}

impl Kv {
    fn expire(&mut self, now: Instant) {
        self.leases.retain(|_, (_, _, at)| now < *at + TTL);
        self.hosts.retain(|_, (_, at)| now < *at + TTL);
    }

    fn view(&self) -> View {
        View {
            hosts: self
                .hosts
                .iter()
                .map(|(id, (leaving, _))| (id.clone(), *leaving))
                .collect(),
            leases: self
                .leases
                .iter()
                .map(|(p, (h, _, _))| (*p, h.clone()))
                .collect(),
        }
    }
}

/// A write in flight: applied when it arrives.
enum Write {
    Create {
        host: usize,
        partition: u32,
    },
    Renew {
        host: usize,
        partition: u32,
        revision: u64,
    },
    Delete {
        partition: u32,
        revision: u64,
    },
    Host {
        host: usize,
    },
    /// A renewal that never arrived: the host learns of the failure (a timeout).
    Lost {
        host: usize,
        partition: u32,
    },
}

struct Host {
    local: Local,
    view: View,
    alive: bool,
    paused_until: Option<Instant>,
    /// Renewals in flight (one per lease at a time, as in `group::run`).
    renewing: BTreeSet<u32>,
}

fn simulate(seed: u64, partitions: u32) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let timing = Timing::from_ttl(TTL);
    let t0 = Instant::now();
    let mut now = t0;
    let mut kv = Kv::default();
    let mut hosts: Vec<Host> = Vec::new();
    let mut in_flight: Vec<(Instant, Instant, Write)> = Vec::new(); // (arrival, sent, write)
    let step = Duration::from_millis(100);
    let churn_until = t0 + Duration::from_secs(120);
    let end = churn_until + Duration::from_secs(60);
    let new_host = |hosts: &mut Vec<Host>| {
        let id = format!("h{}", hosts.len());
        hosts.push(Host {
            local: Local {
                me: id,
                leaving: false,
                held: BTreeMap::new(),
                busy: BTreeSet::new(),
            },
            view: View::default(),
            alive: true,
            paused_until: None,
            renewing: BTreeSet::new(),
        });
    };
    for _ in 0..3 {
        new_host(&mut hosts);
    }
    while now < end {
        now += step;
        kv.expire(now);
        // Deliver the writes that arrived.
        let (arrived, pending): (Vec<_>, Vec<_>) =
            in_flight.drain(..).partition(|(at, _, _)| *at <= now);
        in_flight = pending;
        for (_, sent, write) in arrived {
            match write {
                Write::Create { host, partition } => {
                    let ok = !kv.leases.contains_key(&partition);
                    if ok {
                        kv.revision += 1;
                        let id = hosts[host].local.me.clone();
                        kv.leases.insert(partition, (id, kv.revision, now));
                    }
                    let h = &mut hosts[host];
                    h.local.busy.remove(&partition);
                    if ok && h.alive {
                        h.local
                            .held
                            .insert(partition, Held::created(kv.revision, sent));
                    }
                }
                Write::Renew {
                    host,
                    partition,
                    revision,
                } => {
                    let me = hosts[host].local.me.clone();
                    let current = kv.leases.get(&partition).cloned();
                    let h = &mut hosts[host];
                    h.renewing.remove(&partition);
                    match current {
                        Some((holder, rev, _)) if holder == me && rev == revision => {
                            kv.revision += 1;
                            kv.leases.insert(partition, (me, kv.revision, now));
                            if let Some(held) = h.local.held.get_mut(&partition) {
                                held.renewed(sent, kv.revision);
                            }
                        }
                        // A conflict: the lease is gone or someone else's. Fence at once.
                        _ => {
                            h.local.held.remove(&partition);
                        }
                    }
                }
                Write::Delete {
                    partition,
                    revision,
                } => {
                    if kv.leases.get(&partition).is_some_and(|l| l.1 == revision) {
                        kv.leases.remove(&partition);
                    }
                }
                Write::Lost { host, partition } => {
                    hosts[host].renewing.remove(&partition);
                }
                Write::Host { host } => {
                    let h = &hosts[host];
                    if h.alive {
                        kv.hosts.insert(h.local.me.clone(), (h.local.leaving, now));
                    }
                }
            }
        }
        // Churn: crashes, pauses, joins.
        if now < churn_until {
            if rng.u32(0..400) == 0 {
                let i = rng.usize(0..hosts.len());
                hosts[i].alive = false;
                hosts[i].local.held.clear();
            }
            if rng.u32(0..300) == 0 {
                let i = rng.usize(0..hosts.len());
                // A pause shorter than the margin.
                let pause = Duration::from_millis(rng.u64(100..timing.margin.as_millis() as u64));
                hosts[i].paused_until = Some(now + pause);
            }
            if rng.u32(0..300) == 0 || hosts.iter().filter(|h| h.alive).count() < 2 {
                new_host(&mut hosts);
            }
        }
        // Each running host: refresh its (lagging) view, renew, decide, act.
        let snapshot = kv.view();
        #[allow(clippy::needless_range_loop)] // `i` names the host in the writes it sends.
        for i in 0..hosts.len() {
            let h = &mut hosts[i];
            if !h.alive || h.paused_until.is_some_and(|t| now < t) {
                continue;
            }
            h.paused_until = None;
            if rng.u32(0..3) > 0 {
                h.view = snapshot.clone();
            }
            let delay = |rng: &mut fastrand::Rng| Duration::from_millis(rng.u64(0..800));
            in_flight.push((now + delay(&mut rng), now, Write::Host { host: i }));
            for (partition, held) in h.local.held.iter_mut() {
                if !h.renewing.contains(partition) && held.renewal_due(now, &timing) {
                    held.attempted = now;
                    h.renewing.insert(*partition);
                    // Some renewals are lost on the way (while the churn lasts).
                    if now < churn_until && rng.u32(0..10) == 0 {
                        in_flight.push((
                            now + Duration::from_secs(2),
                            now,
                            Write::Lost {
                                host: i,
                                partition: *partition,
                            },
                        ));
                    } else {
                        in_flight.push((
                            now + delay(&mut rng),
                            now,
                            Write::Renew {
                                host: i,
                                partition: *partition,
                                revision: held.revision,
                            },
                        ));
                    }
                }
            }
            for action in decide(partitions, &h.view, &h.local, now, &timing) {
                match action {
                    Action::Acquire(p) => {
                        h.local.busy.insert(p);
                        in_flight.push((
                            now + delay(&mut rng),
                            now,
                            Write::Create {
                                host: i,
                                partition: p,
                            },
                        ));
                    }
                    Action::Release(p) => {
                        if let Some(held) = h.local.held.remove(&p) {
                            in_flight.push((
                                now + delay(&mut rng),
                                now,
                                Write::Delete {
                                    partition: p,
                                    revision: held.revision,
                                },
                            ));
                        }
                    }
                    Action::Fence(p, _) => {
                        h.local.held.remove(&p);
                    }
                }
            }
        }
        // Safety: at most one running host uses each partition.
        for partition in 0..partitions {
            let users: Vec<&str> = hosts
                .iter()
                .filter(|h| h.alive && h.paused_until.is_none_or(|t| now >= t))
                .filter(|h| {
                    h.local
                        .held
                        .get(&partition)
                        .is_some_and(|held| now < held.valid_until(&timing))
                })
                .map(|h| h.local.me.as_str())
                .collect();
            if users.len() > 1 {
                return Err(format!(
                    "partition {partition} used by {users:?} at {:?}",
                    now - t0
                ));
            }
        }
    }
    // Liveness: after the churn, one live owner per partition, balanced.
    let live: Vec<&Host> = hosts.iter().filter(|h| h.alive).collect();
    let cap = (partitions as usize).div_ceil(live.len());
    for partition in 0..partitions {
        let owners = live
            .iter()
            .filter(|h| h.local.held.contains_key(&partition))
            .count();
        if owners != 1 {
            return Err(format!(
                "partition {partition} has {owners} owners at the end"
            ));
        }
    }
    for h in &live {
        if h.local.held.len() > cap {
            return Err(format!(
                "{} holds {} partitions, more than {cap}",
                h.local.me,
                h.local.held.len()
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn one_user_per_partition_and_everything_owned_after_churn(seed in any::<u64>(), partitions in 1u32..24) {
        simulate(seed, partitions).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn fences_when_renewals_stop_and_when_taken_over() {
    let timing = Timing::from_ttl(TTL);
    let t0 = Instant::now();
    let mut local = Local {
        me: "a".into(),
        leaving: false,
        held: BTreeMap::from([(0, Held::created(5, t0))]),
        busy: BTreeSet::new(),
    };
    let view = View {
        hosts: BTreeMap::from([("a".into(), false)]),
        leases: BTreeMap::from([(0, "a".into())]),
    };
    assert_eq!(
        decide(1, &view, &local, t0 + Duration::from_secs(6), &timing),
        []
    );
    assert_eq!(
        decide(1, &view, &local, t0 + Duration::from_secs(7), &timing),
        [Action::Fence(0, FenceReason::Expired)],
        "stops 30% of the TTL before the server could expire it"
    );
    let taken = View {
        leases: BTreeMap::from([(0, "b".into())]),
        ..view.clone()
    };
    assert_eq!(
        decide(1, &taken, &local, t0, &timing),
        [Action::Fence(0, FenceReason::TakenOver)]
    );
    // Renewal schedule: every quarter TTL, and soon again after a failure.
    let held = local.held.get_mut(&0).unwrap();
    assert!(!held.renewal_due(t0 + Duration::from_millis(2400), &timing));
    assert!(held.renewal_due(t0 + Duration::from_millis(2500), &timing));
    held.attempted = t0 + Duration::from_millis(2500);
    assert!(!held.renewal_due(t0 + Duration::from_millis(2900), &timing));
    assert!(held.renewal_due(t0 + Duration::from_millis(3000), &timing));
    held.renewed(t0 + Duration::from_millis(2500), 9);
    assert_eq!(held.revision, 9);
    assert_eq!(held.epoch, 5, "the epoch stays the create's revision");
}

#[test]
fn a_joining_host_gets_its_share_and_a_leaving_one_gives_everything_up() {
    let timing = Timing::from_ttl(TTL);
    let t0 = Instant::now();
    let all: BTreeMap<u32, Held> = (0..4)
        .map(|p| (p, Held::created(p as u64 + 1, t0)))
        .collect();
    let a = Local {
        me: "a".into(),
        leaving: false,
        held: all.clone(),
        busy: BTreeSet::new(),
    };
    let view = View {
        hosts: BTreeMap::from([("a".into(), false), ("b".into(), false)]),
        leases: (0..4).map(|p| (p, "a".to_owned())).collect(),
    };
    let released: Vec<Action> = decide(4, &view, &a, t0, &timing);
    assert_eq!(released.len(), 2, "{released:?}");
    assert!(released.iter().all(|x| matches!(x, Action::Release(_))));
    let b = Local {
        me: "b".into(),
        leaving: false,
        held: BTreeMap::new(),
        busy: BTreeSet::new(),
    };
    assert_eq!(
        decide(4, &view, &b, t0, &timing),
        [],
        "b waits until a released the leases"
    );
    let leaving = Local {
        leaving: true,
        ..a.clone()
    };
    assert_eq!(
        decide(4, &view, &leaving, t0, &timing).len(),
        4,
        "a leaving host releases everything"
    );
}
