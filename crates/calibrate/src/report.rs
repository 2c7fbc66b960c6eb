//! The report: `report.json` (everything, for tools) and `report.html` (the same, for people;
//! self-contained, see `html.rs`).

use serde::{Deserialize, Serialize};

use super::analysis::{Baseline, GradedWith, HostPressureSummary, IndicatorCorrelation, Suggestion, WhilePulseRed};
use super::record::{Interval, Verdicts};
use super::sample::EngineReading;
use super::shape::Shape;
use super::target::Resolved;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `metalkube-agent calibrate <version>`.
    pub tool: String,
    pub settings: ReportSettings,
    /// Where the run pointed at its start.
    pub target: Resolved,
    pub summary: Summary,
    /// The pulses the suggestion is made from, and what was left out of them and why.
    #[serde(default)]
    pub baseline: Baseline,
    pub suggested: Option<Suggestion>,
    /// Why nothing is suggested, when nothing is.
    pub no_suggestion: Option<String>,
    /// The suggestion as a MetalModel's `spec.pulse`.
    pub pulse_spec_yaml: Option<String>,
    pub graded_with: GradedWith,
    pub checks: Checks,
    pub indicators: Vec<IndicatorCorrelation>,
    /// This host's pressure over the run: each interval's figures are in `intervals[].host`.
    #[serde(default)]
    pub host_pressure: HostPressureSummary,
    /// The engine's indicators at the start of the run (the first interval's checks compare
    /// with it).
    pub initial_engine: EngineReading,
    pub intervals: Vec<Interval>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportSettings {
    pub shape: Shape,
    pub duration_seconds: f64,
    pub interval_seconds: f64,
    pub concurrency: u32,
    pub seed: u64,
    /// The first part of the run taken as healthy; None: all of it.
    pub healthy_for_seconds: Option<f64>,
    pub pulse_timeout_seconds: f64,
    pub request_timeout_seconds: f64,
    /// One slot's context, from the engine's `/props`: prompts are sized to fit it.
    pub slot_context_tokens: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub intervals: usize,
    pub healthy_intervals: usize,
    /// Requests that ended: answered, refused or failed.
    pub requests: usize,
    pub request_errors: usize,
    /// Requests the serving port's admission refused because the model was busy (429, or 503
    /// `queue_timeout`); not errors.
    #[serde(default)]
    pub request_refusals: usize,
    /// Over every request that succeeded.
    pub latency_p50_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
    pub ttft_p50_seconds: Option<f64>,
    pub pulses_answered: usize,
    pub healthy_pulses: usize,
    /// The incident's question: while the pulse was red, what did the other checks say?
    pub while_pulse_red: WhilePulseRed,
    pub last_interval_verdicts: Verdicts,
}

/// The rules each per-interval verdict follows, written out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checks {
    pub pulse: String,
    pub uptime: String,
    pub task_counter: String,
    /// How far back the uptime and task-counter checks look.
    pub check_window_seconds: f64,
}

impl Report {
    /// What a person wants from the run at a glance (stdout at the end).
    pub fn summary_text(&self) -> String {
        let s = &self.summary;
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}s"));
        let mut text = format!(
            "{} requests ({} failed, {} refused by admission): p50 {}, p99 {}, time to first token p50 {}; {} pulses \
             answered ({} healthy)\n",
            s.requests,
            s.request_errors,
            s.request_refusals,
            secs(s.latency_p50_seconds),
            secs(s.latency_p99_seconds),
            secs(s.ttft_p50_seconds),
            s.pulses_answered,
            s.healthy_pulses
        );
        match (&self.suggested, &self.pulse_spec_yaml) {
            (Some(g), Some(yaml)) => text.push_str(&format!(
                "suggested from {} healthy pulses p50 {:.3}s, p99 {:.3}s ({}):\n{yaml}",
                g.basis.pulses, g.basis.p50_seconds, g.basis.p99_seconds, self.baseline.note
            )),
            _ => text.push_str(&format!("no suggestion: {}\n", self.no_suggestion.as_deref().unwrap_or("-"))),
        }
        let w = &s.while_pulse_red;
        text.push_str(&format!(
            "pulse red in {} of {} intervals; meanwhile uptime check green in {}, task-counter check green in {}; \
             the host explains {}\n",
            w.intervals, s.intervals, w.uptime_green, w.task_counter_green, w.host_explained
        ));
        let h = &self.host_pressure;
        if h.intervals_read > 0 {
            let causes: Vec<String> = h.causes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            text.push_str(&format!(
                "host pressure read in {} intervals; the host explains {}{}\n",
                h.intervals_read,
                h.intervals_explained,
                if causes.is_empty() { String::new() } else { format!(" ({})", causes.join(", ")) }
            ));
        } else {
            text.push_str(&format!("host pressure {}\n", h.note.trim_start_matches("Host pressure ")));
        }
        for c in &self.indicators {
            let rho = c.spearman_rho.map_or_else(|| "none".to_owned(), |r| format!("{r:+.2}"));
            text.push_str(&format!("  rank correlation with p99 latency: {:<32} {rho}\n", c.indicator));
        }
        text
    }
}

/// A suggestion as `spec.pulse` YAML, in whole milliseconds (the CRD's duration form).
pub fn pulse_spec_yaml(s: &Suggestion) -> String {
    let ms = |seconds: f64| (seconds * 1000.0).round() as u64;
    let drift = if s.drift.enabled {
        format!(
            "    yellowFactor: {}\n    redFactor: {}\n    floor: {}ms\n",
            s.drift.yellow_factor,
            s.drift.red_factor,
            ms(s.drift.floor_seconds)
        )
    } else {
        "    enabled: false\n".to_owned()
    };
    format!(
        "pulse:\n  yellowAfter: {}ms\n  redAfter: {}ms\n  timeout: {}ms\n  drift:\n{drift}",
        ms(s.yellow_after_seconds),
        ms(s.red_after_seconds),
        ms(s.timeout_seconds)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::suggest;

    #[test]
    fn the_yaml_is_a_pulse_spec_the_agent_accepts() {
        let s = suggest(&[0.58, 0.6, 0.61, 0.6, 0.59, 0.62, 0.6]).unwrap_or_else(|| panic!("enough pulses"));
        let pulse: String = pulse_spec_yaml(&s).lines().map(|l| format!("  {l}\n")).collect();
        let yaml = format!(
            "apiVersion: metalkube.dev/v1alpha1\nkind: MetalModel\nmetadata:\n  name: m\nspec:\n  model:\n    source: file:///m.gguf\n{pulse}"
        );
        let models =
            metalkube_api::parse_models_yaml(&yaml, "calibrated.yaml").unwrap_or_else(|e| panic!("{e}: {yaml}"));
        let p = &models[0].spec.pulse;
        let ms = std::time::Duration::from_millis;
        assert_eq!((p.yellow_after.get(), p.red_after.get(), p.drift.floor.get()), (ms(1240), ms(3100), ms(1240)));
        assert_eq!((p.drift.enabled, p.drift.yellow_factor, p.drift.red_factor), (true, 2.1, 5.2));

        let spread = suggest(&[0.005, 0.005, 0.006, 0.005, 2.3]).unwrap_or_else(|| panic!("enough pulses"));
        let pulse: String = pulse_spec_yaml(&spread).lines().map(|l| format!("  {l}\n")).collect();
        let yaml = yaml.split("  pulse:").next().unwrap_or_default().to_owned() + &pulse;
        let models = metalkube_api::parse_models_yaml(&yaml, "spread.yaml").unwrap_or_else(|e| panic!("{e}: {yaml}"));
        let p = &models[0].spec.pulse;
        assert!(!p.drift.enabled && p.red_after < p.timeout, "{yaml}");
    }
}
