//! Admission decisions as pure functions: who goes to the engine now, who waits, who is turned
//! away and when they should come back.

use std::time::Duration;

/// Why a request was refused. Each maps to one HTTP status and one `reason` label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    QueueFull,
    QueueTimeout,
    NotReady,
    TooLarge,
    CircuitOpen,
    /// The client took too long to send its request.
    RequestTimeout,
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::QueueFull,
        Rejection::QueueTimeout,
        Rejection::NotReady,
        Rejection::TooLarge,
        Rejection::CircuitOpen,
        Rejection::RequestTimeout,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
            Rejection::NotReady => "not_ready",
            Rejection::TooLarge => "too_large",
            Rejection::CircuitOpen => "circuit_open",
            Rejection::RequestTimeout => "request_timeout",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Rejection::QueueFull => 429,
            Rejection::TooLarge => 413,
            Rejection::RequestTimeout => 408,
            Rejection::QueueTimeout | Rejection::NotReady | Rejection::CircuitOpen => 503,
        }
    }

    /// The OpenAI-style `error.type`.
    pub fn error_type(self) -> &'static str {
        match self {
            Rejection::QueueFull => "rate_limit_error",
            Rejection::TooLarge | Rejection::RequestTimeout => "invalid_request_error",
            Rejection::QueueTimeout | Rejection::NotReady | Rejection::CircuitOpen => "unavailable_error",
        }
    }
}

/// Requests sent to the engine at once when the spec does not say: one slot is kept free so
/// the pulse always finds one (the pulse lane).
pub fn default_max_concurrent(slots: u32) -> u32 {
    if slots > 1 { slots - 1 } else { 1 }
}

/// What to do with an inference request that has just arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Dispatch,
    Enqueue,
    Reject(Rejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub engine_ready: bool,
    pub circuit_allows: bool,
    pub in_flight: u32,
    pub queued: u32,
    pub limit: u32,
    pub depth: u32,
}

pub fn decide(s: Snapshot) -> Decision {
    if !s.engine_ready {
        return Decision::Reject(Rejection::NotReady);
    }
    if !s.circuit_allows {
        return Decision::Reject(Rejection::CircuitOpen);
    }
    // FIFO: nobody overtakes a queued request, even when a slot has just been freed.
    if s.queued == 0 && s.in_flight < s.limit {
        return Decision::Dispatch;
    }
    if s.queued >= s.depth {
        return Decision::Reject(Rejection::QueueFull);
    }
    Decision::Enqueue
}

/// When a refused client should come back: the time for everyone ahead of it (the queue, plus
/// itself) to be served at the observed service time, `limit` at a time. Without a service
/// time yet, `fallback` (e.g. the time until the engine is back) is the estimate.
pub fn retry_after(queued: u32, limit: u32, service: Option<Duration>, fallback: Duration) -> Duration {
    let estimate = match service {
        Some(s) => s.mul_f64(f64::from(queued + 1) / f64::from(limit.max(1))),
        None => fallback,
    };
    estimate.clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// `Retry-After` is whole seconds, rounded up so a client never comes back too early.
pub fn retry_after_header(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snap(in_flight: u32, queued: u32) -> Snapshot {
        Snapshot { engine_ready: true, circuit_allows: true, in_flight, queued, limit: 3, depth: 2 }
    }

    #[test]
    fn dispatch_then_queue_then_refuse() {
        assert_eq!(decide(snap(2, 0)), Decision::Dispatch);
        assert_eq!(decide(snap(3, 0)), Decision::Enqueue);
        assert_eq!(decide(snap(3, 1)), Decision::Enqueue);
        assert_eq!(decide(snap(3, 2)), Decision::Reject(Rejection::QueueFull));
        assert_eq!(decide(snap(1, 1)), Decision::Enqueue, "no overtaking a queued request");
        assert_eq!(decide(Snapshot { engine_ready: false, ..snap(0, 0) }), Decision::Reject(Rejection::NotReady));
        assert_eq!(decide(Snapshot { circuit_allows: false, ..snap(0, 0) }), Decision::Reject(Rejection::CircuitOpen));
    }

    #[test]
    fn the_pulse_lane_keeps_one_slot() {
        assert_eq!(default_max_concurrent(4), 3);
        assert_eq!(default_max_concurrent(1), 1);
    }

    #[test]
    fn retry_after_follows_queue_and_service_time() {
        let s = Some(Duration::from_secs(2));
        assert_eq!(retry_after(0, 2, s, Duration::ZERO), Duration::from_secs(1));
        assert_eq!(retry_after(9, 2, s, Duration::ZERO), Duration::from_secs(10));
        assert_eq!(retry_after(0, 1, None, Duration::from_millis(3500)), Duration::from_millis(3500));
        assert_eq!(retry_after_header(Duration::from_millis(3500)), 4);
        assert_eq!(retry_after_header(Duration::from_secs(2)), 2);
    }

    proptest! {
        #[test]
        fn never_dispatches_past_the_limit_nor_queues_past_the_depth(in_flight in 0u32..10, queued in 0u32..10, limit in 1u32..5, depth in 0u32..5) {
            let s = Snapshot { engine_ready: true, circuit_allows: true, in_flight, queued, limit, depth };
            match decide(s) {
                Decision::Dispatch => prop_assert!(in_flight < limit && queued == 0),
                Decision::Enqueue => prop_assert!(queued < depth),
                Decision::Reject(r) => prop_assert_eq!(r, Rejection::QueueFull),
            }
        }

        #[test]
        fn retry_after_grows_with_the_queue(q in 0u32..1000, limit in 1u32..8, ms in 1u64..10_000) {
            let s = Some(Duration::from_millis(ms));
            prop_assert!(retry_after(q + 1, limit, s, Duration::ZERO) >= retry_after(q, limit, s, Duration::ZERO));
        }
    }
}
