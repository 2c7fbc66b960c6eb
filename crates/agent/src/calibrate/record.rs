//! One interval of a run as the report keeps it, and how it is made from what came back (pure).

use std::time::Duration;

use metalkube_api::Grade;
use serde::{Deserialize, Serialize};

use super::drive::RequestOutcome;
use super::sample::{DonePulse, EngineReading};
use super::stats::percentile;
use crate::health::grader::Observation;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interval {
    pub index: usize,
    pub start_seconds: f64,
    pub end_seconds: f64,
    /// In the part of the run taken as healthy (`--healthy-for`): its pulses set the suggested
    /// thresholds.
    pub healthy_period: bool,
    pub pulse: PulseCell,
    pub requests: RequestCell,
    /// The engine's indicators at the end of the interval.
    pub engine: EngineReading,
    /// What each check says of this interval (filled in by the analysis).
    #[serde(default)]
    pub verdicts: Verdicts,
}

/// The pulse evidence of one interval: the slowest pulse that came back in it, or the one still
/// waiting at its end if that had already waited longer (a pulse in flight past `redAfter` is
/// red by its own wall time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PulseCell {
    pub wall_seconds: Option<f64>,
    /// The slowest pulse that came back in the interval (without the one still waiting).
    pub answered_wall_seconds: Option<f64>,
    /// prompt_ms + predicted_ms the engine reported for that pulse.
    pub compute_seconds: Option<f64>,
    /// Pulses that came back in the interval.
    pub answered: u32,
    /// The wall time is that of a pulse still waiting at the interval's end.
    pub in_flight: bool,
    /// A pulse failed (error answer, broken connection, no answer by the pulse timeout).
    pub error: Option<String>,
}

/// The requests that ended in one interval, as their clients saw them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestCell {
    pub completed: u32,
    pub errors: u32,
    pub latency_p50_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
    /// Time to first token of the streams that ended in the interval.
    pub ttft_p50_seconds: Option<f64>,
    pub ttft_p99_seconds: Option<f64>,
    pub decode_ms_per_token_p50: Option<f64>,
    pub tokens: u64,
    /// The first error of the interval, for people.
    pub first_error: Option<String>,
}

/// Green or red per check; None where a check has nothing to go on yet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdicts {
    /// The wall time the pulse check graded: the interval's pulse evidence, or, while the next
    /// pulse has waited less, the last one that came back (a grade holds until new evidence).
    pub pulse_seconds: Option<f64>,
    pub pulse: Option<Grade>,
    pub uptime: Option<Grade>,
    pub task_counter: Option<Grade>,
}

impl Interval {
    /// One line per interval while the run goes (stderr).
    pub fn progress_line(&self) -> String {
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}s"));
        format!(
            "{:>7.1}s  pulse {}{}  requests {} ({} failed)  p50 {}  p99 {}  tasks {}  uptime {}",
            self.end_seconds,
            secs(self.pulse.wall_seconds),
            if self.pulse.in_flight { " waiting" } else { "" },
            self.requests.completed,
            self.requests.errors,
            secs(self.requests.latency_p50_seconds),
            secs(self.requests.latency_p99_seconds),
            self.engine.task_counter.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            self.engine.uptime_seconds.map_or_else(|| "-".to_owned(), |u| format!("{u:.0}s")),
        )
    }
}

impl PulseCell {
    /// From the pulses that came back in the interval and the wait of the one in flight at its end.
    pub fn new(done: &[DonePulse], waiting: Option<Duration>) -> Self {
        let mut cell = PulseCell { answered: done.len() as u32, ..PulseCell::default() };
        for pulse in done {
            let s = &pulse.sample;
            if !matches!(s.observation, Observation::Answered { .. }) {
                cell.error.get_or_insert_with(|| s.error.clone().unwrap_or_else(|| "pulse failed".into()));
            }
            if cell.wall_seconds.is_none_or(|w| s.wall.as_secs_f64() > w) {
                cell.wall_seconds = Some(s.wall.as_secs_f64());
                cell.answered_wall_seconds = cell.wall_seconds;
                cell.compute_seconds = s.compute.map(|c| c.as_secs_f64());
            }
        }
        if let Some(w) = waiting.map(|w| w.as_secs_f64())
            && cell.wall_seconds.is_none_or(|done| w > done)
        {
            cell.wall_seconds = Some(w);
            cell.compute_seconds = None;
            cell.in_flight = true;
        }
        cell
    }
}

impl RequestCell {
    pub fn new(outcomes: &[RequestOutcome]) -> Self {
        let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
        let latencies: Vec<f64> = ok.iter().map(|o| o.latency.as_secs_f64()).collect();
        let ttfts: Vec<f64> = ok.iter().filter_map(|o| o.ttft).map(|t| t.as_secs_f64()).collect();
        let decode: Vec<f64> = ok.iter().filter_map(|o| o.decode_ms_per_token).collect();
        RequestCell {
            completed: outcomes.len() as u32,
            errors: (outcomes.len() - ok.len()) as u32,
            latency_p50_seconds: percentile(&latencies, 0.5),
            latency_p99_seconds: percentile(&latencies, 0.99),
            ttft_p50_seconds: percentile(&ttfts, 0.5),
            ttft_p99_seconds: percentile(&ttfts, 0.99),
            decode_ms_per_token_p50: percentile(&decode, 0.5),
            tokens: ok.iter().map(|o| o.tokens).sum(),
            first_error: outcomes.iter().find_map(|o| o.error.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibrate::shape::Api;
    use crate::health::pulse::PulseSample;
    use std::time::Instant;

    fn pulse(wall_ms: u64, observation: Option<Observation>) -> DonePulse {
        let wall = Duration::from_millis(wall_ms);
        let compute = Some(wall / 2);
        DonePulse {
            finished: Instant::now(),
            sample: PulseSample {
                observation: observation.unwrap_or(Observation::Answered { wall, compute }),
                wall,
                compute,
                error: observation.map(|_| "engine answered 500".into()),
            },
        }
    }

    #[test]
    fn the_slowest_evidence_counts_a_waiting_pulse_included() {
        let cell = PulseCell::new(&[pulse(300, None), pulse(700, None)], None);
        assert_eq!((cell.wall_seconds, cell.compute_seconds, cell.answered), (Some(0.7), Some(0.35), 2));
        let waiting = PulseCell::new(&[pulse(300, None)], Some(Duration::from_secs(4)));
        assert_eq!((waiting.wall_seconds, waiting.compute_seconds, waiting.in_flight), (Some(4.0), None, true));
        assert_eq!(waiting.answered_wall_seconds, Some(0.3));
        let short_wait = PulseCell::new(&[pulse(300, None)], Some(Duration::from_millis(10)));
        assert!(!short_wait.in_flight, "a pulse just started says less than one that came back");
        let failed = PulseCell::new(&[pulse(5, Some(Observation::Failed))], None);
        assert_eq!(failed.error.as_deref(), Some("engine answered 500"));
        assert_eq!(PulseCell::new(&[], None), PulseCell::default());
    }

    #[test]
    fn requests_are_summarised_without_the_failed_ones_in_the_latencies() {
        let outcome = |ms: u64, error: Option<&str>| RequestOutcome {
            finished_at: Duration::ZERO,
            latency: Duration::from_millis(ms),
            ttft: Some(Duration::from_millis(ms / 10)),
            decode_ms_per_token: Some(2.0),
            tokens: 4,
            stream: true,
            api: Api::Chat,
            error: error.map(str::to_owned),
        };
        let cell = RequestCell::new(&[outcome(100, None), outcome(300, None), outcome(90_000, Some("HTTP 503"))]);
        assert_eq!((cell.completed, cell.errors, cell.tokens), (3, 1, 8));
        assert!(cell.latency_p50_seconds.is_some_and(|p| (p - 0.2).abs() < 1e-9), "{cell:?}");
        assert_eq!(cell.first_error.as_deref(), Some("HTTP 503"));
        assert_eq!(RequestCell::new(&[]).latency_p99_seconds, None);
    }
}
