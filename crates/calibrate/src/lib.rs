//! metalkube-calibrate, the library behind `metalkube-agent calibrate` (the agent binary keeps
//! the command; this crate is a client of the agent and of llama-server, and shares with the
//! agent only the crates below both: the API's words, the pulse and host measurement, the chart
//! writer).
//!
//! The tool the incident asks for. It drives a load shape through a model's serving port, and
//! every interval records the pulse, the latency users saw, and the indicators the incident
//! tried first (uptime, the `/slots` task counter, memory, tokens). The report suggests pulse
//! thresholds from the healthy part of the run, says what each check would have said interval
//! by interval, and how well each indicator tracks user latency.
//!
//! Every interval also records how busy this host was (`pressure`), so that a slow interval the
//! machine explains is told apart from one the engine does, and kept out of the baseline the
//! thresholds come from; and the clients count the admission queue's "busy" answers as
//! refusals, not errors, waiting as they are asked before trying again (`drive`).
//!
//! One job per file: `shape` (pure: request plans), `drive` (the load), `sample` (pulse and
//! indicators), `pressure` (the host), `record` (an interval), `analysis` and `stats` (pure:
//! advice), `report`, `html` and `svg` (the files), `target` (where it points), `args` (the
//! command line), `error` (what stops a run).

pub mod analysis;
pub mod args;
pub mod drive;
mod error;
mod html;
mod output;
pub mod pressure;
pub mod record;
pub mod report;
pub mod sample;
pub mod shape;
pub mod stats;
mod svg;
pub mod target;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metalkube_api::PulseSpec;

pub use args::{CalibrateArgs, Settings};
pub use error::CalibrateError;

use self::analysis::{GradedWith, ThresholdSource};
use self::drive::{DriveConfig, RequestOutcome};
use self::pressure::HostWatch;
use self::record::{Interval, PulseCell, RequestCell};
use self::report::{Checks, Report, ReportSettings, Summary};
use self::sample::{PulseTracker, read_engine};
use self::shape::{ContextBudget, Planner};
use self::stats::percentile;

/// A finished run: its report, and where the files are.
pub struct Finished {
    pub report: Report,
    pub json_path: PathBuf,
    pub html_path: PathBuf,
}

/// Context when the engine's `/props` does not say (older llama-server builds).
const DEFAULT_SLOT_CONTEXT: u32 = 4096;

/// One slot's context, from llama-server's `/props`. Failing to reach the engine at all ends the
/// run before it starts: every later reading would be empty.
async fn slot_context(client: &reqwest::Client, engine_url: &str) -> Result<u32, CalibrateError> {
    let url = format!("{engine_url}/props");
    let read = async {
        let resp = client.get(&url).timeout(Duration::from_secs(10)).send().await?.error_for_status()?;
        resp.json::<serde_json::Value>().await
    };
    let props = read.await.map_err(|source| CalibrateError::Engine { url: engine_url.to_owned(), source })?;
    let n_ctx = props.pointer("/default_generation_settings/n_ctx").and_then(serde_json::Value::as_u64);
    Ok(n_ctx.and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0).unwrap_or(DEFAULT_SLOT_CONTEXT))
}

/// What the run gathers, interval by interval.
struct Gathered {
    intervals: Vec<Interval>,
    outcomes: Vec<RequestOutcome>,
    /// Why host pressure was not read, for each different reason met (usually one, or none).
    pressure_not_read: Vec<String>,
}

/// Runs the load for `settings.duration`, then writes the report. `progress` sees each interval
/// as it closes.
pub async fn run(settings: Settings, progress: impl FnMut(&Interval)) -> Result<Finished, CalibrateError> {
    let client = reqwest::Client::builder().no_proxy().build().map_err(CalibrateError::HttpClient)?;
    let resolved = settings.target.resolve(&client).await?;
    let slot_tokens = slot_context(&client, &resolved.engine_url).await?;
    // Half an interval for the indicators, so that reading a slow engine does not stall the run.
    let read_timeout = settings.interval / 2;
    let initial_engine = read_engine(&client, &resolved.engine_url, resolved.engine_pid, read_timeout).await;
    let gathered = gather(&settings, &client, resolved.clone(), ContextBudget { slot_tokens }, progress).await;
    let report = build_report(&settings, resolved, slot_tokens, initial_engine, gathered);
    let (json_path, html_path) = output::write(&report, &settings.out)?;
    Ok(Finished { report, json_path, html_path })
}

async fn gather(
    settings: &Settings,
    client: &reqwest::Client,
    mut resolved: target::Resolved,
    budget: ContextBudget,
    mut progress: impl FnMut(&Interval),
) -> Gathered {
    let started = Instant::now();
    let drive = Arc::new(DriveConfig {
        client: client.clone(),
        serving_url: resolved.serving_url.clone(),
        api_key: settings.api_key.clone(),
        request_timeout: settings.request_timeout,
        started,
        deadline: started + settings.duration,
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let clients: Vec<tokio::task::JoinHandle<()>> = (0..settings.concurrency)
        .map(|c| {
            tokio::spawn(drive::run_client(
                drive.clone(),
                Planner::new(settings.shape, settings.seed, c, budget),
                tx.clone(),
            ))
        })
        .collect();
    drop(tx);
    let pulses = PulseTracker::default();
    pulses.start_if_idle(client.clone(), resolved.engine_url.clone(), settings.pulse_timeout);
    let mut host = HostWatch::start(settings.target.pressure_pid(&resolved));

    let count = settings.duration.as_nanos().div_ceil(settings.interval.as_nanos().max(1));
    let mut g = Gathered { intervals: Vec::new(), outcomes: Vec::new(), pressure_not_read: Vec::new() };
    let mut waiting: Vec<RequestOutcome> = Vec::new();
    for index in 0..usize::try_from(count).unwrap_or(usize::MAX) {
        let start = settings.interval.saturating_mul(u32::try_from(index).unwrap_or(u32::MAX));
        let end = start.saturating_add(settings.interval).min(settings.duration);
        tokio::time::sleep_until(tokio::time::Instant::from_std(started + end)).await;
        // First, so the window ends with the interval and not after the readings below.
        let host_cell = host.read_and_restart();
        if let Some(why) = host.not_read().map(|w| w.note())
            && !g.pressure_not_read.contains(&why)
        {
            g.pressure_not_read.push(why);
        }
        let (done, in_flight) = pulses.take_until(started + end);
        while let Ok(outcome) = rx.try_recv() {
            waiting.push(outcome);
        }
        let (ended, later): (Vec<RequestOutcome>, Vec<RequestOutcome>) =
            waiting.drain(..).partition(|o| o.finished_at < end);
        waiting = later;
        let healthy_period = settings.healthy_for.is_none_or(|h| end <= h);
        let engine = read_engine(client, &resolved.engine_url, resolved.engine_pid, settings.interval / 2).await;
        let interval = Interval {
            index,
            start_seconds: start.as_secs_f64(),
            end_seconds: end.as_secs_f64(),
            healthy_period,
            pulse: PulseCell::new(&done, in_flight),
            requests: RequestCell::new(&ended),
            engine,
            host: host_cell,
            verdicts: Default::default(),
        };
        progress(&interval);
        g.intervals.push(interval);
        g.outcomes.extend(ended);
        if end < settings.duration {
            // Through an agent, follow an engine it replaced (new port, new pid); keep the last
            // answer when the agent does not give one.
            if let Ok(now) = settings.target.resolve(client).await {
                resolved = now;
            }
            host.follow(settings.target.pressure_pid(&resolved));
            pulses.start_if_idle(client.clone(), resolved.engine_url.clone(), settings.pulse_timeout);
        }
    }
    // Requests still running at the end are abandoned, not recorded: they have no latency yet.
    for c in clients {
        c.abort();
    }
    g
}

fn build_report(
    settings: &Settings,
    target: target::Resolved,
    slot_tokens: u32,
    initial_engine: sample::EngineReading,
    mut g: Gathered,
) -> Report {
    let (baseline_walls, baseline) = analysis::healthy_baseline(&g.intervals);
    let suggested = analysis::suggest(&baseline_walls);
    let seed = PulseSpec::default();
    let graded_with = match &suggested {
        Some(s) => GradedWith {
            yellow_after_seconds: s.yellow_after_seconds,
            red_after_seconds: s.red_after_seconds,
            source: ThresholdSource::Suggested,
        },
        None => GradedWith {
            yellow_after_seconds: seed.yellow_after.get().as_secs_f64(),
            red_after_seconds: seed.red_after.get().as_secs_f64(),
            source: ThresholdSource::Seed,
        },
    };
    let window = settings.check_window.as_nanos().div_ceil(settings.interval.as_nanos().max(1));
    analysis::apply_verdicts(&mut g.intervals, &initial_engine, &graded_with, usize::try_from(window).unwrap_or(1));
    let ok: Vec<&RequestOutcome> = g.outcomes.iter().filter(|o| o.answered()).collect();
    let latencies: Vec<f64> = ok.iter().map(|o| o.latency.as_secs_f64()).collect();
    let ttfts: Vec<f64> = ok.iter().filter_map(|o| o.ttft).map(|t| t.as_secs_f64()).collect();
    let summary = Summary {
        intervals: g.intervals.len(),
        healthy_intervals: g.intervals.iter().filter(|i| i.healthy_period).count(),
        requests: g.outcomes.len(),
        request_errors: g.outcomes.iter().filter(|o| o.error().is_some()).count(),
        request_refusals: g.outcomes.iter().filter(|o| o.refusal().is_some()).count(),
        latency_p50_seconds: percentile(&latencies, 0.5),
        latency_p99_seconds: percentile(&latencies, 0.99),
        ttft_p50_seconds: percentile(&ttfts, 0.5),
        pulses_answered: g.intervals.iter().map(|i| i.pulse.answered_walls_seconds.len()).sum(),
        healthy_pulses: baseline.healthy_pulses,
        while_pulse_red: analysis::while_pulse_red(&g.intervals),
        last_interval_verdicts: g.intervals.last().map(|i| i.verdicts.clone()).unwrap_or_default(),
    };
    let no_suggestion = suggested.is_none().then(|| {
        format!(
            "{} healthy pulses to suggest from; at least {} are needed (run longer, or lengthen --healthy-for){}",
            baseline.pulses,
            analysis::MIN_HEALTHY_PULSES,
            if baseline.host_explained_intervals > 0 { format!("; {}", baseline.note) } else { String::new() }
        )
    });
    Report {
        tool: format!("metalkube-agent calibrate {}", env!("CARGO_PKG_VERSION")),
        settings: ReportSettings {
            shape: settings.shape,
            duration_seconds: settings.duration.as_secs_f64(),
            interval_seconds: settings.interval.as_secs_f64(),
            concurrency: settings.concurrency,
            seed: settings.seed,
            healthy_for_seconds: settings.healthy_for.map(|h| h.as_secs_f64()),
            pulse_timeout_seconds: settings.pulse_timeout.as_secs_f64(),
            request_timeout_seconds: settings.request_timeout.as_secs_f64(),
            slot_context_tokens: slot_tokens,
        },
        target,
        indicators: analysis::correlations(&g.intervals, &initial_engine),
        pulse_spec_yaml: suggested.as_ref().map(report::pulse_spec_yaml),
        suggested,
        no_suggestion,
        graded_with,
        checks: Checks {
            pulse: analysis::PULSE_RULE.into(),
            uptime: analysis::UPTIME_RULE.into(),
            task_counter: analysis::COUNTER_RULE.into(),
            check_window_seconds: settings.check_window.as_secs_f64(),
        },
        summary,
        host_pressure: analysis::host_summary(&g.intervals, &g.pressure_not_read),
        baseline,
        initial_engine,
        intervals: g.intervals,
    }
}
