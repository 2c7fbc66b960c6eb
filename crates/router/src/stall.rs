//! Whether a replica has stopped answering, as the router sees it through its own requests, pure.
//! An agent that stops altogether stops its load heartbeat and goes stale within a second; an
//! engine that stops (a SIGSTOPped process, a wedged loop) leaves its agent reporting "serving"
//! until the pulse turns red, several seconds later. The router does not wait for that: a replica
//! whose streams, already flowing, all went silent for `STALL_AFTER` is out of the picker until a
//! byte arrives again. A request still waiting for its first byte is not enough on its own (a long
//! prompt may take seconds, and a busy Mac queues), unless it has waited far longer than that
//! replica usually takes and no answer of the router's there has had a byte for `STALL_AFTER`:
//! a Mac still sending tokens to someone is busy, not stopped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Silence on every flowing stream of a replica for this long marks it stalled: tokens come every
/// few tens of milliseconds while an engine works.
pub const STALL_AFTER: Duration = Duration::from_secs(1);
/// A first byte that takes this many times the replica's usual time to first byte (and at least
/// `STALL_AFTER`) marks it stalled too.
pub const FIRST_BYTE_FACTOR: f64 = 4.0;
/// A replica found stalled stays out this long at most without news: once the router's requests
/// there have been tried elsewhere nothing of its own is left to show whether it is back, so it
/// waits for a byte, for its agent to report it serving again after not serving (the pulse saw it
/// stop and come back), or for this much time, after which one request finds out.
pub const STALL_COOLDOWN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct InFlight {
    sent: Instant,
    /// When the last byte of its answer came, once one has.
    last_byte: Option<Instant>,
}

/// The router's own requests on one replica.
#[derive(Debug, Default)]
pub struct StallWatch {
    requests: BTreeMap<u64, InFlight>,
    /// The replica's recent time to first byte, a moving average.
    usual_first_byte: Option<Duration>,
    /// Since when the replica has been out for stalling.
    out_since: Option<Instant>,
    /// The last byte of any of the router's answers there, ended ones included.
    last_byte_any: Option<Instant>,
}

impl StallWatch {
    pub fn sent(&mut self, id: u64, now: Instant) {
        self.requests.insert(id, InFlight { sent: now, last_byte: None });
    }

    /// Part of the answer to request `id` arrived.
    pub fn byte(&mut self, id: u64, now: Instant) {
        let Some(r) = self.requests.get_mut(&id) else { return };
        if r.last_byte.is_none() {
            let first = now.saturating_duration_since(r.sent);
            self.usual_first_byte = Some(match self.usual_first_byte {
                Some(u) => u.mul_f64(0.8) + first.mul_f64(0.2),
                None => first,
            });
        }
        r.last_byte = Some(now);
        self.last_byte_any = Some(now);
        self.out_since = None;
    }

    /// Its agent reported it serving after it was not: whatever stalled it has been seen to end.
    pub fn recovered(&mut self) {
        self.out_since = None;
    }

    /// Whether the replica is out for stalling at `now`: stalled by what the router's requests
    /// there show, or found so earlier and not yet heard from (up to `STALL_COOLDOWN`).
    pub fn out(&mut self, now: Instant) -> bool {
        if self.stalled(now) {
            self.out_since.get_or_insert(now);
            return true;
        }
        match self.out_since {
            Some(since) if now.saturating_duration_since(since) < STALL_COOLDOWN => true,
            Some(_) => {
                self.out_since = None;
                false
            }
            None => false,
        }
    }

    pub fn ended(&mut self, id: u64) {
        self.requests.remove(&id);
    }

    /// The replica has stopped answering the router's requests.
    pub fn stalled(&self, now: Instant) -> bool {
        let mut flowing = self.requests.values().filter_map(|r| r.last_byte).peekable();
        let silent_streams =
            flowing.peek().is_some() && flowing.all(|b| now.saturating_duration_since(b) >= STALL_AFTER);
        let first_byte_limit =
            self.usual_first_byte.map_or(STALL_AFTER, |u| u.mul_f64(FIRST_BYTE_FACTOR).max(STALL_AFTER));
        let silent_replica = self.last_byte_any.is_none_or(|b| now.saturating_duration_since(b) >= STALL_AFTER);
        let overdue_first_byte = self.usual_first_byte.is_some()
            && silent_replica
            && self
                .requests
                .values()
                .any(|r| r.last_byte.is_none() && now.saturating_duration_since(r.sent) >= first_byte_limit);
        silent_streams || overdue_first_byte
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn flowing_streams_that_all_go_silent_mark_the_replica_stalled() {
        let t = Instant::now();
        let mut w = StallWatch::default();
        w.sent(1, t);
        w.sent(2, t);
        w.byte(1, t + ms(100));
        w.byte(2, t + ms(150));
        assert!(!w.stalled(t + ms(900)));
        w.byte(2, t + ms(900));
        assert!(!w.stalled(t + ms(1_500)), "one stream still spoke within the window");
        assert!(w.stalled(t + ms(1_950)), "every flowing stream silent for a second");
        w.byte(1, t + ms(2_000));
        assert!(!w.stalled(t + ms(2_100)), "a byte brings it back");
    }

    #[test]
    fn a_long_first_byte_alone_is_no_stall_until_far_past_the_usual() {
        let t = Instant::now();
        let mut w = StallWatch::default();
        w.sent(1, t);
        assert!(!w.stalled(t + ms(5_000)), "no usual time known: a long prompt may take this long");
        w.byte(1, t + ms(500));
        w.ended(1);
        w.sent(2, t + ms(1_000));
        assert!(!w.stalled(t + ms(2_900)), "within 4x the usual 500 ms");
        assert!(w.stalled(t + ms(3_000)), "2 s without a first byte where 0.5 s is usual");
    }

    #[test]
    fn a_late_first_byte_on_a_mac_still_sending_tokens_is_a_busy_mac_not_a_stalled_one() {
        let t = Instant::now();
        let mut w = StallWatch::default();
        w.sent(1, t);
        w.byte(1, t + ms(100));
        w.ended(1);
        // A long answer flows while a new request waits behind it for its first byte.
        w.sent(2, t + ms(200));
        w.byte(2, t + ms(300));
        w.sent(3, t + ms(300));
        for tick in 1..=30 {
            w.byte(2, t + ms(300 + tick * 100));
            assert!(!w.out(t + ms(350 + tick * 100)), "tokens still come: busy, not stalled (at {tick})");
        }
        // Then everything goes quiet: the waiting request is overdue and the Mac silent.
        assert!(w.out(t + ms(3_300) + STALL_AFTER), "silent and overdue: stalled");
    }

    #[test]
    fn a_stalled_replica_stays_out_after_its_requests_leave_until_news_or_the_cooldown() {
        let t = Instant::now();
        let mut w = StallWatch::default();
        w.sent(1, t);
        w.byte(1, t + ms(50));
        assert!(w.out(t + ms(1_100)), "silent for a second");
        w.ended(1);
        assert!(w.out(t + ms(1_200)), "its request was tried elsewhere: still out");
        assert!(w.out(t + ms(20_000)));
        assert!(!w.out(t + ms(1_100) + STALL_COOLDOWN), "after the cooldown one request may find out");
        w.sent(2, t + ms(40_000));
        w.byte(2, t + ms(40_010));
        assert!(w.out(t + ms(41_100)));
        w.recovered();
        w.ended(2);
        assert!(!w.out(t + ms(41_200)), "its agent saw it serve again");
    }

    #[test]
    fn a_replica_with_nothing_of_ours_is_not_stalled() {
        let t = Instant::now();
        let mut w = StallWatch::default();
        w.sent(1, t);
        w.byte(1, t + ms(10));
        w.ended(1);
        assert!(!w.stalled(t + ms(60_000)));
    }
}
