//! A delivery while the host holds it: waiting for its key, running, or waiting to be retried
//! in place.

use std::sync::Arc;
use std::time::Instant;

use super::binding::Binding;
use super::delivery::Delivery;

/// A held message and what the host knows of its attempts.
pub struct Job {
    /// The message.
    pub delivery: Delivery,
    /// The consumer it came from (its fence, its flow control).
    pub binding: Arc<Binding>,
    /// Executions that failed, as recorded in the attempts ledger and counted by this host.
    pub failed: u32,
    /// Deliveries that were handed back without running (drain), from the ledger.
    pub handed_back: u32,
    /// Whether the ledger has a record for this message (to remove once it is settled), or
    /// `None` before the ledger was consulted.
    pub recorded: Option<bool>,
    /// When JetStream last heard about this message (delivery, or a progress ack).
    pub touched: Instant,
    /// When it was queued (for the queue-wait histogram).
    pub queued: Instant,
    /// Set when the ordering key could not be computed and the message goes straight to the
    /// dead-letter path.
    pub key_error: Option<String>,
}

impl Job {
    /// A job for a fresh delivery.
    pub fn new(delivery: Delivery, binding: Arc<Binding>) -> Job {
        let now = Instant::now();
        Job {
            delivery,
            binding,
            failed: 0,
            handed_back: 0,
            recorded: None,
            touched: now,
            queued: now,
            key_error: None,
        }
    }

    /// The attempt this run is: one more than the executions known to have failed, or the
    /// consumer's delivery count less the hand-backs, whichever is higher (an execution cut
    /// short by a crash counts through the delivery count).
    pub fn attempt(&self) -> u32 {
        attempt(self.failed, self.handed_back, self.delivery.delivered)
    }
}

fn attempt(failed: u32, handed_back: u32, delivered: u32) -> u32 {
    let by_executions = failed.saturating_add(1);
    let by_deliveries = delivered.saturating_sub(handed_back);
    by_executions.max(by_deliveries)
}

#[cfg(test)]
mod tests {
    use super::attempt;

    #[test]
    fn attempts_count_executions_not_hand_backs() {
        // (failed, handed back, delivered) -> attempt
        let cases = [
            ((0, 0, 1), 1),
            ((1, 0, 1), 2), // retried in place: JetStream saw one delivery
            ((0, 1, 2), 1), // handed back at a drain without running
            ((0, 0, 3), 3), // two executions cut short by crashes
            ((2, 1, 2), 3), // a new consumer (partition moved): the ledger knows
        ];
        for ((failed, handed_back, delivered), expected) in cases {
            assert_eq!(
                attempt(failed, handed_back, delivered),
                expected,
                "{failed} failed, {handed_back} handed back, {delivered} delivered"
            );
        }
    }
}
