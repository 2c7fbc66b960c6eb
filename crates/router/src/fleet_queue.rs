//! The router's queue for one model when every replica is at its limit, pure: bounded, each
//! request with a deadline, oldest first (late binding: a waiter goes to the first Mac that has
//! room, rather than joining one Mac's queue whose speed the router can only guess). A request
//! that finds it full is refused at once with a Retry-After worked out from how fast the fleet
//! has been finishing requests, never an unbounded wait.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Retry-After is whole seconds (RFC 9110); clients such as openai-python ignore it above 120 s
/// and do not retry at all, so it stays within these.
pub const RETRY_AFTER_MIN: Duration = Duration::from_secs(1);
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(120);

/// The weight of the newest interval in the drain rate's moving average.
const DRAIN_ALPHA: f64 = 0.2;

/// A request waiting for a place, with when it stops waiting.
#[derive(Debug)]
struct Waiter<T> {
    item: T,
    deadline: Instant,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// When trying again is worth it: the time the fleet takes to finish what is queued now.
    pub retry_after: Duration,
}

#[derive(Debug)]
pub struct FleetQueue<T> {
    waiters: VecDeque<Waiter<T>>,
    capacity: usize,
    /// Completions per second over the fleet, a moving average; None until two completions.
    drain_per_second: Option<f64>,
    last_completion: Option<Instant>,
}

impl<T> FleetQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self { waiters: VecDeque::new(), capacity, drain_per_second: None, last_completion: None }
    }

    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Queues `item` until `deadline`, or says when to try again if the queue is full.
    pub fn push(&mut self, item: T, deadline: Instant) -> Result<(), Full> {
        if self.waiters.len() >= self.capacity {
            return Err(Full { retry_after: self.retry_after() });
        }
        self.waiters.push_back(Waiter { item, deadline });
        Ok(())
    }

    /// The oldest waiter, left in place.
    pub fn oldest(&self) -> Option<&T> {
        self.waiters.front().map(|w| &w.item)
    }

    /// The oldest waiter, for the place that just freed.
    pub fn pop_oldest(&mut self) -> Option<T> {
        self.waiters.pop_front().map(|w| w.item)
    }

    /// Takes out every waiter whose deadline has passed (they get 503 with a Retry-After).
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let (gone, kept): (Vec<_>, Vec<_>) = self.waiters.drain(..).partition(|w| w.deadline <= now);
        self.waiters = kept.into();
        gone.into_iter().map(|w| w.item).collect()
    }

    /// The earliest deadline, for the timer that expires waiters.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiters.iter().map(|w| w.deadline).min()
    }

    /// A request of this model finished somewhere in the fleet: feeds the drain rate.
    pub fn completed(&mut self, now: Instant) {
        if let Some(last) = self.last_completion {
            let gap = now.saturating_duration_since(last).as_secs_f64().max(1e-3);
            let rate = 1.0 / gap;
            self.drain_per_second =
                Some(self.drain_per_second.map_or(rate, |r| DRAIN_ALPHA * rate + (1.0 - DRAIN_ALPHA) * r));
        }
        self.last_completion = Some(now);
    }

    /// How long the fleet needs to finish what is queued now and one more, at its recent rate,
    /// in whole seconds within `RETRY_AFTER_MIN..=RETRY_AFTER_MAX`. Unknown rate: the minimum.
    pub fn retry_after(&self) -> Duration {
        let Some(rate) = self.drain_per_second.filter(|r| r.is_finite() && *r > 0.0) else {
            return RETRY_AFTER_MIN;
        };
        let seconds = ((self.waiters.len() + 1) as f64 / rate).ceil();
        Duration::from_secs_f64(seconds).clamp(RETRY_AFTER_MIN, RETRY_AFTER_MAX)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_full_queue_refuses_at_once_and_waiters_leave_oldest_first() {
        let now = Instant::now();
        let mut q = FleetQueue::new(2);
        assert!(q.push("a", now + Duration::from_secs(5)).is_ok());
        assert!(q.push("b", now + Duration::from_secs(5)).is_ok());
        assert_eq!(q.push("c", now + Duration::from_secs(5)), Err(Full { retry_after: RETRY_AFTER_MIN }));
        assert_eq!((q.pop_oldest(), q.pop_oldest(), q.pop_oldest()), (Some("a"), Some("b"), None));
    }

    #[test]
    fn waiters_past_their_deadline_are_taken_out() {
        let now = Instant::now();
        let mut q = FleetQueue::new(4);
        q.push(1, now + Duration::from_millis(10)).ok();
        q.push(2, now + Duration::from_secs(10)).ok();
        q.push(3, now + Duration::from_millis(20)).ok();
        assert_eq!(q.next_deadline(), Some(now + Duration::from_millis(10)));
        assert_eq!(q.expire(now + Duration::from_millis(30)), vec![1, 3]);
        assert_eq!((q.len(), q.pop_oldest()), (1, Some(2)));
    }

    #[test]
    fn retry_after_follows_the_fleets_drain_rate() {
        let start = Instant::now();
        let mut q = FleetQueue::new(8);
        // Two completions a second.
        for i in 0..20 {
            q.completed(start + Duration::from_millis(500 * i));
        }
        for _ in 0..7 {
            q.push((), start + Duration::from_secs(60)).ok();
        }
        // 7 queued and one more at 2 per second: 4 s.
        assert_eq!(q.retry_after(), Duration::from_secs(4));
    }

    proptest! {
        #[test]
        fn retry_after_is_always_whole_seconds_within_bounds(
            gaps_ms in proptest::collection::vec(0u64..100_000, 0..30),
            queued in 0usize..500,
        ) {
            let start = Instant::now();
            let mut q = FleetQueue::new(1_000);
            let mut at = start;
            for g in gaps_ms {
                at += Duration::from_millis(g);
                q.completed(at);
            }
            for _ in 0..queued {
                q.push((), start).ok();
            }
            let r = q.retry_after();
            prop_assert!((RETRY_AFTER_MIN..=RETRY_AFTER_MAX).contains(&r), "{r:?}");
            prop_assert_eq!(r.subsec_nanos(), 0);
        }
    }
}
