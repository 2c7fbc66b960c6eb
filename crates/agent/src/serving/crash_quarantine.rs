//! Requests that were in the engine when it crashed. The port refuses every input known to
//! crash the pinned llama-server; for the ones nobody knows yet, the crash itself is the
//! evidence. The requests in the engine at that moment are suspects, named in the log with
//! their client; a request that was alone in the engine when it crashed, or a suspect of two
//! crashes, is quarantined: the same body is refused for an hour, so a client repeating it
//! cannot hold the model down. A pure state machine; the proxy feeds it and asks it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a quarantined body stays refused.
pub const QUARANTINE: Duration = Duration::from_secs(3600);
/// Bodies remembered at once (suspects and quarantined together): the oldest go first.
const REMEMBERED: usize = 256;

/// A request body's SHA-256.
pub type BodyDigest = [u8; 32];

#[derive(Debug, Default)]
pub struct CrashQuarantine {
    /// Crashes each suspect body was in the engine for, and when it was last seen in one.
    suspects: HashMap<BodyDigest, (u32, Instant)>,
    /// Refused bodies and since when.
    quarantined: HashMap<BodyDigest, Instant>,
}

impl CrashQuarantine {
    /// The engine crashed with these bodies in it. Returns the ones now quarantined.
    pub fn crashed_with(&mut self, bodies: &[BodyDigest], now: Instant) -> Vec<BodyDigest> {
        // The same body sent twice is one suspect, not two crashes' worth of evidence.
        let mut bodies = bodies.to_vec();
        bodies.sort_unstable();
        bodies.dedup();
        let mut quarantined = Vec::new();
        for digest in &bodies {
            let seen = self.suspects.entry(*digest).or_insert((0, now));
            *seen = (seen.0 + 1, now);
            if bodies.len() == 1 || seen.0 >= 2 {
                self.suspects.remove(digest);
                self.quarantined.insert(*digest, now);
                quarantined.push(*digest);
            }
        }
        self.forget_oldest();
        quarantined
    }

    /// Whether a body is refused now.
    pub fn refuses(&mut self, digest: &BodyDigest, now: Instant) -> bool {
        match self.quarantined.get(digest) {
            Some(since) if now.duration_since(*since) < QUARANTINE => true,
            Some(_) => {
                self.quarantined.remove(digest);
                false
            }
            None => false,
        }
    }

    /// Suspects go first, oldest first; then the oldest quarantined bodies.
    fn forget_oldest(&mut self) {
        while self.suspects.len() + self.quarantined.len() > REMEMBERED {
            if let Some(d) = self.suspects.iter().min_by_key(|(_, (_, at))| *at).map(|(d, _)| *d) {
                self.suspects.remove(&d);
            } else if let Some(d) = self.quarantined.iter().min_by_key(|(_, at)| **at).map(|(d, _)| *d) {
                self.quarantined.remove(&d);
            } else {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body(n: u8) -> BodyDigest {
        [n; 32]
    }

    #[test]
    fn a_request_alone_in_a_crash_is_quarantined_for_an_hour() {
        let mut q = CrashQuarantine::default();
        let t0 = Instant::now();
        assert_eq!(q.crashed_with(&[body(1)], t0), vec![body(1)]);
        assert!(q.refuses(&body(1), t0 + Duration::from_secs(10)));
        assert!(!q.refuses(&body(2), t0));
        assert!(!q.refuses(&body(1), t0 + QUARANTINE), "an hour later it is let through again");
    }

    #[test]
    fn requests_sharing_a_crash_are_suspects_until_a_second_one() {
        let mut q = CrashQuarantine::default();
        let t0 = Instant::now();
        assert!(q.crashed_with(&[body(1), body(2)], t0).is_empty());
        assert!(!q.refuses(&body(1), t0), "one shared crash proves nothing about either");
        assert_eq!(q.crashed_with(&[body(1), body(3)], t0), vec![body(1)]);
        assert!(q.refuses(&body(1), t0) && !q.refuses(&body(2), t0) && !q.refuses(&body(3), t0));
    }

    #[test]
    fn the_same_body_twice_in_one_crash_is_one_suspect() {
        let mut q = CrashQuarantine::default();
        let t0 = Instant::now();
        assert!(q.crashed_with(&[body(1), body(1), body(2)], t0).is_empty());
        assert!(!q.refuses(&body(1), t0));
        assert_eq!(q.crashed_with(&[body(3), body(3)], t0), vec![body(3)], "alone, though sent twice");
    }

    proptest! {
        /// However many crashes with however many bodies, the memory stays bounded.
        #[test]
        fn memory_is_bounded(crashes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..4), 0..400)) {
            let mut q = CrashQuarantine::default();
            let t0 = Instant::now();
            for (i, bodies) in crashes.iter().enumerate() {
                let digests: Vec<BodyDigest> = bodies.iter().map(|b| { let mut d = [0u8; 32]; d[0] = *b; d[1] = (i % 251) as u8; d }).collect();
                q.crashed_with(&digests, t0 + Duration::from_millis(i as u64));
                prop_assert!(q.suspects.len() + q.quarantined.len() <= REMEMBERED);
            }
        }
    }
}
