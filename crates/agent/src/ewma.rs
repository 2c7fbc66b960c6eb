//! An exponentially weighted moving average of seconds, with how many samples made it: the
//! grader's baselines, the admission queue's estimates and the traffic tally's usual decode speed.

use std::time::Duration;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ewma {
    value: f64,
    samples: u32,
}

impl Ewma {
    /// Adds `x` with weight `alpha`; the first sample is the average.
    pub fn add(&mut self, x: f64, alpha: f64) {
        self.value = if self.samples == 0 { x } else { alpha * x + (1.0 - alpha) * self.value };
        self.samples = self.samples.saturating_add(1);
    }

    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// The average; None before the first sample.
    pub fn value(&self) -> Option<f64> {
        (self.samples > 0).then_some(self.value)
    }

    /// The average as a duration; None before the first sample, or for a value no duration holds
    /// (a clock jump, a wild sample): never a panic.
    pub fn duration(&self) -> Option<Duration> {
        self.value().and_then(|v| Duration::try_from_secs_f64(v).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_first_sample_and_weighs_the_next() {
        let mut e = Ewma::default();
        assert_eq!((e.value(), e.duration(), e.samples()), (None, None, 0));
        e.add(1.0, 0.2);
        e.add(2.0, 0.2);
        assert!(e.value().is_some_and(|v| (v - 1.2).abs() < 1e-12), "{e:?}");
        assert_eq!(e.samples(), 2);
    }

    #[test]
    fn estimates_out_of_a_durations_range_are_none_not_a_panic() {
        for wild in [1e300, f64::INFINITY, f64::NAN, -1.0] {
            let mut e = Ewma::default();
            e.add(wild, 0.2);
            assert_eq!(e.duration(), None, "{wild}");
        }
        let mut e = Ewma::default();
        e.add(0.5, 0.2);
        assert_eq!(e.duration(), Some(Duration::from_millis(500)));
    }
}
