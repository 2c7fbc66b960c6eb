//! What client traffic says about the engine, for the pulse: the responses that completed since
//! the supervisor last asked, split by whether the engine decoded them at its usual speed. When
//! real requests just went through at normal speed, a synthetic pulse would only repeat it.

use std::time::{Duration, Instant};

use crate::ewma::Ewma;
use crate::model::TrafficEvidence;

/// A response decoding slower than this many times the healthy per-token time is slow (the same
/// factor as the pulse's default drift yellow).
pub const SLOW_FACTOR: f64 = 4.0;
/// Responses that seed the healthy per-token time before any is judged.
const SEED_SAMPLES: u32 = 3;
const ALPHA: f64 = 0.2;

/// Counts responses as they finish, and learns the healthy per-token decode time from the
/// normal ones only (slow ones must not drag it along).
#[derive(Debug, Default, Clone)]
pub struct TrafficTally {
    since_taken: TrafficEvidence,
    healthy_per_token: Ewma,
}

impl TrafficTally {
    /// A response completed; `per_token` is its decode time per generated token, if known.
    pub fn completed(&mut self, per_token: Option<Duration>) {
        let Some(x) = per_token.map(|d| d.as_secs_f64()) else {
            self.since_taken.unmeasured += 1;
            return;
        };
        let usual = self.healthy_per_token.value().filter(|_| self.healthy_per_token.samples() >= SEED_SAMPLES);
        let Some(usual) = usual else {
            self.healthy_per_token.add(x, ALPHA);
            self.since_taken.unmeasured += 1;
            return;
        };
        if x <= SLOW_FACTOR * usual {
            self.healthy_per_token.add(x, ALPHA);
            self.since_taken.normal += 1;
            self.since_taken.last_normal = Some(Instant::now());
        } else {
            self.since_taken.slow += 1;
        }
    }

    pub fn stalled(&mut self) {
        self.since_taken.stalled += 1;
    }

    /// What happened since the last call, and start counting again.
    pub fn take(&mut self) -> TrafficEvidence {
        std::mem::take(&mut self.since_taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Option<Duration> {
        Some(Duration::from_millis(v))
    }

    #[test]
    fn nothing_is_judged_until_the_usual_speed_is_known() {
        let mut t = TrafficTally::default();
        for _ in 0..SEED_SAMPLES {
            t.completed(ms(20));
        }
        assert_eq!(t.take(), TrafficEvidence { unmeasured: SEED_SAMPLES, ..Default::default() });
        t.completed(ms(25));
        t.completed(ms(20 * 50));
        t.completed(None);
        t.stalled();
        let e = t.take();
        assert!(e.last_normal.is_some());
        assert_eq!(e, TrafficEvidence { normal: 1, slow: 1, unmeasured: 1, stalled: 1, last_normal: e.last_normal });
        assert_eq!(t.take(), TrafficEvidence::default(), "take starts over");
    }

    proptest! {
        /// Slow responses never teach the tally that slow is usual: after any run of them, a
        /// response at the old speed is still normal and a 50x one still slow.
        #[test]
        fn slow_responses_do_not_move_the_usual_speed(slow in proptest::collection::vec(81u64..100_000, 0..200)) {
            let mut t = TrafficTally::default();
            for _ in 0..10 {
                t.completed(ms(20));
            }
            for s in slow {
                t.completed(ms(s));
            }
            t.take();
            t.completed(ms(20));
            t.completed(ms(1000));
            let e = t.take();
            prop_assert_eq!((e.normal, e.slow, e.unmeasured, e.stalled), (1, 1, 0, 0));
        }
    }
}
