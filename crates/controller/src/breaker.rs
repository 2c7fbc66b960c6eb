//! A circuit breaker per agent: after consecutive failures the controller stops calling an
//! agent for a cool-down, then lets one probe through. A dead Mac then costs one fast refusal per
//! reconcile instead of a full deadline each time.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The `metalkube_controller_agent_circuit_state` gauge value.
    pub fn level(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// May a call go out now? `Err` holds how long until the next probe.
pub type Admit = Result<(), Duration>;

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self { threshold: threshold.max(1), cooldown, failures: 0, open_until: None, probing: false }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until || self.probing => {
                if self.probing {
                    BreakerState::HalfOpen
                } else {
                    BreakerState::Open
                }
            }
            Some(_) => BreakerState::HalfOpen,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.open_until {
            None => Ok(()),
            Some(until) if now < until => Err(until - now),
            // Cool-down over: one probe at a time.
            Some(_) if self.probing => Err(self.cooldown),
            Some(_) => {
                self.probing = true;
                Ok(())
            }
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.probing || self.failures >= self.threshold {
            self.open_until = Some(now + self.cooldown);
        }
        self.probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(2);

    #[test]
    fn opens_after_threshold_then_probes_once_after_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, COOL);
        for _ in 0..2 {
            assert!(b.admit(t0).is_ok());
            b.failure(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.admit(t0 + Duration::from_millis(500)), Err(Duration::from_millis(1500)));
        let later = t0 + COOL;
        assert!(b.admit(later).is_ok(), "one probe after the cool-down");
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.admit(later).is_err(), "a second caller waits for the probe");
        b.failure(later);
        assert_eq!(b.state(later), BreakerState::Open, "a failed probe opens again at once");
        let again = later + COOL;
        assert!(b.admit(again).is_ok());
        b.success();
        assert_eq!(b.state(again), BreakerState::Closed);
        assert!(b.admit(again).is_ok());
    }

    #[test]
    fn a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, COOL);
        b.failure(t0);
        b.success();
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
    }
}
