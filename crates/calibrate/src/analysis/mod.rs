//! From the recorded intervals to advice, pure: pulse thresholds suggested from the healthy
//! distribution, what each check would have said interval by interval, and how well each
//! indicator tracks the latency users saw.

use std::collections::BTreeMap;

use metalkube_api::Grade;
use serde::{Deserialize, Serialize};

use super::record::{Interval, Verdicts};
use super::sample::EngineReading;
use super::stats::{percentile, spearman};

/// Fewest healthy pulses thresholds are suggested from: fewer say little about a p99.
pub const MIN_HEALTHY_PULSES: usize = 5;

/// Margins over the healthy p99: the seeds (2 s, 5 s) keep 1 : 2.5 between yellow and red, and
/// these keep the same spirit around what this engine really does.
const YELLOW_MARGIN: f64 = 2.0;
const RED_MARGIN: f64 = 5.0;
/// Below this, thresholds flip on scheduling noise rather than on the engine.
const YELLOW_FLOOR_SECONDS: f64 = 0.25;
/// Drift factors never below this: a baseline doubling is the least worth a yellow.
const DRIFT_YELLOW_FLOOR: f64 = 2.0;
/// Healthy pulses spread wider than this (p99 / p50, the project's default drift yellow factor)
/// have no single baseline: a factor over the typical pulse would flag healthy ones, and one
/// wide enough not to would mean nothing. Drift is then suggested off.
const DRIFT_MAX_SPREAD: f64 = 4.0;
/// The project's default drift floor (`DriftSpec`): below it, a pulse many times a tiny
/// baseline is scheduling noise (1 ms becoming 10 ms), never a reason to restart.
const DRIFT_FLOOR_MIN_SECONDS: f64 = 0.5;

/// The rule `suggest` applies, written once for the report.
pub const RULE: &str = "From the wall times of the pulses answered in the healthy part of the run (p50, p99): \
yellowAfter = max(2 × p99, 250ms); redAfter = max(5 × p99, 2 × yellowAfter); \
drift.yellowFactor = max(2 × p99/p50, 2); drift.redFactor = max(5 × p99/p50, 2 × drift.yellowFactor); \
drift.floor = max(2 × p99, 500ms) (drift never grades a pulse in or near the healthy range, nor one under the \
project's 500ms noise floor); drift.enabled = false when p99/p50 > 4 (no single baseline describes pulses \
spread that wide). \
timeout = max(10s, 2 × redAfter) (a MetalModel needs redAfter < timeout; no answer by then is a hang). \
Times are rounded up to 10 ms, factors up to 0.1. At least 5 healthy pulses are needed.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Suggestion {
    pub yellow_after_seconds: f64,
    pub red_after_seconds: f64,
    pub timeout_seconds: f64,
    pub drift: DriftSuggestion,
    /// The healthy pulses the numbers come from.
    pub basis: Basis,
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftSuggestion {
    pub enabled: bool,
    pub yellow_factor: f64,
    pub red_factor: f64,
    pub floor_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Basis {
    pub pulses: usize,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    pub max_seconds: f64,
}

/// Rounds up to a multiple of 1/`per_unit` (100: hundredths). The epsilon keeps 1.2 from
/// becoming 1.21 when 1.2 × 100 comes out as 120.00000000000001; dividing (not multiplying by
/// 0.01) keeps the result the nearest double to the decimal.
fn ceil_to(value: f64, per_unit: f64) -> f64 {
    ((value * per_unit) - 1e-9).ceil() / per_unit
}

/// Thresholds from a healthy p50 and p99 (seconds), by `RULE`.
pub fn thresholds_from(p50: f64, p99: f64) -> (f64, f64, DriftSuggestion) {
    let yellow = ceil_to((YELLOW_MARGIN * p99).max(YELLOW_FLOOR_SECONDS), 100.0);
    let red = ceil_to((RED_MARGIN * p99).max(2.0 * yellow), 100.0);
    // p50 is positive for any pulse that took time; a zero would make the spread meaningless.
    let spread = if p50 > 0.0 { (p99 / p50).max(1.0) } else { 1.0 };
    let yellow_factor = ceil_to((YELLOW_MARGIN * spread).max(DRIFT_YELLOW_FLOOR), 10.0);
    let red_factor = ceil_to((RED_MARGIN * spread).max(2.0 * yellow_factor), 10.0);
    let floor_seconds = ceil_to((YELLOW_MARGIN * p99).max(DRIFT_FLOOR_MIN_SECONDS), 100.0);
    let enabled = spread <= DRIFT_MAX_SPREAD;
    (yellow, red, DriftSuggestion { enabled, yellow_factor, red_factor, floor_seconds })
}

/// The pulse timeout for a redAfter: the project's default (10 s) unless that is not above it.
pub fn timeout_for(red_after_seconds: f64) -> f64 {
    let default = metalkube_api::PulseSpec::default().timeout.get().as_secs_f64();
    default.max(2.0 * red_after_seconds)
}

/// Suggested thresholds from the healthy pulses' wall times; None with fewer than
/// `MIN_HEALTHY_PULSES` of them.
pub fn suggest(healthy_walls: &[f64]) -> Option<Suggestion> {
    let walls: Vec<f64> = healthy_walls.iter().copied().filter(|w| w.is_finite() && *w >= 0.0).collect();
    if walls.len() < MIN_HEALTHY_PULSES {
        return None;
    }
    let (p50, p99) = (percentile(&walls, 0.5)?, percentile(&walls, 0.99)?);
    let (yellow, red, drift) = thresholds_from(p50, p99);
    Some(Suggestion {
        yellow_after_seconds: yellow,
        red_after_seconds: red,
        timeout_seconds: timeout_for(red),
        drift,
        basis: Basis {
            pulses: walls.len(),
            p50_seconds: p50,
            p99_seconds: p99,
            max_seconds: walls.iter().copied().fold(0.0, f64::max),
        },
        rule: RULE.into(),
    })
}

/// The pulses the thresholds are suggested from, and which were left out and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Baseline {
    /// Pulses answered in the healthy part of the run.
    pub healthy_pulses: usize,
    /// Of those, the pulses the suggestion is made from.
    pub pulses: usize,
    /// Intervals of the healthy part the host explains (`HostPressure::explains`), and the
    /// pulses answered in them.
    pub host_explained_intervals: usize,
    pub host_explained_pulses: usize,
    /// Whether those were left out. They are, unless that leaves fewer pulses than a
    /// suggestion needs: then they are kept, and `note` says the thresholds may be loose.
    pub host_explained_left_out: bool,
    pub note: String,
}

/// The healthy baseline: the wall times of the pulses answered in the healthy part of the run,
/// without the intervals the host explains. A pulse slowed by an Xcode build or a machine short
/// of memory says how slow the host was, not how slow this engine is when healthy: in the
/// baseline it would raise every threshold, and the pulse check would then miss the engine's
/// own slowness. Only when leaving them out leaves too few pulses for a suggestion are they
/// kept (a loose suggestion, said so, is more use than none).
pub fn healthy_baseline(intervals: &[Interval]) -> (Vec<f64>, Baseline) {
    let healthy = intervals.iter().filter(|i| i.healthy_period);
    let (explained, clean): (Vec<&Interval>, Vec<&Interval>) = healthy.partition(|i| i.host_explained_by().is_some());
    let walls = |of: &[&Interval]| -> Vec<f64> {
        of.iter().flat_map(|i| i.pulse.answered_walls_seconds.iter().copied()).collect()
    };
    let (clean_walls, explained_walls) = (walls(&clean), walls(&explained));
    let (clean_pulses, explained_pulses) = (clean_walls.len(), explained_walls.len());
    let left_out = explained.is_empty() || clean_walls.len() >= MIN_HEALTHY_PULSES;
    let note = match (explained.len(), left_out) {
        (0, _) => "every healthy interval: the host explained none".to_owned(),
        (n, true) => format!(
            "{n} healthy interval(s) left out, with their {} pulse(s): the host explains them (its pressure, not \
             the engine, set their pace)",
            explained_pulses
        ),
        (n, false) => format!(
            "the host explains {n} healthy interval(s); without them only {} pulse(s) would be left (at least \
             {MIN_HEALTHY_PULSES} are needed), so they are kept, and the thresholds may be looser than this engine \
             needs: calibrate again on a quieter host",
            clean_pulses
        ),
    };
    let used = if left_out { clean_walls } else { [clean_walls, explained_walls].concat() };
    let baseline = Baseline {
        healthy_pulses: clean_pulses + explained_pulses,
        pulses: used.len(),
        host_explained_intervals: explained.len(),
        host_explained_pulses: explained_pulses,
        host_explained_left_out: left_out && !explained.is_empty(),
        note,
    };
    (used, baseline)
}

/// This host's pressure over the run, as the report sums it up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPressureSummary {
    /// Intervals whose host pressure was read.
    pub intervals_read: usize,
    /// Intervals the host explains (`HostPressure::explains` named a cause).
    pub intervals_explained: usize,
    /// How many intervals each cause explained (the most direct cause of each).
    pub causes: BTreeMap<String, usize>,
    /// How the figures were read, or why they were not.
    pub note: String,
}

/// What `HostPressureSummary::note` says when the figures were read.
pub const HOST_PRESSURE_RULE: &str = "Read over each interval from a window opened at its start (as the agent does \
over a pulse round): CPU share of other processes and of the engine, the engine's wait for a CPU, PSI stalls, load \
per CPU, calibrate's own timer lateness. The host explains an interval when other processes held half the CPU, the \
engine waited behind them, memory or IO stalled, the CPU was held back by heat, or calibrate's own timers were a \
quarter second late (the rule the agent applies). Other processes include calibrate's own clients (calibrateCpu): on a \
small machine the load generator competes with the engine too.";

/// Sums up the host pressure of the run; `not_read` holds why it was not read where it was not.
pub fn host_summary(intervals: &[Interval], not_read: &[String]) -> HostPressureSummary {
    let mut causes = BTreeMap::new();
    for cause in intervals.iter().filter_map(Interval::host_explained_by) {
        *causes.entry(cause.to_owned()).or_insert(0) += 1;
    }
    let intervals_read = intervals.iter().filter(|i| i.host.is_some()).count();
    let mut note = if intervals_read > 0 { HOST_PRESSURE_RULE.to_owned() } else { String::new() };
    for why in not_read {
        if !note.is_empty() {
            note.push(' ');
        }
        note.push_str(&format!("Host pressure {why}."));
    }
    HostPressureSummary { intervals_read, intervals_explained: causes.values().sum(), causes, note }
}

/// The thresholds the pulse verdicts are graded against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GradedWith {
    pub yellow_after_seconds: f64,
    pub red_after_seconds: f64,
    pub source: ThresholdSource,
}

/// Where the thresholds the pulse verdicts use come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdSource {
    /// This run's suggestion.
    Suggested,
    /// The project's defaults (2 s, 5 s): no suggestion was possible.
    Seed,
}

/// The pulse check on one piece of evidence: red when the pulse failed or its wall time reached
/// redAfter, yellow from yellowAfter, else green; None with no evidence.
pub fn grade_pulse(wall: Option<f64>, failed: bool, with: &GradedWith) -> Option<Grade> {
    if failed {
        return Some(Grade::Red);
    }
    let wall = wall?;
    Some(if wall >= with.red_after_seconds {
        Grade::Red
    } else if wall >= with.yellow_after_seconds {
        Grade::Yellow
    } else {
        Grade::Green
    })
}

/// The checks, as written in the report.
pub const PULSE_RULE: &str = "pulse check: red when a pulse failed or its wall time reached redAfter; yellow from \
yellowAfter; else green. A pulse still waiting at an interval's end counts with its wait so far; while it has waited \
less than the last pulse that came back, that one's grade holds (as in the agent, a grade holds until new evidence).";
pub const UPTIME_RULE: &str = "uptime check: green when the engine's uptime at the end of the interval is greater than \
it was one check window earlier (the process did not restart); red when it is not, or when the process is gone.";
pub const COUNTER_RULE: &str = "task-counter check: green when the largest id_task in /slots at the end of the interval \
is greater than it was one check window earlier (the engine took new work); red when it is not, or /slots did not answer.";

fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn moved_on<T: PartialOrd>(earlier: Option<T>, now: Option<T>) -> Option<Grade> {
    match (earlier, now) {
        (Some(e), Some(n)) => Some(if n > e { Grade::Green } else { Grade::Red }),
        (Some(_), None) => Some(Grade::Red),
        // Nothing to compare with: a first task id appearing is the counter moving on.
        (None, Some(_)) => Some(Grade::Green),
        (None, None) => None,
    }
}

/// Fills every interval's verdicts. `window` is the check window in intervals (at least 1):
/// interval i compares its end reading with the one `window` intervals before (the start of
/// the run's reading, `initial`, for the first).
pub fn apply_verdicts(intervals: &mut [Interval], initial: &EngineReading, with: &GradedWith, window: usize) {
    let window = window.max(1);
    let readings: Vec<EngineReading> =
        std::iter::once(initial.clone()).chain(intervals.iter().map(|i| i.engine.clone())).collect();
    let (mut last_wall, mut last_failed) = (None, false);
    for (i, interval) in intervals.iter_mut().enumerate() {
        let p = &interval.pulse;
        let (wall, failed) = if p.answered > 0 {
            (last_wall, last_failed) = (p.answered_wall_seconds, p.error.is_some());
            (p.wall_seconds, p.error.is_some())
        } else {
            (max_of(p.wall_seconds, last_wall), last_failed)
        };
        interval.verdicts =
            Verdicts { pulse_seconds: wall, pulse: grade_pulse(wall, failed, with), ..Verdicts::default() };
        let Some(earlier) = (i + 1).checked_sub(window).and_then(|k| readings.get(k)) else { continue };
        let now = &interval.engine;
        // Uptime needs the pid: without it both readings are None and the check says nothing.
        interval.verdicts.uptime = match (earlier.uptime_seconds, now.uptime_seconds) {
            (None, None) => None,
            (e, n) => moved_on(e, n),
        };
        interval.verdicts.task_counter = moved_on(earlier.task_counter, now.task_counter);
    }
}

/// How well one indicator tracked the latency users saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndicatorCorrelation {
    pub indicator: String,
    /// What of the indicator is compared, per interval.
    pub reads: String,
    /// Spearman's rank correlation with the interval's p99 request latency; None when there were
    /// too few intervals with both, or the indicator never changed.
    pub spearman_rho: Option<f64>,
    pub intervals: usize,
}

/// Per second of the interval, how much a cumulative reading grew.
fn rate(earlier: Option<f64>, now: Option<f64>, seconds: f64) -> Option<f64> {
    (seconds > 0.0).then_some((now? - earlier?) / seconds)
}

/// Every indicator against each interval's p99 latency (after `apply_verdicts`: the pulse is
/// taken as its check graded it). Cumulative indicators (uptime, the task
/// counter, tokens served) are compared by their growth per second, which is what a check on
/// them reads; their raw values rise with time whatever the engine does.
pub fn correlations(intervals: &[Interval], initial: &EngineReading) -> Vec<IndicatorCorrelation> {
    type Pick = fn(&Interval, &EngineReading) -> Option<f64>;
    let indicators: [(&str, &str, Pick); 6] = [
        ("pulse wall time", "seconds the pulse check graded", |i, _| i.verdicts.pulse_seconds),
        ("pulse compute time", "seconds the engine reported (prompt_ms + predicted_ms)", |i, _| {
            i.pulse.compute_seconds
        }),
        ("engine uptime", "growth per second (1 while the process runs, negative after a restart)", |i, e| {
            rate(e.uptime_seconds, i.engine.uptime_seconds, i.end_seconds - i.start_seconds)
        }),
        ("task counter (/slots id_task)", "growth per second (tasks taken)", |i, e| {
            rate(
                e.task_counter.map(|c| c as f64),
                i.engine.task_counter.map(|c| c as f64),
                i.end_seconds - i.start_seconds,
            )
        }),
        ("engine RSS", "bytes", |i, _| i.engine.rss_bytes.map(|b| b as f64)),
        ("tokens served", "growth per second (llamacpp:tokens_predicted_total)", |i, e| {
            rate(e.tokens_served, i.engine.tokens_served, i.end_seconds - i.start_seconds)
        }),
    ];
    let previous: Vec<&EngineReading> = std::iter::once(initial).chain(intervals.iter().map(|i| &i.engine)).collect();
    indicators
        .iter()
        .map(|(name, reads, pick)| {
            let pairs: Vec<(f64, f64)> = intervals
                .iter()
                .zip(&previous)
                .filter_map(|(i, prev)| Some((pick(i, prev)?, i.requests.latency_p99_seconds?)))
                .collect();
            IndicatorCorrelation {
                indicator: (*name).into(),
                reads: (*reads).into(),
                spearman_rho: spearman(&pairs),
                intervals: pairs.len(),
            }
        })
        .collect()
}

/// What the incident is about, counted: intervals where the pulse was red, and in how many of
/// them each incident check still said green.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WhilePulseRed {
    pub intervals: usize,
    pub uptime_green: usize,
    pub task_counter_green: usize,
    /// Of the red intervals, those the host explains: the machine, not the engine, was slow.
    #[serde(default)]
    pub host_explained: usize,
}

pub fn while_pulse_red(intervals: &[Interval]) -> WhilePulseRed {
    let red: Vec<&Interval> = intervals.iter().filter(|i| i.verdicts.pulse == Some(Grade::Red)).collect();
    WhilePulseRed {
        intervals: red.len(),
        uptime_green: red.iter().filter(|i| i.verdicts.uptime == Some(Grade::Green)).count(),
        task_counter_green: red.iter().filter(|i| i.verdicts.task_counter == Some(Grade::Green)).count(),
        host_explained: red.iter().filter(|i| i.host_explained_by().is_some()).count(),
    }
}

#[cfg(test)]
mod tests;
