//! The executor: where fetched messages wait for a worker.
//!
//! Invariants:
//! - Nothing pushed is ever dropped: every item is returned by [`Executor::next`] or by
//!   [`Executor::take_queued`].
//! - The executor only schedules; it never acknowledges anything (only the consumer acks).
//!
//! For now this is one FIFO queue served by a fixed number of workers; per-key lanes slot in
//! behind the same `push` / `next` interface.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// A queue of items shared by the fetch loop (producer) and the workers (consumers).
pub struct Executor<T> {
    state: Mutex<State<T>>,
    ready: Notify,
}

struct State<T> {
    queue: VecDeque<T>,
    closed: bool,
}

impl<T> Default for Executor<T> {
    fn default() -> Self {
        Executor {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                closed: false,
            }),
            ready: Notify::new(),
        }
    }
}

impl<T> Executor<T> {
    /// An empty, open executor.
    pub fn new() -> Executor<T> {
        Executor::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // Every critical section below leaves the queue consistent, even if it panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an item for the next free worker.
    pub fn push(&self, item: T) {
        self.lock().queue.push_back(item);
        self.ready.notify_one();
    }

    /// The next item, waiting for one; `None` once the executor is closed and empty.
    pub async fn next(&self) -> Option<T> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(item) = state.queue.pop_front() {
                    // Another worker may be waiting for the next item.
                    if !state.queue.is_empty() {
                        self.ready.notify_one();
                    }
                    return Some(item);
                }
                if state.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Stops accepting work: workers finish what is queued, then [`Executor::next`] returns
    /// `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_waiters();
    }

    /// Removes and returns everything not started yet.
    pub fn take_queued(&self) -> Vec<T> {
        self.lock().queue.drain(..).collect()
    }

    /// Items waiting for a worker.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn fifo_then_none_after_close() {
        let ex = Executor::new();
        ex.push(1);
        ex.push(2);
        assert_eq!(ex.next().await, Some(1));
        ex.close();
        assert_eq!(ex.next().await, Some(2));
        assert_eq!(ex.next().await, None);
    }

    #[tokio::test]
    async fn waiting_workers_wake_for_pushes_and_close() {
        let ex = Arc::new(Executor::new());
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let ex = ex.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Some(x) = ex.next().await {
                        got.push(x);
                    }
                    got
                })
            })
            .collect();
        for i in 0..100 {
            ex.push(i);
            tokio::task::yield_now().await;
        }
        ex.close();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn take_queued_empties() {
        let ex = Executor::new();
        ex.push("a");
        ex.push("b");
        assert_eq!(ex.queued(), 2);
        assert_eq!(ex.take_queued(), ["a", "b"]);
        assert_eq!(ex.queued(), 0);
    }
}
