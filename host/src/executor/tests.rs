//! Property tests of the executor's state machine with simulated handlers and time, and unit
//! tests of its edge cases.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::lanes::{Lanes, Pushed};
use super::Executor;

#[derive(Debug, Clone)]
struct Msg {
    key: usize,
    /// Ticks one attempt takes.
    duration: u64,
    /// Attempts that fail before one succeeds.
    failures: u32,
    /// Tick at which it is published.
    arrival: u64,
}

fn messages() -> impl Strategy<Value = Vec<Msg>> {
    prop::collection::vec(
        (0usize..12, 1u64..5, 0u32..4, 0u64..40).prop_map(|(key, duration, failures, arrival)| {
            Msg {
                key,
                duration,
                failures,
                arrival,
            }
        }),
        1..150,
    )
    .prop_map(|mut v| {
        v.sort_by_key(|m| m.arrival);
        v
    })
}

struct Running {
    key: Option<Arc<str>>,
    seq: u64,
    until: u64,
}

/// Runs the simulation and checks every invariant; returns the completion log.
fn simulate(msgs: &[Msg], workers: usize, cap: usize, max_attempts: u32, backoff: u64) {
    let base = Instant::now();
    let at = |tick: u64| base + Duration::from_millis(tick);
    let mut lanes: Lanes<u64> = Lanes::default();
    let mut next_arrival = 0;
    let mut slots: Vec<Option<Running>> = (0..workers).map(|_| None).collect();
    let mut attempts: HashMap<u64, u32> = HashMap::new();
    let mut completed: HashMap<u64, bool> = HashMap::new(); // seq -> succeeded
    let mut order: HashMap<usize, Vec<u64>> = HashMap::new();
    let key_of = |seq: u64| msgs[(seq - 1) as usize].key;
    let mut held = 0usize;
    let mut tick = 0u64;
    while completed.len() < msgs.len() {
        assert!(
            tick < 100_000,
            "no progress: {} of {} done",
            completed.len(),
            msgs.len()
        );
        // Finish attempts that are due.
        for slot in slots.iter_mut() {
            let Some(run) = slot.take_if(|r| r.until <= tick) else {
                continue;
            };
            let msg = &msgs[(run.seq - 1) as usize];
            let n = attempts.entry(run.seq).or_default();
            *n += 1;
            let failed = *n <= msg.failures;
            let key = run.key.expect("ordered");
            if failed && *n < max_attempts {
                lanes.retry(&key, run.seq, run.seq, at(tick + backoff), false);
            } else {
                assert!(
                    completed.insert(run.seq, !failed).is_none(),
                    "{} completed twice",
                    run.seq
                );
                order.entry(msg.key).or_default().push(run.seq);
                lanes.done(Some(&key), run.seq);
                held -= 1;
            }
        }
        // Publish what has arrived, within the buffer cap (backpressure: the rest waits).
        while next_arrival < msgs.len() && msgs[next_arrival].arrival <= tick && held < cap {
            let seq = next_arrival as u64 + 1;
            let key = format!("k{}", msgs[next_arrival].key);
            assert_eq!(
                lanes.push(Some(&key), seq, seq),
                Pushed::Queued { late: false }
            );
            held += 1;
            next_arrival += 1;
        }
        // Idle workers take work.
        let mut running_keys: HashSet<Arc<str>> = slots
            .iter()
            .flatten()
            .filter_map(|r| r.key.clone())
            .collect();
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            let Some(ticket) = lanes.next(at(tick)) else {
                break;
            };
            let key = ticket.key.clone().expect("ordered");
            assert!(
                running_keys.insert(key.clone()),
                "two in progress for key {key}"
            );
            assert_eq!(format!("k{}", key_of(ticket.seq)), &*key);
            *slot = Some(Running {
                key: Some(key),
                seq: ticket.seq,
                until: tick + msgs[(ticket.seq - 1) as usize].duration,
            });
        }
        let stats = lanes.stats();
        assert_eq!(stats.waiting + stats.running, held, "{stats:?}");
        assert!(held <= cap);
        tick += 1;
    }
    // Per-key completion order equals arrival (sequence) order.
    for (key, seqs) in &order {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, &sorted, "key {key} completed out of order");
    }
    // Every message completed exactly once; exactly those that kept failing were given up.
    for (i, m) in msgs.iter().enumerate() {
        let succeeded = completed[&(i as u64 + 1)];
        assert_eq!(succeeded, m.failures < max_attempts, "message {}", i + 1);
    }
    assert_eq!(lanes.stats(), Default::default());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn keyed_lanes_keep_order_progress_and_bounds(
        msgs in messages(),
        workers in 1usize..6,
        cap in 1usize..40,
        backoff in 0u64..5,
    ) {
        simulate(&msgs, workers, cap, 3, backoff);
    }
}

#[test]
fn a_key_with_one_message_waits_at_most_one_turn_behind_a_hot_key() {
    let mut lanes: Lanes<u64> = Lanes::default();
    let now = Instant::now();
    for seq in 1..=100 {
        lanes.push(Some("hot"), seq, seq);
    }
    lanes.push(Some("cold"), 101, 101);
    let first = lanes.next(now).unwrap();
    assert_eq!(first.key.as_deref(), Some("hot"));
    lanes.done(first.key.as_ref(), first.seq);
    let second = lanes.next(now).unwrap();
    assert_eq!(
        second.key.as_deref(),
        Some("cold"),
        "served after one turn of the hot key"
    );
}

#[test]
fn ready_keys_rotate() {
    let mut lanes: Lanes<u64> = Lanes::default();
    let now = Instant::now();
    let mut seq = 0;
    for _ in 0..3 {
        for key in ["a", "b", "c"] {
            seq += 1;
            lanes.push(Some(key), seq, seq);
        }
    }
    let mut served = String::new();
    while let Some(t) = lanes.next(now) {
        served.push_str(t.key.as_deref().unwrap());
        lanes.done(t.key.as_ref(), t.seq);
    }
    assert_eq!(served, "abcabcabc");
}

#[test]
fn duplicates_are_handed_back_and_late_redeliveries_flagged_and_sorted() {
    let mut lanes: Lanes<&str> = Lanes::default();
    let now = Instant::now();
    assert_eq!(
        lanes.push(Some("k"), 5, "five"),
        Pushed::Queued { late: false }
    );
    let running = lanes.next(now).unwrap();
    assert_eq!(running.seq, 5);
    // The same sequence again, while it runs: a duplicate delivery.
    assert_eq!(
        lanes.push(Some("k"), 5, "again"),
        Pushed::Duplicate("again")
    );
    assert_eq!(
        lanes.push(Some("k"), 9, "nine"),
        Pushed::Queued { late: false }
    );
    assert_eq!(
        lanes.push(Some("k"), 9, "nine again"),
        Pushed::Duplicate("nine again")
    );
    // A lower sequence arriving late runs before 9, after the running 5.
    assert_eq!(
        lanes.push(Some("k"), 3, "three"),
        Pushed::Queued { late: true }
    );
    assert!(lanes.next(now).is_none(), "key k is busy");
    lanes.done(running.key.as_ref(), running.seq);
    assert_eq!(lanes.next(now).unwrap().item, "three");
}

#[test]
fn a_retried_item_blocks_its_key_until_its_time() {
    let mut lanes: Lanes<u64> = Lanes::default();
    let now = Instant::now();
    lanes.push(Some("k"), 1, 1);
    lanes.push(Some("k"), 2, 2);
    lanes.push(Some("other"), 3, 3);
    let t = lanes.next(now).unwrap();
    assert_eq!(t.seq, 1);
    let key = t.key.clone().unwrap();
    lanes.retry(&key, 1, 1, now + Duration::from_secs(1), true);
    assert_eq!(lanes.stats().blocked, 1);
    assert_eq!(lanes.blocked_keys(10), ["k"]);
    let other = lanes.next(now).unwrap();
    assert_eq!(other.seq, 3, "other keys go on");
    lanes.done(other.key.as_ref(), other.seq);
    assert!(
        lanes.next(now).is_none(),
        "k's later message must not overtake"
    );
    assert_eq!(lanes.next_deadline(), Some(now + Duration::from_secs(1)));
    let again = lanes.next(now + Duration::from_secs(1)).unwrap();
    assert_eq!(again.seq, 1);
    lanes.done(again.key.as_ref(), again.seq);
    assert_eq!(lanes.stats().blocked, 0, "a success unblocks the key");
    assert_eq!(lanes.next(now + Duration::from_secs(1)).unwrap().seq, 2);
}

#[test]
fn unordered_redeliveries_of_held_messages_are_duplicates_until_settled() {
    let mut lanes: Lanes<&str> = Lanes::default();
    let now = Instant::now();
    lanes.push(None, 1, "one");
    lanes.push(None, 2, "two");
    // Waiting: a second copy is handed back.
    assert_eq!(
        lanes.push(None, 2, "two again"),
        Pushed::Duplicate("two again")
    );
    let running = lanes.next(now).unwrap();
    assert_eq!(running.seq, 1);
    // Running: likewise.
    assert_eq!(
        lanes.push(None, 1, "one again"),
        Pushed::Duplicate("one again")
    );
    lanes.done(None, running.seq);
    // Settled (acked, or naked for a later retry): a new delivery runs again.
    assert_eq!(
        lanes.push(None, 1, "one, redelivered"),
        Pushed::Queued { late: false }
    );
    // Being naked: forgotten before the nak leaves, so a quick redelivery is not refused.
    let naked = lanes.next(now).unwrap();
    assert_eq!(naked.seq, 2);
    lanes.forget(naked.seq);
    assert_eq!(
        lanes.push(None, 2, "two, back"),
        Pushed::Queued { late: false }
    );
    lanes.done(None, naked.seq);
    // The naked copy's `done` leaves the redelivered copy marked as held.
    assert_eq!(
        lanes.push(None, 2, "two, thrice"),
        Pushed::Duplicate("two, thrice")
    );
    // Handed back at shutdown: forgotten too.
    let mut rest = lanes.take_waiting();
    rest.sort_unstable();
    assert_eq!(rest, ["one, redelivered", "two, back"]);
    assert_eq!(
        lanes.push(None, 2, "two, again"),
        Pushed::Queued { late: false }
    );
}

#[test]
fn take_waiting_returns_everything_not_running() {
    let mut lanes: Lanes<u64> = Lanes::default();
    let now = Instant::now();
    lanes.push(None, 1, 1);
    lanes.push(Some("a"), 2, 2);
    lanes.push(Some("a"), 3, 3);
    lanes.push(Some("b"), 4, 4);
    let t = lanes.next(now).unwrap();
    assert_eq!(t.seq, 1);
    let t2 = lanes.next(now).unwrap();
    lanes.retry(
        t2.key.as_ref().unwrap(),
        t2.seq,
        t2.item,
        now + Duration::from_secs(60),
        false,
    );
    let mut rest = lanes.take_waiting();
    rest.sort_unstable();
    assert_eq!(rest, [2, 3, 4]);
    assert_eq!(lanes.stats().waiting, 0);
    assert_eq!(lanes.stats().running, 1);
}

#[test]
fn take_waiting_where_takes_only_what_it_picks_and_keeps_lanes_consistent() {
    // Items are (binding, n): a released partition's waiting messages leave, the rest stay.
    let mut lanes: Lanes<(u8, u64)> = Lanes::default();
    let now = Instant::now();
    lanes.push(Some("a"), 1, (1, 1));
    lanes.push(Some("a"), 2, (1, 2));
    lanes.push(Some("b"), 3, (2, 3));
    lanes.push(Some("b"), 4, (2, 4));
    lanes.push(Some("c"), 5, (1, 5));
    lanes.push(None, 6, (1, 6));
    lanes.push(None, 7, (2, 7));
    // "a" runs; "b"'s head is retried in backoff.
    let a = lanes.next(now).unwrap();
    assert_eq!(a.seq, 6, "unordered first");
    lanes.done(None, 6);
    let u = lanes.next(now).unwrap();
    let a = lanes.next(now).unwrap();
    assert_eq!(
        (u.seq, a.seq),
        (7, 1),
        "unordered first, then the lanes in turn"
    );
    let b = lanes.next(now).unwrap();
    assert_eq!(b.seq, 3);
    lanes.retry(
        b.key.as_ref().unwrap(),
        3,
        b.item,
        now + Duration::from_secs(60),
        true,
    );
    assert_eq!(lanes.stats().blocked, 1);
    let mut taken = lanes.take_waiting_where(|(binding, _)| *binding == 1);
    taken.sort_unstable();
    assert_eq!(taken, [(1, 2), (1, 5)]);
    let stats = lanes.stats();
    assert_eq!((stats.waiting, stats.running), (2, 2));
    assert_eq!(stats.keys, 2, "lane c is gone, a (running) and b stay");
    // A redelivery of a taken message is a new delivery, not a duplicate.
    assert_eq!(
        lanes.push(Some("c"), 5, (3, 5)),
        Pushed::Queued { late: false }
    );
    // Taking b's blocked head in backoff makes its next message ready at once.
    let taken = lanes.take_waiting_where(|(_, n)| *n == 3);
    assert_eq!(taken, [(2, 3)]);
    assert_eq!(lanes.stats().blocked, 0);
    let mut next: Vec<u64> = std::iter::from_fn(|| lanes.next(now).map(|t| t.seq)).collect();
    next.sort_unstable();
    assert_eq!(
        next,
        [4, 5],
        "b's next and c's redelivery run; a's lane still runs 1"
    );
    assert!(lanes.next(now).is_none(), "no key runs twice");
}

#[tokio::test]
async fn workers_wake_for_pushes_retries_and_close() {
    let ex = Arc::new(Executor::<u64>::new());
    let worker = {
        let ex = ex.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(t) = ex.next().await {
                if t.seq == 1 && !seen.contains(&1) {
                    seen.push(1);
                    let key = t.key.clone().unwrap();
                    ex.retry(
                        &key,
                        1,
                        1,
                        Instant::now() + Duration::from_millis(30),
                        false,
                    );
                    continue;
                }
                seen.push(t.seq);
                ex.done(t.key.as_ref(), t.seq);
                if seen.len() == 3 {
                    break;
                }
            }
            seen
        })
    };
    ex.push(Some("k"), 1, 1);
    ex.push(Some("k"), 2, 2);
    let seen = tokio::time::timeout(Duration::from_secs(5), worker)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen,
        [1, 1, 2],
        "the retry ran after its delay, before the key's next message"
    );
    let idle = {
        let ex = ex.clone();
        tokio::spawn(async move { ex.next().await.is_none() })
    };
    tokio::task::yield_now().await;
    ex.close();
    assert!(tokio::time::timeout(Duration::from_secs(5), idle)
        .await
        .unwrap()
        .unwrap());
}
