//! Pulse grading: a pure state machine. It sees one pulse observation at a time (plus how loaded
//! the model is) and says what grade to publish and whether to sample again or restart.
//!
//! Rules (DESIGN.md, Pulse):
//! - absolute thresholds (yellowAfter, redAfter) and, once a baseline of healthy pulses is
//!   stable, drift relative to it; the worse of the two counts;
//! - a slow pulse is confirmed by a second sample before it counts, and the better of the two is
//!   what counts (the first request after idle can be slow for no bad reason);
//! - saturation is not degradation: a slow pulse while clients use the engine, with the engine's
//!   compute time normal, is waiting, not sickness (`saturated` when at the admission limit);
//! - a busy host is not a sick engine: when the host explains the slowness (other processes held
//!   the CPUs, memory or IO stalled, heat; `attribution`), drift grades no worse than yellow, the
//!   absolute thresholds still pull readiness (users feel the slowness whatever its cause), and
//!   the red does not count towards a restart (`host` names the cause in the verdict);
//! - `redStreak` confirmed reds the host does not explain restart the engine, and so does a
//!   confirmed hang;
//! - a pulse still unanswered past the red threshold is a red sample already (`Overdue`), and
//!   the confirming sample starts while the first is still out (`RoundPlan`), so readiness falls
//!   within about interval + redAfter + 2 s of a hang, not after two timeouts.

use std::time::Duration;

use metalkube_api::{Grade, PulseSpec};
use metalkube_vitals::attribution::HostCause;
use metalkube_vitals::pulse::Observation;

use crate::ewma::Ewma;
use crate::model::Load;

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

/// When, in one pulse round, the supervisor acts on a pulse that has not answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundPlan {
    /// Start the confirming sample when the first has been out this long: when it can no longer
    /// grade green, or `CONFIRM_START_CAP` if that comes first; starting early keeps confirmation
    /// from doubling the wait.
    pub confirm_after: Duration,
    /// A sample still out this long is red by its own wall time (`Observation::Overdue`).
    pub overdue_after: Duration,
}

/// The confirming sample starts no later than this after the first, whatever `yellowAfter` is, so
/// a hang is seen within interval + redAfter + this.
pub const CONFIRM_START_CAP: Duration = Duration::from_secs(2);

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
    /// The host explained this verdict's slowness (it was graded by the absolute thresholds
    /// alone, and a red did not count towards a restart).
    pub host: Option<HostCause>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    raw: Grade,
    hang: bool,
    host: Option<HostCause>,
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
    host: Option<HostCause>,
    /// The next sample follows a wake from sleep: graded by the absolute thresholds only, and
    /// kept out of the baseline (a reloaded model is not yet the warm engine it was).
    cold_next: bool,
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
            host: None,
            cold_next: false,
        }
    }

    /// The engine just woke from sleep: do not hold its next sample to the warm baseline.
    pub fn expect_cold_sample(&mut self) {
        self.cold_next = true;
    }

    /// The healthy wall-time baseline, once it is stable enough to grade against.
    pub fn baseline(&self) -> Option<Duration> {
        (self.wall_baseline.samples() >= self.cfg.baseline_min_samples).then(|| self.wall_baseline.duration()).flatten()
    }

    /// What the grader holds now, with nothing to do.
    pub fn current(&self) -> Verdict {
        self.verdict(Action::None)
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

    /// The wall time from which a pulse grades at least `grade` (yellow or red): the absolute
    /// threshold, or the drift threshold once a baseline exists, whichever comes first.
    fn threshold(&self, grade: Grade) -> Duration {
        let (absolute, factor) = match grade {
            Grade::Red => (self.cfg.red_after, self.cfg.drift.as_ref().map(|d| d.red_factor)),
            _ => (self.cfg.yellow_after, self.cfg.drift.as_ref().map(|d| d.yellow_factor)),
        };
        if self.cold_next {
            return absolute;
        }
        let drift = match (&self.cfg.drift, self.baseline(), factor) {
            (Some(d), Some(base), Some(f)) if !base.is_zero() => {
                // One microsecond over the product, so rounding never leaves the threshold a
                // hair under the factor it stands for.
                Duration::try_from_secs_f64(base.as_secs_f64() * f)
                    .ok()
                    .map(|t| (t + Duration::from_micros(1)).max(d.floor))
            }
            _ => None,
        };
        drift.map_or(absolute, |t| t.min(absolute))
    }

    /// When to start the confirming sample and when an unanswered one counts as red.
    pub fn round_plan(&self) -> RoundPlan {
        let overdue_after = self.threshold(Grade::Red);
        let confirm_after = self.threshold(Grade::Yellow).min(CONFIRM_START_CAP).min(overdue_after);
        RoundPlan { confirm_after, overdue_after }
    }

    /// Both samples of a round, already counted as overdue, ended with no answer at all: the
    /// same evidence as two timeouts, so the engine is hung and is restarted.
    pub fn confirm_hang(&mut self) -> Verdict {
        self.pending = None;
        self.saturated = false;
        self.host = None;
        self.grade = Some(Grade::Red);
        let v = self.verdict(Action::Restart(RestartCause::Hang));
        self.red_streak = 0;
        v
    }

    /// A sample's grade before confirmation. On a host that explains slowness, drift (a change
    /// against the engine's own quiet-host speed) is at most yellow: it says the model is slower
    /// than usual, not that users wait past the red threshold.
    /// Both samples of a round went unanswered by the timeout, but the engine was seen working
    /// and the host explains the slowness (`cause`): a starved engine, red and not ready, but not
    /// a hang, and no step towards a restart.
    pub fn confirm_starved(&mut self, cause: HostCause) -> Verdict {
        self.pending = None;
        self.saturated = false;
        self.host = Some(cause);
        self.grade = Some(Grade::Red);
        self.red_streak = 0;
        self.verdict(Action::None)
    }

    fn raw_grade(&self, obs: &Observation, host: Option<HostCause>) -> Grade {
        match *obs {
            Observation::Answered { wall, .. } | Observation::Overdue { waited: wall } if self.cold_next => {
                self.absolute(wall)
            }
            Observation::Answered { wall, .. } | Observation::Overdue { waited: wall } if host.is_some() => {
                self.absolute(wall).max(self.relative(wall).min(Grade::Yellow))
            }
            Observation::Answered { wall, .. } | Observation::Overdue { waited: wall } => {
                self.absolute(wall).max(self.relative(wall))
            }
            Observation::NoAnswer | Observation::Failed => Grade::Red,
        }
    }

    /// True when the engine's own compute time is what a healthy engine takes, so a slow wall
    /// time is waiting, not working slowly.
    fn compute_is_normal(&self, compute: Option<Duration>) -> bool {
        let Some(c) = compute else { return false };
        let factor = self.cfg.drift.as_ref().map_or(4.0, |d| d.yellow_factor);
        if let Some(base) =
            self.compute_baseline.value().filter(|_| self.compute_baseline.samples() >= self.cfg.baseline_min_samples)
        {
            c.as_secs_f64() <= factor * base.max(1e-3)
        } else {
            c < self.cfg.yellow_after
        }
    }

    fn verdict(&self, action: Action) -> Verdict {
        Verdict { grade: self.grade, saturated: self.saturated, action, red_streak: self.red_streak, host: self.host }
    }

    /// Grades one sample. `host` is what the host pressure over the sample's window explains
    /// (`HostPressure::explains`), None on a host not busy enough to explain slowness.
    pub fn observe(&mut self, obs: Observation, load: Load, host: Option<HostCause>) -> Verdict {
        let raw = self.raw_grade(&obs, host);
        let cold = std::mem::take(&mut self.cold_next);
        let hang = matches!(obs, Observation::NoAnswer);

        if raw == Grade::Green {
            self.pending = None;
            self.red_streak = 0;
            self.grade = Some(Grade::Green);
            self.saturated = false;
            self.host = None;
            // Only a quiet host's pulses teach the baseline: it is the engine's own speed, which
            // drift compares against.
            if let (Observation::Answered { wall, compute }, false, None) = (obs, cold, host) {
                self.wall_baseline.add(wall.as_secs_f64(), self.cfg.baseline_alpha);
                if let Some(c) = compute {
                    self.compute_baseline.add(c.as_secs_f64(), self.cfg.baseline_alpha);
                }
            }
            return self.verdict(Action::None);
        }

        let Some(first) = self.pending.take() else {
            self.pending = Some(Pending { raw, hang, host });
            return self.verdict(Action::ConfirmNow);
        };

        let confirmed = first.raw.min(raw);
        let confirmed_hang = first.hang && hang;
        // Either sample's window may show what slowed both: the host explains the round if it
        // explains one of them.
        let host = host.or(first.host);
        let compute = match obs {
            Observation::Answered { compute, .. } => compute,
            _ => None,
        };
        if !confirmed_hang && load.is_busy() && self.compute_is_normal(compute) {
            // The engine's own compute was normal: the pulse waited behind client work inside
            // the engine. At the admission limit that is saturation; below it (one long prompt on
            // another slot) it is only waiting. Either way busy, not sick.
            self.saturated = load.is_at_limit();
            self.red_streak = 0;
            self.host = None;
            self.grade = Some(confirmed.min(Grade::Yellow));
            return self.verdict(Action::None);
        }
        self.saturated = false;
        self.grade = Some(confirmed);
        // A hang is the engine's whatever the host does: restarted below.
        self.host = if confirmed_hang { None } else { host };
        if self.host.is_some() {
            // Slow, and the host says why: users feel it (a red is not ready), a restart would
            // not cure it. The streak starts over: only reds in a row the host does not explain
            // restart.
            self.red_streak = 0;
            return self.verdict(Action::None);
        }
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
mod tests;
