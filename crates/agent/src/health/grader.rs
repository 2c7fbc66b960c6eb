//! Pulse grading: a pure state machine. It sees one pulse observation at a time (plus how loaded
//! the model is) and says what grade to publish and whether to sample again or restart.
//!
//! Rules (DESIGN.md, Pulse):
//! - absolute thresholds (yellowAfter, redAfter) and, once a baseline of healthy pulses is
//!   stable, drift relative to it; the worse of the two counts;
//! - a slow pulse is confirmed by an immediate second sample before it counts, and the better
//!   of the two is what counts (the first request after idle can be slow for no bad reason);
//! - saturation is not degradation: a slow pulse while our own load is at its limit, with the
//!   engine's compute time normal, is queueing, not sickness;
//! - `redStreak` confirmed reds restart the engine, and so does a confirmed hang.

use std::time::Duration;

use metalkube_api::{Grade, PulseSpec};

#[derive(Debug, Clone, PartialEq)]
pub struct GraderConfig {
    pub yellow_after: Duration,
    pub red_after: Duration,
    pub red_streak: u32,
    pub drift: Option<DriftConfig>,
    /// Weight of a new healthy pulse in the baseline EWMA.
    pub baseline_alpha: f64,
    /// Healthy pulses needed before drift grading starts.
    pub baseline_min_samples: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DriftConfig {
    pub yellow_factor: f64,
    pub red_factor: f64,
    pub floor: Duration,
}

impl From<&PulseSpec> for GraderConfig {
    fn from(p: &PulseSpec) -> Self {
        Self {
            yellow_after: p.yellow_after.get(),
            red_after: p.red_after.get(),
            red_streak: p.red_streak.max(1),
            drift: p.drift.enabled.then(|| DriftConfig {
                yellow_factor: p.drift.yellow_factor,
                red_factor: p.drift.red_factor,
                floor: p.drift.floor.get(),
            }),
            baseline_alpha: 0.2,
            baseline_min_samples: 5,
        }
    }
}

/// What one pulse returned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observation {
    /// The engine answered: wall time W and, when the engine reported `timings`, compute C.
    Answered { wall: Duration, compute: Option<Duration> },
    /// No answer by the pulse timeout.
    NoAnswer,
    /// An error answer or a broken connection.
    Failed,
}

/// How busy the model is with client traffic when the pulse is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    pub in_flight: u32,
    /// The admission limit; 0 means no limit is known (nothing can be at it).
    pub limit: u32,
    pub queued: u32,
}

impl Load {
    pub fn is_at_limit(&self) -> bool {
        self.queued > 0 || (self.limit > 0 && self.in_flight >= self.limit)
    }
}

/// Why the grader wants a restart (named as a `FaultReason` in metrics and messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartCause {
    PulseRed,
    Hang,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// Take another sample now; this one is not counted until it is confirmed.
    ConfirmNow,
    Restart(RestartCause),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The published grade; None until a first sample has counted.
    pub grade: Option<Grade>,
    pub saturated: bool,
    pub action: Action,
    /// Consecutive confirmed reds so far.
    pub red_streak: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Ewma {
    value: f64,
    samples: u32,
}

impl Ewma {
    fn add(&mut self, x: f64, alpha: f64) {
        self.value = if self.samples == 0 { x } else { alpha * x + (1.0 - alpha) * self.value };
        self.samples = self.samples.saturating_add(1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    raw: Grade,
    hang: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Grader {
    cfg: GraderConfig,
    wall_baseline: Ewma,
    compute_baseline: Ewma,
    pending: Option<Pending>,
    red_streak: u32,
    grade: Option<Grade>,
    saturated: bool,
}

impl Grader {
    pub fn new(cfg: GraderConfig) -> Self {
        Self {
            cfg,
            wall_baseline: Ewma::default(),
            compute_baseline: Ewma::default(),
            pending: None,
            red_streak: 0,
            grade: None,
            saturated: false,
        }
    }

    /// The healthy wall-time baseline, once it is stable enough to grade against.
    pub fn baseline(&self) -> Option<Duration> {
        (self.wall_baseline.samples >= self.cfg.baseline_min_samples)
            .then(|| Duration::try_from_secs_f64(self.wall_baseline.value).ok())
            .flatten()
    }

    pub fn grade(&self) -> Option<Grade> {
        self.grade
    }

    /// Forget everything learned about the engine (a new process starts from scratch).
    pub fn reset(&mut self) {
        *self = Self::new(self.cfg.clone());
    }

    fn absolute(&self, wall: Duration) -> Grade {
        if wall >= self.cfg.red_after {
            Grade::Red
        } else if wall >= self.cfg.yellow_after {
            Grade::Yellow
        } else {
            Grade::Green
        }
    }

    fn relative(&self, wall: Duration) -> Grade {
        let (Some(drift), Some(base)) = (&self.cfg.drift, self.baseline()) else { return Grade::Green };
        if wall < drift.floor || base.is_zero() {
            return Grade::Green;
        }
        let ratio = wall.as_secs_f64() / base.as_secs_f64();
        if ratio >= drift.red_factor {
            Grade::Red
        } else if ratio >= drift.yellow_factor {
            Grade::Yellow
        } else {
            Grade::Green
        }
    }

    fn raw_grade(&self, obs: &Observation) -> Grade {
        match *obs {
            Observation::Answered { wall, .. } => self.absolute(wall).max(self.relative(wall)),
            Observation::NoAnswer | Observation::Failed => Grade::Red,
        }
    }

    /// True when the engine's own compute time is what a healthy engine takes, so a slow wall
    /// time is waiting, not working slowly.
    fn compute_is_normal(&self, compute: Option<Duration>) -> bool {
        let Some(c) = compute else { return false };
        let factor = self.cfg.drift.as_ref().map_or(4.0, |d| d.yellow_factor);
        if self.compute_baseline.samples >= self.cfg.baseline_min_samples {
            c.as_secs_f64() <= factor * self.compute_baseline.value.max(1e-3)
        } else {
            c < self.cfg.yellow_after
        }
    }

    fn verdict(&self, action: Action) -> Verdict {
        Verdict { grade: self.grade, saturated: self.saturated, action, red_streak: self.red_streak }
    }

    pub fn observe(&mut self, obs: Observation, load: Load) -> Verdict {
        let raw = self.raw_grade(&obs);
        let hang = matches!(obs, Observation::NoAnswer);

        if raw == Grade::Green {
            self.pending = None;
            self.red_streak = 0;
            self.grade = Some(Grade::Green);
            self.saturated = false;
            if let Observation::Answered { wall, compute } = obs {
                self.wall_baseline.add(wall.as_secs_f64(), self.cfg.baseline_alpha);
                if let Some(c) = compute {
                    self.compute_baseline.add(c.as_secs_f64(), self.cfg.baseline_alpha);
                }
            }
            return self.verdict(Action::None);
        }

        let Some(first) = self.pending.take() else {
            self.pending = Some(Pending { raw, hang });
            return self.verdict(Action::ConfirmNow);
        };

        let confirmed = first.raw.min(raw);
        let confirmed_hang = first.hang && hang;
        let compute = match obs {
            Observation::Answered { compute, .. } => compute,
            _ => None,
        };
        if !confirmed_hang && load.is_at_limit() && self.compute_is_normal(compute) {
            self.saturated = true;
            self.red_streak = 0;
            self.grade = Some(confirmed.min(Grade::Yellow));
            return self.verdict(Action::None);
        }
        self.saturated = false;
        self.grade = Some(confirmed);
        if confirmed_hang {
            self.red_streak += 1;
            let v = self.verdict(Action::Restart(RestartCause::Hang));
            self.red_streak = 0;
            return v;
        }
        if confirmed == Grade::Red {
            self.red_streak += 1;
            if self.red_streak >= self.cfg.red_streak {
                let v = self.verdict(Action::Restart(RestartCause::PulseRed));
                self.red_streak = 0;
                return v;
            }
        } else {
            self.red_streak = 0;
        }
        self.verdict(Action::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> GraderConfig {
        GraderConfig {
            yellow_after: Duration::from_secs(2),
            red_after: Duration::from_secs(5),
            red_streak: 3,
            drift: Some(DriftConfig { yellow_factor: 4.0, red_factor: 20.0, floor: Duration::from_millis(500) }),
            baseline_alpha: 0.2,
            baseline_min_samples: 5,
        }
    }

    fn ms(ms: u64) -> Observation {
        Observation::Answered { wall: Duration::from_millis(ms), compute: Some(Duration::from_millis(ms)) }
    }

    fn busy() -> Load {
        Load { in_flight: 3, limit: 3, queued: 4 }
    }

    #[test]
    fn fast_pulses_are_green_and_build_a_baseline() {
        let mut g = Grader::new(cfg());
        for _ in 0..5 {
            assert_eq!(g.observe(ms(100), Load::default()).grade, Some(Grade::Green));
        }
        assert_eq!(g.baseline(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn one_slow_pulse_after_idle_is_dismissed_by_its_confirmation() {
        let mut g = Grader::new(cfg());
        g.observe(ms(100), Load::default());
        let v = g.observe(ms(7000), Load::default());
        assert_eq!((v.action, v.grade), (Action::ConfirmNow, Some(Grade::Green)));
        let v = g.observe(ms(120), Load::default());
        assert_eq!((v.action, v.grade, v.red_streak), (Action::None, Some(Grade::Green), 0));
    }

    #[test]
    fn red_streak_confirmed_reds_restart() {
        let mut g = Grader::new(cfg());
        for round in 1..=3 {
            assert_eq!(g.observe(ms(6000), Load::default()).action, Action::ConfirmNow);
            let v = g.observe(ms(6000), Load::default());
            assert_eq!(v.grade, Some(Grade::Red));
            assert_eq!(v.red_streak, round);
            let want = if round == 3 { Action::Restart(RestartCause::PulseRed) } else { Action::None };
            assert_eq!(v.action, want);
        }
    }

    #[test]
    fn a_confirmed_hang_restarts_at_once() {
        let mut g = Grader::new(cfg());
        assert_eq!(g.observe(Observation::NoAnswer, Load::default()).action, Action::ConfirmNow);
        let v = g.observe(Observation::NoAnswer, Load::default());
        assert_eq!(v.action, Action::Restart(RestartCause::Hang));
        assert_eq!(v.grade, Some(Grade::Red));
    }

    #[test]
    fn the_better_sample_counts() {
        let mut g = Grader::new(cfg());
        g.observe(ms(6000), Load::default());
        assert_eq!(g.observe(ms(3000), Load::default()).grade, Some(Grade::Yellow));
    }

    #[test]
    fn drift_against_the_baseline_turns_red_below_the_absolute_threshold() {
        let mut g = Grader::new(cfg());
        for _ in 0..5 {
            g.observe(ms(50), Load::default());
        }
        // 1.2 s is green by the absolute thresholds but 24x the 50 ms baseline.
        g.observe(ms(1200), Load::default());
        assert_eq!(g.observe(ms(1200), Load::default()).grade, Some(Grade::Red));
        // Below the floor, drift does not grade: 300 ms is 6x but noise at this scale.
        assert_eq!(g.observe(ms(300), Load::default()).grade, Some(Grade::Green));
    }

    #[test]
    fn saturation_with_normal_compute_is_not_degradation() {
        let mut g = Grader::new(cfg());
        for _ in 0..5 {
            g.observe(ms(100), Load::default());
        }
        let queued = Observation::Answered { wall: Duration::from_secs(8), compute: Some(Duration::from_millis(110)) };
        for _ in 0..10 {
            g.observe(queued, busy());
            let v = g.observe(queued, busy());
            assert!(v.saturated);
            assert_eq!(v.grade, Some(Grade::Yellow));
            assert_eq!(v.action, Action::None);
        }
    }

    #[test]
    fn slow_compute_under_load_is_still_degradation() {
        let mut g = Grader::new(cfg());
        for _ in 0..5 {
            g.observe(ms(100), Load::default());
        }
        let sick = Observation::Answered { wall: Duration::from_secs(8), compute: Some(Duration::from_secs(7)) };
        let mut restarted = false;
        for _ in 0..3 {
            g.observe(sick, busy());
            restarted |= g.observe(sick, busy()).action == Action::Restart(RestartCause::PulseRed);
        }
        assert!(restarted);
    }

    fn observation() -> impl Strategy<Value = Observation> {
        prop_oneof![
            8 => (0u64..12_000, proptest::option::of(0u64..12_000)).prop_map(|(w, c)| Observation::Answered {
                wall: Duration::from_millis(w),
                compute: c.map(Duration::from_millis)
            }),
            1 => Just(Observation::NoAnswer),
            1 => Just(Observation::Failed),
        ]
    }

    fn load() -> impl Strategy<Value = Load> {
        (0u32..5, 0u32..5, 0u32..3).prop_map(|(in_flight, limit, queued)| Load { in_flight, limit, queued })
    }

    proptest! {
        /// A restart needs evidence: at least redStreak confirmed reds (two samples each) or a
        /// hang seen twice in a row.
        #[test]
        fn restarts_only_after_enough_consecutive_bad_samples(obs in proptest::collection::vec((observation(), load()), 1..200)) {
            let mut g = Grader::new(cfg());
            let mut non_green_run = 0u32;
            let mut hang_run = 0u32;
            for (o, l) in obs {
                let raw = g.raw_grade(&o);
                non_green_run = if raw == Grade::Green { 0 } else { non_green_run + 1 };
                hang_run = if o == Observation::NoAnswer { hang_run + 1 } else { 0 };
                match g.observe(o, l).action {
                    Action::Restart(RestartCause::PulseRed) => prop_assert!(non_green_run >= 2 * cfg().red_streak),
                    Action::Restart(RestartCause::Hang) => prop_assert!(hang_run >= 2),
                    _ => {}
                }
            }
        }

        /// A single bad sample between good ones never changes the published grade.
        #[test]
        fn isolated_outliers_never_publish(bad in observation(), good_ms in 0u64..1000, n in 1usize..20) {
            let mut g = Grader::new(cfg());
            for _ in 0..n {
                g.observe(ms(good_ms), Load::default());
            }
            let v = g.observe(bad, Load::default());
            prop_assert_ne!(v.grade, Some(Grade::Red));
            prop_assert!(!matches!(v.action, Action::Restart(_)));
            let v = g.observe(ms(good_ms), Load::default());
            prop_assert_eq!(v.grade, Some(Grade::Green));
        }

        /// While busy with normal compute, nothing the wall clock says restarts the engine.
        #[test]
        fn saturation_never_restarts(walls in proptest::collection::vec(0u64..12_000, 1..100)) {
            let mut g = Grader::new(cfg());
            for _ in 0..5 {
                g.observe(ms(100), Load::default());
            }
            for w in walls {
                let o = Observation::Answered { wall: Duration::from_millis(w), compute: Some(Duration::from_millis(100)) };
                let v = g.observe(o, busy());
                prop_assert!(!matches!(v.action, Action::Restart(_)));
                prop_assert_ne!(v.grade, Some(Grade::Red));
            }
        }
    }
}
