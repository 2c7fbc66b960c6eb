//! The router's own requests per replica: claimed atomically when a request is dispatched and
//! given back when its answer ends (or the request is dropped), so that simultaneous arrivals
//! see each other before any agent report does. The picker counts claims as load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// One replica's count of requests this router has on it, and of those that ended since its
/// agent last reported (the report still counts them as running).
#[derive(Debug, Default)]
pub struct Claims(AtomicU32, AtomicU32);

impl Claims {
    /// Requests this router has on the replica now.
    pub fn current(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }

    /// Requests of this router there that ended since the agent's last report: the report's
    /// in-flight figure still holds them, so that many of its places are free already.
    pub fn ended_since_report(&self) -> u32 {
        self.1.load(Ordering::Acquire)
    }

    /// The agent reported: its figures now show what ended before.
    pub fn reported(&self) {
        self.1.store(0, Ordering::Release);
    }

    /// Takes one of `limit` places, unless all are taken: the check and the count are one atomic
    /// step, so two requests racing for the last place cannot both get it.
    pub fn try_claim(self: &Arc<Self>, limit: u32) -> Option<Claim> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Claim(self.clone()))
    }
}

/// A place on a replica, held while the request runs; given back when dropped.
#[derive(Debug)]
pub struct Claim(Arc<Claims>);

impl Drop for Claim {
    fn drop(&mut self) {
        // Never below zero: every Claim was counted once by `try_claim`.
        let _ = self.0.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.0.1.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_up_to_the_limit_and_given_back_on_drop() {
        let claims = Arc::new(Claims::default());
        let a = claims.try_claim(2);
        let b = claims.try_claim(2);
        assert!(a.is_some() && b.is_some());
        assert!(claims.try_claim(2).is_none(), "the limit holds");
        assert_eq!(claims.current(), 2);
        drop(a);
        assert_eq!(claims.current(), 1);
        assert!(claims.try_claim(2).is_some(), "a place given back is free again");
        assert_eq!(claims.ended_since_report(), 2, "a and the claim just dropped ended");
        claims.reported();
        assert_eq!(claims.ended_since_report(), 0, "the agent's next report counts them");
    }

    #[test]
    fn racing_threads_never_take_more_places_than_the_limit() {
        let claims = Arc::new(Claims::default());
        let taken: Vec<Option<Claim>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16).map(|_| s.spawn(|| claims.try_claim(5))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(None)).collect()
        });
        assert_eq!(taken.iter().filter(|c| c.is_some()).count(), 5);
        assert_eq!(claims.current(), 5);
        drop(taken);
        assert_eq!(claims.current(), 0);
    }
}
