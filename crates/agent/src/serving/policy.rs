//! Admission decisions as pure functions: who goes to the engine now, who waits, who is turned
//! away and when they should come back.

use std::time::Duration;

use metalkube_api::Rejection;

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
    /// Places in use: engine tasks of the requests admitted and not finished.
    pub in_flight: u32,
    pub queued: u32,
    pub limit: u32,
    pub depth: u32,
    /// Places the new request needs: the engine tasks it makes (prompts × completions; 1 for
    /// most). Never more than `limit`: a bigger request is refused before it gets here.
    pub wants: u32,
}

pub fn decide(s: Snapshot) -> Decision {
    if !s.engine_ready {
        return Decision::Reject(Rejection::NotReady);
    }
    if !s.circuit_allows {
        return Decision::Reject(Rejection::CircuitOpen);
    }
    // FIFO: nobody overtakes a queued request, even when a slot has just been freed.
    if s.queued == 0 && u64::from(s.in_flight) + u64::from(s.wants.max(1)) <= u64::from(s.limit) {
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
    const LONGEST: Duration = Duration::from_secs(600);
    let estimate = match service {
        // In f64, so no queue length or service time overflows.
        Some(s) => Duration::try_from_secs_f64(s.as_secs_f64() * (f64::from(queued) + 1.0) / f64::from(limit.max(1)))
            .unwrap_or(LONGEST),
        None => fallback,
    };
    estimate.clamp(Duration::from_secs(1), LONGEST)
}

/// `Retry-After` is whole seconds, rounded up so a client never comes back too early.
pub fn retry_after_header(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snap(in_flight: u32, queued: u32) -> Snapshot {
        Snapshot { engine_ready: true, circuit_allows: true, in_flight, queued, limit: 3, depth: 2, wants: 1 }
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
        fn never_dispatches_past_the_limit_nor_queues_past_the_depth(in_flight in 0u32..10, queued in 0u32..10, limit in 1u32..5, depth in 0u32..5, wants in 1u32..5) {
            let s = Snapshot { engine_ready: true, circuit_allows: true, in_flight, queued, limit, depth, wants };
            match decide(s) {
                Decision::Dispatch => prop_assert!(in_flight + wants <= limit && queued == 0),
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

    /// Any duration, the extremes (zero, a nanosecond, `Duration::MAX`) often: service times
    /// are measured, fallbacks computed, and neither is bounded by its type.
    fn any_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::from_nanos(1)),
            Just(Duration::MAX),
            (0u64..100_000).prop_map(Duration::from_millis),
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ]
    }

    /// Queue lengths and limits over all of u32, the extremes often.
    fn any_count() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0), Just(1), Just(u32::MAX), Just(u32::MAX - 1), 0u32..100, any::<u32>()]
    }

    proptest! {
        /// Whatever the queue, the limit, the service time or the fallback, a refused client is
        /// told to come back in 1 s to 10 min: never 0 (a retry storm), never absurd, and the
        /// arithmetic neither panics nor wraps at u32::MAX waiting or a `Duration::MAX`
        /// service time.
        #[test]
        fn retry_after_is_one_second_to_ten_minutes_for_any_input(
            queued in any_count(),
            limit in any_count(),
            service in prop::option::of(any_duration()),
            fallback in any_duration(),
        ) {
            let d = retry_after(queued, limit, service, fallback);
            prop_assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(600), "{d:?}");
            prop_assert!((1..=600).contains(&retry_after_header(d)));
        }

        /// A longer queue never means an earlier retry, and more capacity never a later one,
        /// at any size: a client further back must not be told to come back first.
        #[test]
        fn retry_after_never_falls_as_the_queue_grows_nor_rises_with_capacity(
            queues in (any_count(), any_count()),
            limits in (any_count(), any_count()),
            service in any_duration(),
        ) {
            let (short, long) = (queues.0.min(queues.1), queues.0.max(queues.1));
            let (few, many) = (limits.0.min(limits.1), limits.0.max(limits.1));
            let s = Some(service);
            prop_assert!(retry_after(short, few, s, Duration::ZERO) <= retry_after(long, few, s, Duration::ZERO));
            prop_assert!(retry_after(short, many, s, Duration::ZERO) <= retry_after(short, few, s, Duration::ZERO));
        }

        /// The header is the duration rounded up to whole seconds (a client never comes back
        /// too early, and by less than a second late), for any duration, `Duration::MAX`
        /// included.
        #[test]
        fn the_retry_after_header_rounds_up_to_whole_seconds_for_any_duration(d in any_duration()) {
            let secs = retry_after_header(d);
            let nanos = d.as_nanos();
            prop_assert!(u128::from(secs) * 1_000_000_000 >= nanos || secs == u64::MAX, "{d:?} -> {secs}");
            prop_assert!(u128::from(secs) * 1_000_000_000 < nanos + 1_000_000_000, "{d:?} -> {secs}");
        }

        /// `decide` over every state, u32 extremes included: it dispatches only below the
        /// limit with nobody waiting, enqueues only below the depth, refuses for the engine or
        /// the breaker first, and never turns away or queues a request it could dispatch.
        #[test]
        fn decide_dispatches_only_below_the_limit_and_enqueues_only_below_the_depth_at_any_size(
            engine_ready in any::<bool>(),
            circuit_allows in any::<bool>(),
            in_flight in any_count(),
            queued in any_count(),
            limit in any_count(),
            depth in any_count(),
        ) {
            let s = Snapshot { engine_ready, circuit_allows, in_flight, queued, limit, depth, wants: 1 };
            let open = engine_ready && circuit_allows;
            match decide(s) {
                Decision::Dispatch => prop_assert!(open && queued == 0 && in_flight < limit),
                Decision::Enqueue => prop_assert!(open && queued < depth && !(queued == 0 && in_flight < limit)),
                Decision::Reject(Rejection::NotReady) => prop_assert!(!engine_ready),
                Decision::Reject(Rejection::CircuitOpen) => prop_assert!(engine_ready && !circuit_allows),
                Decision::Reject(Rejection::QueueFull) => prop_assert!(open && queued >= depth && !(queued == 0 && in_flight < limit)),
                Decision::Reject(other) => prop_assert!(false, "decide never refuses with {other:?}"),
            }
        }

        /// Driven by any sequence of arrivals and completions (the way the proxy applies its
        /// decisions: a completion hands its slot to the head of the queue), the number in
        /// flight never exceeds the limit and the queue never exceeds its depth.
        #[test]
        fn in_flight_and_queue_stay_within_limit_and_depth_over_any_sequence(
            limit in prop_oneof![0u32..6, Just(u32::MAX)],
            depth in prop_oneof![0u32..6, Just(u32::MAX)],
            arrivals in prop::collection::vec(any::<bool>(), 0..200),
        ) {
            let (mut in_flight, mut queued) = (0u32, 0u32);
            for arrival in arrivals {
                if arrival {
                    let s = Snapshot { engine_ready: true, circuit_allows: true, in_flight, queued, limit, depth, wants: 1 };
                    match decide(s) {
                        Decision::Dispatch => in_flight += 1,
                        Decision::Enqueue => queued += 1,
                        Decision::Reject(_) => {}
                    }
                } else if in_flight > 0 {
                    in_flight -= 1;
                    if queued > 0 {
                        queued -= 1;
                        in_flight += 1;
                    }
                }
                prop_assert!(in_flight <= limit && queued <= depth, "{in_flight} in flight, {queued} queued");
            }
        }
    }
}
