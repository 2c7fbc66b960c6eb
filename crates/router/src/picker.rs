//! Where one request goes, pure. Only replicas that serve, are not red and whose load is fresh
//! are candidates; among those with a free place (where the request starts at once), the one with
//! the least work ahead at its own speed (shortest expected delay): a Mac twice as fast drains its
//! line twice as fast, so it takes about twice the work. The router's own requests on their way
//! to a Mac (claimed at dispatch, before the agent reports them) count as load, so simultaneous
//! arrivals do not all pick the Mac that looked emptiest a moment ago. When every replica is at
//! its admission limit the request is held (late binding: it goes to the first Mac with room),
//! never queued at a Mac behind a line whose speed the router can only guess.

use std::time::Duration;

/// How stale a replica's load may be before it counts as saturated: agents send it every 100 ms
/// while it moves and at least every 300 ms when it does not, so 900 ms of silence means the
/// agent (or its host) has stopped, and a Mac that stops is out of the picker within a second
/// of its last report, with 500 ms to spare for a busy host's late heartbeat.
pub const STALE_AFTER: Duration = Duration::from_millis(900);

/// One replica as the picker sees it when a request arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Serving (or asleep, waking on the next request) and its pulse not red.
    pub serving: bool,
    /// The router's own requests there stopped getting answers (`stall`).
    pub stalled: bool,
    /// Age of the load figures below.
    pub data_age: Duration,
    /// Requests waiting in the agent's admission queue.
    pub queued: u32,
    /// Requests the agent has admitted to the engine and not finished.
    pub in_flight: u32,
    /// Requests this router has sent there that the agent's figures do not show yet, or that
    /// are still running.
    pub claimed: u32,
    /// The agent's admission limit: requests it sends to the engine at once.
    pub limit: u32,
    /// Engine decode time per token, as the agent measured it on real responses; None until it
    /// has seen some.
    pub seconds_per_token: Option<f64>,
}

/// Why a replica was picked, for the `picks_total{reason}` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickReason {
    /// It had a free place: the request starts at once.
    FreePlace,
    /// It was the only replica with room.
    OnlyOneWithRoom,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Send it to the replica at this index of the candidates.
    Dispatch { replica: usize, reason: PickReason },
    /// Every eligible replica is at its limit: hold the request in the router's queue until one
    /// has room.
    Hold,
    /// No replica can serve it at all (none serving, not red, with fresh data).
    NoReplica,
}

impl Candidate {
    fn eligible(&self) -> bool {
        self.serving && !self.stalled && self.data_age <= STALE_AFTER && self.limit > 0
    }

    /// Places the router may still use there: the agent's limit less what is running and what the
    /// router has on its way. A queue at the agent means no place, whatever the counts say.
    fn free_places(&self) -> u32 {
        if self.queued > 0 {
            return 0;
        }
        self.limit.saturating_sub(self.in_flight.max(self.claimed))
    }

    /// How long the replica takes to get through what it holds and this request, in its own time
    /// per token (shortest expected delay: `(held + 1) / speed`). A Mac twice as fast drains twice
    /// the work in the same time, so it takes about twice the requests. A replica without a speed
    /// figure yet counts as the slowest one known, so an unmeasured Mac is not flooded.
    fn work_ahead(&self, slowest_spt: f64) -> f64 {
        let held = self.queued + self.in_flight.max(self.claimed);
        let spt = self.seconds_per_token.filter(|s| s.is_finite() && *s > 0.0).unwrap_or(slowest_spt);
        f64::from(held + 1) * spt
    }
}

/// Picks a replica for one request: among the eligible replicas with a free place (where it starts
/// at once), the one with the least work ahead at its speed; ties to the one with the most free
/// places, then the lowest index (stable).
pub fn pick(candidates: &[Candidate]) -> Pick {
    let eligible: Vec<(usize, &Candidate)> = candidates.iter().enumerate().filter(|(_, c)| c.eligible()).collect();
    if eligible.is_empty() {
        return Pick::NoReplica;
    }
    let slowest = slowest_speed(&eligible);
    let with_room: Vec<&(usize, &Candidate)> = eligible.iter().filter(|(_, c)| c.free_places() > 0).collect();
    if with_room.is_empty() {
        return Pick::Hold;
    }
    let best = with_room.iter().min_by(|(ia, a), (ib, b)| {
        let work = a.work_ahead(slowest).total_cmp(&b.work_ahead(slowest));
        work.then(b.free_places().cmp(&a.free_places())).then(ia.cmp(ib))
    });
    match best {
        Some((replica, _)) => Pick::Dispatch {
            replica: *replica,
            reason: if with_room.len() == 1 { PickReason::OnlyOneWithRoom } else { PickReason::FreePlace },
        },
        None => Pick::Hold,
    }
}

/// The slowest decode time per token among `eligible` that have one: what an unmeasured replica
/// counts as. 1 s when none is measured (then all count alike).
fn slowest_speed(eligible: &[(usize, &Candidate)]) -> f64 {
    eligible
        .iter()
        .filter_map(|(_, c)| c.seconds_per_token)
        .filter(|s| s.is_finite() && *s > 0.0)
        .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))))
        .unwrap_or(1.0)
}

/// Every eligible replica, best first by the same measure (least work ahead at its speed), full or
/// not: the fallback list a gateway goes down when the pick fails to connect.
pub fn ranked(candidates: &[Candidate]) -> Vec<usize> {
    let eligible: Vec<(usize, &Candidate)> = candidates.iter().enumerate().filter(|(_, c)| c.eligible()).collect();
    let slowest = slowest_speed(&eligible);
    let mut order = eligible;
    order.sort_by(|(ia, a), (ib, b)| a.work_ahead(slowest).total_cmp(&b.work_ahead(slowest)).then(ia.cmp(ib)));
    order.into_iter().map(|(i, _)| i).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn mac(in_flight: u32, limit: u32, spt: f64) -> Candidate {
        Candidate {
            serving: true,
            stalled: false,
            data_age: Duration::from_millis(50),
            queued: 0,
            in_flight,
            claimed: 0,
            limit,
            seconds_per_token: Some(spt),
        }
    }

    #[test]
    fn the_fallback_order_is_least_work_first_and_leaves_out_what_cannot_serve() {
        let mut red = mac(0, 4, 0.01);
        red.serving = false;
        let ranked_order = ranked(&[mac(3, 4, 0.01), red, mac(0, 4, 0.04), mac(1, 4, 0.01)]);
        assert_eq!(ranked_order, [3, 0, 2], "(1+1)*0.01 < (3+1)*0.01 < (0+1)*0.04; the red one is out");
    }

    #[test]
    fn the_faster_mac_with_room_takes_the_request() {
        let macs = [mac(0, 4, 0.02), mac(0, 4, 0.01)];
        assert_eq!(pick(&macs), Pick::Dispatch { replica: 1, reason: PickReason::FreePlace });
    }

    #[test]
    fn a_mac_twice_as_fast_takes_about_twice_the_work() {
        let mut macs = [mac(0, 8, 0.01), mac(0, 8, 0.02)];
        for _ in 0..6 {
            let Pick::Dispatch { replica, .. } = pick(&macs) else { panic!("both have room") };
            macs[replica].claimed += 1;
        }
        assert_eq!((macs[0].claimed, macs[1].claimed), (4, 2));
    }

    #[test]
    fn a_red_stale_or_full_mac_is_never_picked() {
        let red = Candidate { serving: false, ..mac(0, 4, 0.001) };
        let stale = Candidate { data_age: Duration::from_secs(2), ..mac(0, 4, 0.001) };
        let stalled = Candidate { stalled: true, ..mac(0, 4, 0.001) };
        let queueing = Candidate { queued: 1, ..mac(1, 4, 0.001) };
        let full = mac(4, 4, 0.001);
        let slow = mac(0, 4, 0.5);
        assert_eq!(
            pick(&[red, stale, stalled, queueing, full, slow]),
            Pick::Dispatch { replica: 5, reason: PickReason::OnlyOneWithRoom }
        );
    }

    #[test]
    fn every_mac_at_its_limit_holds_the_request_and_none_serving_refuses_it() {
        assert_eq!(pick(&[mac(4, 4, 0.01), mac(2, 2, 0.02)]), Pick::Hold);
        assert_eq!(pick(&[Candidate { serving: false, ..mac(0, 4, 0.01) }]), Pick::NoReplica);
        assert_eq!(pick(&[]), Pick::NoReplica);
    }

    #[test]
    fn the_routers_own_claims_spread_simultaneous_arrivals() {
        // Two equal Macs the agents report empty: the first arrival claims a place on one, so the
        // second goes to the other before any report has come back.
        let mut macs = [mac(0, 1, 0.01), mac(0, 1, 0.01)];
        let Pick::Dispatch { replica: first, .. } = pick(&macs) else { panic!("a Mac has room") };
        macs[first].claimed += 1;
        let Pick::Dispatch { replica: second, .. } = pick(&macs) else { panic!("the other Mac has room") };
        assert_ne!(first, second);
        macs[second].claimed += 1;
        assert_eq!(pick(&macs), Pick::Hold);
    }

    fn candidate() -> impl Strategy<Value = Candidate> {
        (
            (any::<bool>(), any::<bool>()),
            0u64..2_000,
            0u32..4,
            0u32..8,
            0u32..8,
            0u32..8,
            proptest::option::of(0.001f64..1.0),
        )
            .prop_map(|((serving, stalled), age_ms, queued, in_flight, claimed, limit, spt)| Candidate {
                serving,
                stalled,
                data_age: Duration::from_millis(age_ms),
                queued,
                in_flight,
                claimed,
                limit,
                seconds_per_token: spt,
            })
    }

    proptest! {
        #[test]
        fn a_pick_always_has_room_and_holds_only_when_none_has(cs in proptest::collection::vec(candidate(), 0..8)) {
            match pick(&cs) {
                Pick::Dispatch { replica, .. } => {
                    let c = &cs[replica];
                    prop_assert!(c.eligible() && c.free_places() > 0, "{c:?}");
                }
                Pick::Hold => {
                    prop_assert!(cs.iter().any(Candidate::eligible));
                    prop_assert!(cs.iter().filter(|c| c.eligible()).all(|c| c.free_places() == 0));
                }
                Pick::NoReplica => prop_assert!(!cs.iter().any(Candidate::eligible)),
            }
        }

        #[test]
        fn among_equal_loads_the_faster_mac_wins(spt_a in 0.001f64..1.0, spt_b in 0.001f64..1.0, busy in 0u32..3) {
            prop_assume!((spt_a - spt_b).abs() > 1e-9);
            let macs = [mac(busy, 4, spt_a), mac(busy, 4, spt_b)];
            let faster = if spt_a < spt_b { 0 } else { 1 };
            prop_assert_eq!(pick(&macs), Pick::Dispatch { replica: faster, reason: PickReason::FreePlace });
        }
    }
}
