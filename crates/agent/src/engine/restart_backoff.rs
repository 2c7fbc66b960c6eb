//! Delays between engine restarts: exponential with jitter (backon), capped, and forgotten once
//! an engine has run stably for a while so an old crash does not slow a new recovery.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff};

#[derive(Debug, Clone, PartialEq)]
pub struct BackoffConfig {
    pub min: Duration,
    pub max: Duration,
    /// Uptime after which the failure count starts again from zero.
    pub stable_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { min: Duration::from_secs(1), max: Duration::from_secs(300), stable_after: Duration::from_secs(600) }
    }
}

pub struct RestartBackoff {
    cfg: BackoffConfig,
    delays: ExponentialBackoff,
    failures: u32,
}

impl RestartBackoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        let delays = Self::build(&cfg);
        Self { cfg, delays, failures: 0 }
    }

    fn build(cfg: &BackoffConfig) -> ExponentialBackoff {
        metalkube_runtime::backoff(cfg.min, cfg.max).without_max_times().build()
    }

    /// Records a failure of an engine that ran for `uptime` and returns how long to wait.
    pub fn next_delay(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.cfg.stable_after {
            self.reset();
        }
        self.failures += 1;
        self.delays.next().unwrap_or(self.cfg.max)
    }

    /// The delay before a restart that is not the engine's failure (a client's request crashed
    /// it): the shortest, and the failure count unchanged.
    pub fn first_delay(&self) -> Duration {
        self.cfg.min
    }

    /// Failures since the last stable run.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.delays = Self::build(&self.cfg);
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BackoffConfig {
        BackoffConfig {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
            stable_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn grows_is_capped_and_resets_after_a_stable_run() {
        let mut b = RestartBackoff::new(cfg());
        let delays: Vec<_> = (0..8).map(|_| b.next_delay(Duration::ZERO)).collect();
        // Jitter adds up to one delay on top, so compare lower bounds.
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] < Duration::from_millis(201), "{delays:?}");
        assert!(delays[3] >= Duration::from_millis(800), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(4)), "{delays:?}");
        assert_eq!(b.failures(), 8);
        let after_stable = b.next_delay(Duration::from_secs(11));
        assert_eq!(b.failures(), 1);
        assert!(after_stable < Duration::from_millis(201), "{after_stable:?}");
    }
}
