//! The executor's state machine: one FIFO lane per ordering key, a round-robin queue of ready
//! lanes, and backoff timers. Pure and synchronous (time is passed in), so property tests can
//! drive it with simulated time.
//!
//! Invariants (checked by the property tests in `tests.rs`):
//! - at most one item per key is running;
//! - a lane's items leave in stream-sequence order (a lower sequence that arrives late is put
//!   before higher ones still waiting; it cannot overtake one already running or done);
//! - every pushed item is handed out by [`Lanes::next`] or returned by [`Lanes::take_waiting`],
//!   except a duplicate of a sequence already held (waiting or running, keyed or not), which
//!   [`Lanes::push`] hands back;
//! - ready lanes are served round-robin: a lane that becomes ready waits for at most one turn
//!   of each lane ahead of it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// An item handed to a worker.
#[derive(Debug)]
pub struct Ticket<T> {
    /// The ordering key (`None` when unordered).
    pub key: Option<Arc<str>>,
    /// The item's stream sequence.
    pub seq: u64,
    /// The item.
    pub item: T,
}

/// What [`Lanes::push`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed<T> {
    /// Queued. `late` is true when the key, still held by this executor, already started or
    /// completed a higher sequence (a redelivery arriving after a later message of its key).
    /// A key is forgotten once its lane empties, so a later straggler is not flagged.
    Queued {
        /// See above.
        late: bool,
    },
    /// The lane already holds this sequence (a redelivery of a message this host has): the
    /// item is handed back untouched.
    Duplicate(T),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the ready queue.
    Ready,
    /// Its head item is with a worker.
    Running,
    /// Its head item waits for a retry at this instant.
    Waiting(Instant),
}

#[derive(Debug)]
struct Lane<T> {
    items: VecDeque<(u64, T)>,
    state: State,
    running: Option<u64>,
    /// Highest sequence completed or started on this lane.
    high: u64,
    /// The head item exhausted its attempts and is retried until it succeeds.
    blocked: bool,
}

/// Where [`Lanes::place`] puts an item.
enum Place {
    Unordered,
    Duplicate,
    NewLane(Arc<str>),
    Lane {
        key: Arc<str>,
        at: usize,
        late: bool,
    },
}

/// Counts for metrics, flow control and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Items waiting (ready, in backoff or blocked).
    pub waiting: usize,
    /// Items with a worker.
    pub running: usize,
    /// Distinct keys held.
    pub keys: usize,
    /// Keys (or unordered items) a worker could start now.
    pub runnable: usize,
    /// Keys whose head message exhausted its attempts and blocks the key.
    pub blocked: usize,
}

/// Lanes by key, plus a FIFO for unordered items.
#[derive(Debug)]
pub struct Lanes<T> {
    lanes: HashMap<Arc<str>, Lane<T>>,
    ready: VecDeque<Arc<str>>,
    unordered: VecDeque<(u64, T)>,
    /// Sequences of the unordered items held, waiting or running: a redelivery of one of them
    /// is a duplicate, as in a lane.
    unordered_held: HashSet<u64>,
    /// Running unordered items already handed back (see [`Lanes::forget`]): their `done` must
    /// not unmark a redelivered copy of the same sequence.
    forgotten: HashSet<u64>,
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    waiting: usize,
    running: usize,
    blocked: usize,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Lanes {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            unordered: VecDeque::new(),
            unordered_held: HashSet::new(),
            forgotten: HashSet::new(),
            timers: BinaryHeap::new(),
            waiting: 0,
            running: 0,
            blocked: 0,
        }
    }
}

impl<T> Lanes<T> {
    /// Adds an item with stream sequence `seq` under `key` (`None`: unordered).
    pub fn push(&mut self, key: Option<&str>, seq: u64, item: T) -> Pushed<T> {
        let place = self.place(key, seq);
        self.commit(place, seq, item)
    }

    /// Adds an item whose key borrows from the item itself (a subject or header of the
    /// message), so the key is never copied unless its lane is new.
    pub fn push_with<F>(&mut self, seq: u64, item: T, key_of: F) -> Pushed<T>
    where
        F: for<'a> FnOnce(&'a T) -> Option<&'a str>,
    {
        let place = self.place(key_of(&item), seq);
        self.commit(place, seq, item)
    }

    /// Where an item of `key` and `seq` goes; borrows nothing from the item.
    fn place(&self, key: Option<&str>, seq: u64) -> Place {
        let Some(key) = key else {
            if self.unordered_held.contains(&seq) {
                return Place::Duplicate;
            }
            return Place::Unordered;
        };
        let Some((key, lane)) = self.lanes.get_key_value(key) else {
            return Place::NewLane(Arc::from(key));
        };
        // Keep the lane sorted; arrivals are almost always in order, so search from the back.
        let at = lane
            .items
            .iter()
            .rposition(|(s, _)| *s < seq)
            .map_or(0, |i| i + 1);
        let held = lane.items.get(at).is_some_and(|(s, _)| *s == seq);
        if held || lane.running == Some(seq) {
            return Place::Duplicate;
        }
        Place::Lane {
            key: key.clone(),
            at,
            late: seq < lane.high,
        }
    }

    fn commit(&mut self, place: Place, seq: u64, item: T) -> Pushed<T> {
        self.waiting += 1;
        match place {
            Place::Duplicate => {
                self.waiting -= 1;
                return Pushed::Duplicate(item);
            }
            Place::Unordered => {
                self.unordered_held.insert(seq);
                self.unordered.push_back((seq, item));
            }
            Place::Lane { key, at, late } => match self.lanes.get_mut(&key) {
                Some(lane) => {
                    lane.items.insert(at, (seq, item));
                    return Pushed::Queued { late };
                }
                // `place` and `commit` run under the same borrow, so the lane is still there;
                // should it not be, the item starts a new lane rather than being lost.
                None => self.new_lane(key, seq, item),
            },
            Place::NewLane(key) => self.new_lane(key, seq, item),
        }
        Pushed::Queued { late: false }
    }

    fn new_lane(&mut self, key: Arc<str>, seq: u64, item: T) {
        let mut items = VecDeque::with_capacity(1);
        items.push_back((seq, item));
        self.lanes.insert(
            key.clone(),
            Lane {
                items,
                state: State::Ready,
                running: None,
                high: 0,
                blocked: false,
            },
        );
        self.ready.push_back(key);
    }

    /// The next item to run, if any is runnable at `now`.
    pub fn next(&mut self, now: Instant) -> Option<Ticket<T>> {
        self.wake_due(now);
        if let Some((seq, item)) = self.unordered.pop_front() {
            self.waiting -= 1;
            self.running += 1;
            return Some(Ticket {
                key: None,
                seq,
                item,
            });
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            let Some((seq, item)) = lane.items.pop_front() else {
                continue;
            };
            lane.state = State::Running;
            lane.running = Some(seq);
            lane.high = lane.high.max(seq);
            self.waiting -= 1;
            self.running += 1;
            return Some(Ticket {
                key: Some(key),
                seq,
                item,
            });
        }
        None
    }

    /// Marks the running item `seq` of `key` as finished (settled or handed back): the key's
    /// next item, if any, becomes ready at the back of the round. Returns whether it did.
    pub fn done(&mut self, key: Option<&Arc<str>>, seq: u64) -> bool {
        self.running -= 1;
        let Some(key) = key else {
            if self.forgotten.is_empty() || !self.forgotten.remove(&seq) {
                self.unordered_held.remove(&seq);
            }
            return false;
        };
        let Some(lane) = self.lanes.get_mut(key) else {
            return false;
        };
        lane.running = None;
        if lane.blocked {
            lane.blocked = false;
            self.blocked -= 1;
        }
        if lane.items.is_empty() {
            self.lanes.remove(key);
            false
        } else {
            lane.state = State::Ready;
            self.ready.push_back(key.clone());
            true
        }
    }

    /// Forgets that the unordered item `seq` is held (it is being handed back to the server):
    /// from now on a delivery of `seq` is queued, not refused as a duplicate.
    pub fn forget(&mut self, seq: u64) {
        if self.unordered_held.remove(&seq) {
            self.forgotten.insert(seq);
        }
    }

    /// Puts the running item of `key` back at the head of its lane, to run again at `until`.
    /// The key stays blocked meanwhile. `blocked` marks a key whose item exhausted its
    /// attempts and is retried until it succeeds.
    pub fn retry(&mut self, key: &Arc<str>, seq: u64, item: T, until: Instant, blocked: bool) {
        self.running -= 1;
        self.waiting += 1;
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            items: VecDeque::new(),
            state: State::Running,
            running: None,
            high: seq,
            blocked: false,
        });
        lane.running = None;
        lane.items.push_front((seq, item));
        lane.state = State::Waiting(until);
        if blocked && !lane.blocked {
            lane.blocked = true;
            self.blocked += 1;
        }
        self.timers.push(Reverse((until, key.clone())));
    }

    /// Makes lanes whose retry time has come ready.
    fn wake_due(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.timers.pop() else {
                break;
            };
            if let Some(lane) = self.lanes.get_mut(&key) {
                if lane.state == State::Waiting(at) {
                    lane.state = State::Ready;
                    self.ready.push_back(key);
                }
            }
        }
    }

    /// The earliest pending retry time.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Removes and returns every waiting item (ready, in backoff, blocked); running items stay
    /// with their workers.
    pub fn take_waiting(&mut self) -> Vec<T> {
        self.take_waiting_where(|_| true)
    }

    /// Removes and returns the waiting items `pick` selects; running items stay with their
    /// workers. A lane left empty and idle is forgotten; one whose head was taken becomes
    /// ready for its next item, so nothing left behind waits on a retry that no longer exists.
    pub fn take_waiting_where(&mut self, mut pick: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.unordered.len());
        for (seq, item) in self.unordered.drain(..) {
            if pick(&item) {
                self.unordered_held.remove(&seq);
                out.push(item);
            } else {
                kept.push_back((seq, item));
            }
        }
        self.unordered = kept;
        for (key, lane) in self.lanes.iter_mut() {
            if !lane.items.iter().any(|(_, item)| pick(item)) {
                continue;
            }
            let head = lane.items.front().map(|(seq, _)| *seq);
            let mut rest = VecDeque::with_capacity(lane.items.len());
            for (seq, item) in lane.items.drain(..) {
                if pick(&item) {
                    out.push(item);
                } else {
                    rest.push_back((seq, item));
                }
            }
            let head_taken = lane.running.is_none() && rest.front().map(|(s, _)| *s) != head;
            lane.items = rest;
            if head_taken {
                // The head was in backoff (or blocked): what remains starts afresh.
                lane.blocked = false;
                if !lane.items.is_empty() && lane.state != State::Ready {
                    lane.state = State::Ready;
                    self.ready.push_back(key.clone());
                }
            }
        }
        self.lanes
            .retain(|_, lane| lane.running.is_some() || !lane.items.is_empty());
        let lanes = &self.lanes;
        self.ready.retain(|key| {
            lanes
                .get(key)
                .is_some_and(|lane| lane.state == State::Ready && !lane.items.is_empty())
        });
        // A key must appear in the ready queue at most once.
        let mut seen = HashSet::with_capacity(self.ready.len());
        self.ready.retain(|key| seen.insert(key.clone()));
        self.blocked = self.lanes.values().filter(|lane| lane.blocked).count();
        self.waiting -= out.len();
        out
    }

    /// Visits every waiting item.
    pub fn for_each_waiting(&mut self, mut f: impl FnMut(&mut T)) {
        for (_, item) in self.unordered.iter_mut() {
            f(item);
        }
        for lane in self.lanes.values_mut() {
            for (_, item) in lane.items.iter_mut() {
                f(item);
            }
        }
    }

    /// Current counts.
    pub fn stats(&self) -> Stats {
        Stats {
            waiting: self.waiting,
            running: self.running,
            keys: self.lanes.len(),
            runnable: self.ready.len() + self.unordered.len(),
            blocked: self.blocked,
        }
    }

    /// Up to `max` blocked keys, for status reports.
    pub fn blocked_keys(&self, max: usize) -> Vec<String> {
        self.lanes
            .iter()
            .filter(|(_, lane)| lane.blocked)
            .take(max)
            .map(|(k, _)| k.to_string())
            .collect()
    }
}
