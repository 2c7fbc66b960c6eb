//! One interval of a run as the report keeps it, and how it is made from what came back (pure).

use std::time::Duration;

use metalkube_api::Grade;
use metalkube_vitals::host::pressure::HostPressure;
use metalkube_vitals::host_figures::HostFigures;
use metalkube_vitals::pulse::Observation;
use serde::{Deserialize, Serialize};

use super::drive::RequestOutcome;
use super::sample::{DonePulse, EngineReading};
use super::stats::percentile;

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
    /// How busy this host was over the interval; None when it could not be read (the engine is
    /// on another host, or its pid is unknown: the report's `hostPressure.note` says which).
    #[serde(default)]
    pub host: Option<HostCell>,
    /// What each check says of this interval (filled in by the analysis).
    #[serde(default)]
    pub verdicts: Verdicts,
}

impl Interval {
    /// The host cause that explains a slow interval, if the host explains one.
    pub fn host_explained_by(&self) -> Option<&str> {
        self.host.as_ref().and_then(|h| h.explained_by.as_deref())
    }
}

/// The host's pressure over one interval (`metalkube_vitals::attribution::HostPressure`, read with a
/// window opened at the interval's start and read at its end), and what it explains.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostCell {
    /// The engine process the window measured.
    pub engine_pid: u32,
    /// The figures the agent shows beside a pulse, under the same names: the share of all
    /// CPUs' time other processes used counts calibrate's own clients (`calibrateCpu`), and the
    /// timer lateness is calibrate's own.
    #[serde(flatten)]
    pub figures: HostFigures,
    /// Share of all CPUs' time calibrate itself used (its load clients and readings).
    pub calibrate_cpu: Option<f64>,
    /// The engine's threads' wait for a CPU over their time on one (Linux).
    pub engine_cpu_wait_ratio: Option<f64>,
    /// A fixed small piece of work, timed in the interval, over its best time.
    pub probe_slowdown: Option<f64>,
    /// macOS: the kernel's memory pressure level.
    pub memory_level: Option<String>,
    pub gpu_utilization: Option<f64>,
    /// Every cause the figures show (`metalkube_vitals::attribution::HostCause` labels), most
    /// direct first.
    pub causes: Vec<String>,
    /// The most direct cause (`HostPressure::explains`): the host explains a slow interval.
    pub explained_by: Option<String>,
    /// The figures, for people.
    pub text: String,
}

impl HostCell {
    /// From a window's reading (pure). `engine_read` says whether the engine's own CPU share
    /// could be read at the window's end: when it could not (the process ended or was
    /// replaced mid-interval), `others_cpu` counts the engine's work as others' and would blame
    /// the host for it, so it is dropped.
    pub fn new(engine_pid: u32, mut p: HostPressure, calibrate_cpu: Option<f64>) -> Self {
        if p.engine_cpu.is_none() {
            p.others_cpu = None;
        }
        let causes: Vec<String> = p.causes().into_iter().map(|c| c.as_str().to_owned()).collect();
        HostCell {
            engine_pid,
            figures: HostFigures::from(&p),
            calibrate_cpu,
            engine_cpu_wait_ratio: p.engine_cpu_wait_ratio,
            probe_slowdown: p.probe_slowdown,
            memory_level: p.memory_level.map(|l| l.as_str().to_owned()),
            gpu_utilization: p.gpu_utilization,
            explained_by: p.explains().map(|c| c.as_str().to_owned()),
            causes,
            text: p.to_string(),
        }
    }
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
    /// The wall time of each pulse answered in the interval (failed ones left out): the
    /// healthy baseline is drawn from these.
    #[serde(default)]
    pub answered_walls_seconds: Vec<f64>,
    /// The wall time is that of a pulse still waiting at the interval's end.
    pub in_flight: bool,
    /// A pulse failed (error answer, broken connection, no answer by the pulse timeout).
    pub error: Option<String>,
}

/// The requests that ended in one interval, as their clients saw them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestCell {
    /// Every request that ended: answered, refused or failed.
    pub completed: u32,
    /// Failed: an HTTP error other than a refusal, transport, timeout, an error event.
    pub errors: u32,
    /// Turned away by the serving port's admission because the model was busy (429, or 503
    /// `queue_timeout`): the queue doing its job, not a failure. Their latencies are left out.
    #[serde(default)]
    pub refused: u32,
    /// The longest `Retry-After` a refusal carried, in seconds (as sent, before calibrate
    /// bounds its wait).
    #[serde(default)]
    pub retry_after_max_seconds: Option<f64>,
    pub latency_p50_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
    /// Time to first token of the streams that ended in the interval.
    pub ttft_p50_seconds: Option<f64>,
    pub ttft_p99_seconds: Option<f64>,
    pub decode_ms_per_token_p50: Option<f64>,
    pub tokens: u64,
    /// The first error of the interval, for people.
    pub first_error: Option<String>,
    /// The first refusal of the interval, for people (`HTTP 429 queue_full, Retry-After 2s`).
    #[serde(default)]
    pub first_refusal: Option<String>,
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
            "{:>7.1}s  pulse {}{}  requests {} ({} failed, {} refused)  p50 {}  p99 {}  tasks {}  uptime {}{}",
            self.end_seconds,
            secs(self.pulse.wall_seconds),
            if self.pulse.in_flight { " waiting" } else { "" },
            self.requests.completed,
            self.requests.errors,
            self.requests.refused,
            secs(self.requests.latency_p50_seconds),
            secs(self.requests.latency_p99_seconds),
            self.engine.task_counter.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            self.engine.uptime_seconds.map_or_else(|| "-".to_owned(), |u| format!("{u:.0}s")),
            self.host_explained_by().map_or_else(String::new, |c| format!("  host: {c}")),
        )
    }
}

impl PulseCell {
    /// From the pulses that came back in the interval and the wait of the one in flight at its end.
    pub fn new(done: &[DonePulse], waiting: Option<Duration>) -> Self {
        let mut cell = PulseCell { answered: done.len() as u32, ..PulseCell::default() };
        for pulse in done {
            let s = &pulse.sample;
            match s.observation {
                Observation::Answered { wall, .. } => cell.answered_walls_seconds.push(wall.as_secs_f64()),
                _ => {
                    cell.error.get_or_insert_with(|| s.error.clone().unwrap_or_else(|| "pulse failed".into()));
                }
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
        let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.answered()).collect();
        let refusals: Vec<&super::drive::Refusal> = outcomes.iter().filter_map(RequestOutcome::refusal).collect();
        let latencies: Vec<f64> = ok.iter().map(|o| o.latency.as_secs_f64()).collect();
        let ttfts: Vec<f64> = ok.iter().filter_map(|o| o.ttft).map(|t| t.as_secs_f64()).collect();
        let decode: Vec<f64> = ok.iter().filter_map(|o| o.decode_ms_per_token).collect();
        RequestCell {
            completed: outcomes.len() as u32,
            errors: outcomes.iter().filter(|o| o.error().is_some()).count() as u32,
            refused: refusals.len() as u32,
            retry_after_max_seconds: refusals.iter().filter_map(|r| r.retry_after).max().map(|d| d.as_secs_f64()),
            latency_p50_seconds: percentile(&latencies, 0.5),
            latency_p99_seconds: percentile(&latencies, 0.99),
            ttft_p50_seconds: percentile(&ttfts, 0.5),
            ttft_p99_seconds: percentile(&ttfts, 0.99),
            decode_ms_per_token_p50: percentile(&decode, 0.5),
            tokens: ok.iter().map(|o| o.tokens).sum(),
            first_error: outcomes.iter().find_map(|o| o.error().map(str::to_owned)),
            first_refusal: refusals.first().map(|r| r.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::{Ending, Refusal};
    use crate::shape::Api;
    use metalkube_vitals::pulse::PulseSample;
    use std::time::Instant;

    fn outcome(ms: u64, ending: Ending) -> RequestOutcome {
        RequestOutcome {
            finished_at: Duration::ZERO,
            latency: Duration::from_millis(ms),
            ttft: Some(Duration::from_millis(ms / 10)),
            decode_ms_per_token: Some(2.0),
            tokens: 4,
            stream: true,
            api: Api::Chat,
            ending,
            backoff: None,
        }
    }

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
        assert_eq!(cell.answered_walls_seconds, [0.3, 0.7]);
        let waiting = PulseCell::new(&[pulse(300, None)], Some(Duration::from_secs(4)));
        assert_eq!((waiting.wall_seconds, waiting.compute_seconds, waiting.in_flight), (Some(4.0), None, true));
        assert_eq!(waiting.answered_wall_seconds, Some(0.3));
        let short_wait = PulseCell::new(&[pulse(300, None)], Some(Duration::from_millis(10)));
        assert!(!short_wait.in_flight, "a pulse just started says less than one that came back");
        let failed = PulseCell::new(&[pulse(5, Some(Observation::Failed))], None);
        assert_eq!(failed.error.as_deref(), Some("engine answered 500"));
        assert!(failed.answered_walls_seconds.is_empty(), "a failed pulse is no baseline");
        assert_eq!(PulseCell::new(&[], None), PulseCell::default());
    }

    #[test]
    fn requests_are_summarised_without_the_failed_ones_in_the_latencies() {
        let cell = RequestCell::new(&[
            outcome(100, Ending::Answered),
            outcome(300, Ending::Answered),
            outcome(90_000, Ending::Failed("HTTP 500".into())),
        ]);
        assert_eq!((cell.completed, cell.errors, cell.refused, cell.tokens), (3, 1, 0, 8));
        assert!(cell.latency_p50_seconds.is_some_and(|p| (p - 0.2).abs() < 1e-9), "{cell:?}");
        assert_eq!(cell.first_error.as_deref(), Some("HTTP 500"));
        assert_eq!(RequestCell::new(&[]).latency_p99_seconds, None);
    }

    #[test]
    fn refusals_are_counted_apart_from_errors_and_latencies() {
        let refused = |secs: Option<u64>| {
            Ending::Refused(Refusal {
                status: 429,
                code: Some("queue_full".into()),
                retry_after: secs.map(Duration::from_secs),
            })
        };
        let cell = RequestCell::new(&[
            outcome(2, refused(Some(2))),
            outcome(400, Ending::Answered),
            outcome(3, refused(Some(5))),
            outcome(1, refused(None)),
        ]);
        assert_eq!((cell.completed, cell.errors, cell.refused), (4, 0, 3));
        assert_eq!(cell.latency_p50_seconds, Some(0.4), "a fast refusal is no fast answer");
        assert_eq!(cell.retry_after_max_seconds, Some(5.0));
        assert_eq!(cell.first_refusal.as_deref(), Some("HTTP 429 queue_full, Retry-After 2s"));
        assert_eq!(cell.first_error, None);
    }

    #[test]
    fn a_host_cell_names_the_cause_and_drops_others_when_the_engine_was_not_read() {
        let busy = HostPressure {
            others_cpu: Some(0.7),
            engine_cpu: Some(0.2),
            timer_lateness: Some(Duration::from_millis(30)),
            ..HostPressure::default()
        };
        let cell = HostCell::new(42, busy, Some(0.05));
        assert_eq!(cell.explained_by.as_deref(), Some("other_processes_cpu"));
        assert_eq!(cell.causes, ["other_processes_cpu"]);
        assert_eq!((cell.figures.timer_lateness_seconds, cell.calibrate_cpu), (Some(0.03), Some(0.05)));
        assert!(cell.text.contains("other processes 70% of CPU"), "{}", cell.text);
        // The engine was replaced mid-interval: its work would count as others'.
        let gone = HostCell::new(42, HostPressure { engine_cpu: None, ..busy }, None);
        assert_eq!((gone.figures.others_cpu, gone.explained_by), (None, None));
        let idle = HostCell::new(42, HostPressure { others_cpu: Some(0.1), ..busy }, None);
        assert_eq!(idle.explained_by, None);
        assert!(idle.causes.is_empty());
    }
}
