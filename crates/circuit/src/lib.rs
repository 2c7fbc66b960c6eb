//! A circuit breaker: after consecutive failures it opens and calls fail fast; after a
//! cool-down one probe is let through, and its outcome closes or re-opens the circuit. The
//! agent puts one in front of each engine (refused connections, 5xx), the controller one in
//! front of each agent (transport failures). Pure: time comes in as arguments.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    /// The name reports use: `closed`, `half_open`, `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::HalfOpen => "half_open",
            CircuitState::Open => "open",
        }
    }

    /// The value of the `*_circuit_state` gauges: 0 closed, 1 half-open, 2 open.
    pub fn level(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    state: CircuitState,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            state: CircuitState::Closed,
            opened_at: None,
            probe_in_flight: false,
        }
    }

    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Time left until a probe may go, while open.
    pub fn remaining_cooldown(&self, now: Instant) -> Option<Duration> {
        let opened = self.opened_at?;
        (self.state == CircuitState::Open).then(|| self.cooldown.saturating_sub(now.duration_since(opened)))
    }

    /// May a request go to the engine now? In half-open state only one probe goes at a time.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::Open => {
                if self.opened_at.is_some_and(|t| now.duration_since(t) >= self.cooldown) {
                    self.state = CircuitState::HalfOpen;
                    self.probe_in_flight = true;
                    true
                } else {
                    false
                }
            }
            CircuitState::HalfOpen => {
                if self.probe_in_flight {
                    false
                } else {
                    self.probe_in_flight = true;
                    true
                }
            }
        }
    }

    pub fn on_success(&mut self) {
        self.failures = 0;
        self.state = CircuitState::Closed;
        self.opened_at = None;
        self.probe_in_flight = false;
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.failures += 1;
        self.probe_in_flight = false;
        if self.state == CircuitState::HalfOpen || self.failures >= self.threshold {
            self.state = CircuitState::Open;
            self.opened_at = Some(now);
        }
    }

    /// A fresh start (a new engine process): what came before says nothing about it.
    pub fn reset(&mut self) {
        self.on_success();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cooldown() {
        let t0 = Instant::now();
        let mut c = CircuitBreaker::new(3, Duration::from_secs(1));
        c.on_failure(t0);
        c.on_failure(t0);
        c.on_success();
        c.on_failure(t0);
        c.on_failure(t0);
        assert_eq!(c.state(), CircuitState::Closed, "failures must be consecutive");
        c.on_failure(t0);
        assert_eq!(c.state(), CircuitState::Open);
        assert!(!c.allow(t0 + Duration::from_millis(500)));
        assert!(c.allow(t0 + Duration::from_secs(1)), "the probe goes");
        assert_eq!(c.state(), CircuitState::HalfOpen);
        assert!(!c.allow(t0 + Duration::from_secs(1)), "one probe at a time");
        c.on_failure(t0 + Duration::from_secs(1));
        assert_eq!(c.state(), CircuitState::Open, "a failed probe re-opens");
        assert!(c.allow(t0 + Duration::from_secs(2)));
        c.on_success();
        assert_eq!(c.state(), CircuitState::Closed);
        assert!(c.allow(t0 + Duration::from_secs(2)));
    }
}
