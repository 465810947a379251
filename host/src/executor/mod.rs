//! The keyed executor: where fetched messages wait for a worker.
//!
//! Messages with the same ordering key run one at a time, in stream order; different keys run
//! in parallel, served round-robin so a hot key cannot starve the others. Unordered messages
//! (no key) are served FIFO.
//!
//! Invariants:
//! - Nothing pushed is ever dropped: every item comes back through [`Executor::next`] or
//!   [`Executor::take_waiting`], or is handed back by [`Executor::push`] as a duplicate of a
//!   sequence the executor already holds.
//! - The executor only schedules; it never acknowledges anything (only the consumer acks).
//! - A failed item retried in place keeps its key blocked until it runs again, so a key's later
//!   messages never overtake it.
//!
//! The state machine is in [`lanes`]; this type adds the lock and the wake-ups.

pub mod lanes;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use lanes::Lanes;
pub use lanes::{Pushed, Stats, Ticket};

/// A shared executor for one handler.
pub struct Executor<T> {
    lanes: Mutex<Lanes<T>>,
    ready: Notify,
    closed: AtomicBool,
}

impl<T> Default for Executor<T> {
    fn default() -> Self {
        Executor {
            lanes: Mutex::new(Lanes::default()),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }
}

impl<T> Executor<T> {
    /// An empty, open executor.
    pub fn new() -> Executor<T> {
        Executor::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lanes<T>> {
        // Every method of `Lanes` leaves it consistent before it can panic (it only panics on
        // arithmetic invariants), so a poisoned lock still guards usable state.
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an item (see [`Lanes::push`]).
    pub fn push(&self, key: Option<&str>, seq: u64, item: T) -> Pushed<T> {
        let pushed = self.lock().push(key, seq, item);
        if matches!(pushed, Pushed::Queued { .. }) {
            self.ready.notify_one();
        }
        pushed
    }

    /// Queues an item whose key is computed from the item (see [`Lanes::push_with`]).
    pub fn push_with<F>(&self, seq: u64, item: T, key_of: F) -> Pushed<T>
    where
        F: for<'a> FnOnce(&'a T) -> Option<&'a str>,
    {
        let pushed = self.lock().push_with(seq, item, key_of);
        if matches!(pushed, Pushed::Queued { .. }) {
            self.ready.notify_one();
        }
        pushed
    }

    /// The next runnable item; waits for one. `None` once closed.
    pub async fn next(&self) -> Option<Ticket<T>> {
        // Fast path: work is waiting, so no wake-up needs registering.
        if !self.closed.load(Ordering::Acquire) {
            if let Some(ticket) = self.take_next() {
                return Some(ticket);
            }
        }
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(ticket) = self.take_next() {
                return Some(ticket);
            }
            let deadline = self.lock().next_deadline();
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    fn take_next(&self) -> Option<Ticket<T>> {
        let mut lanes = self.lock();
        let ticket = lanes.next(Instant::now())?;
        if lanes.stats().runnable > 0 {
            // Pass the wake-up on: another idle worker can start the next one.
            self.ready.notify_one();
        }
        Some(ticket)
    }

    /// The item `seq` of `key` finished (acked, dead-lettered or handed back).
    pub fn done(&self, key: Option<&Arc<str>>, seq: u64) {
        if self.lock().done(key, seq) {
            // The key's next message became ready.
            self.ready.notify_one();
        }
    }

    /// Forgets that the unordered item `seq` is held, before it is handed back to the server,
    /// so that its redelivery is not mistaken for a duplicate.
    pub fn forget(&self, seq: u64) {
        self.lock().forget(seq);
    }

    /// Runs the item again at `until`, keeping its key blocked meanwhile.
    pub fn retry(&self, key: &Arc<str>, seq: u64, item: T, until: Instant, blocked: bool) {
        self.lock().retry(key, seq, item, until, blocked);
        // A sleeping worker must learn about the new, possibly earlier, deadline.
        self.ready.notify_one();
    }

    /// Stops handing out work: [`Executor::next`] returns `None` from now on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_waiters();
    }

    /// Removes and returns everything not running.
    pub fn take_waiting(&self) -> Vec<T> {
        self.lock().take_waiting()
    }

    /// Removes and returns the waiting items `pick` selects (see [`Lanes::take_waiting_where`]).
    pub fn take_waiting_where(&self, pick: impl FnMut(&T) -> bool) -> Vec<T> {
        let taken = self.lock().take_waiting_where(pick);
        // A lane whose head was taken may have become ready.
        self.ready.notify_one();
        taken
    }

    /// Visits every waiting item (to keep it alive with a progress ack, for example).
    pub fn for_each_waiting(&self, f: impl FnMut(&mut T)) {
        self.lock().for_each_waiting(f);
    }

    /// Current counts.
    pub fn stats(&self) -> Stats {
        self.lock().stats()
    }

    /// Up to `max` blocked keys.
    pub fn blocked_keys(&self, max: usize) -> Vec<String> {
        self.lock().blocked_keys(max)
    }
}
