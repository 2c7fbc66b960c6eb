//! The health stage's series: the pulse (its times, grade and thresholds, saturation), what the
//! host explained, restarts withheld, the model's phase, its restarts by reason, and the pulses not
//! sent. Registered by `HealthMetrics::register`; the supervisor writes them as it acts on the
//! grader's verdicts.

use metalkube_api::{ModelKey, Phase, PulseSpec};
use metalkube_vitals::attribution::HostCause;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::health::evidence::PulseSkip;
use crate::model::FaultReason;
use crate::observe::metrics::{F64Gauge, HistogramFamily, ModelLabels, ReasonLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub model: String,
    /// One of `HostCause::as_str()`.
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub model: String,
    pub phase: String,
}

/// Why a restart the pulse asked for was not made (the `reason` of `restarts_withheld_total`):
/// the variant's name in snake_case, every variant counted from the model's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Withheld {
    /// The host explained the slowness.
    HostContended,
    /// A restart for slowness had not cured it (`SlowAfterRestart`).
    SlowAfterRestart,
}

impl Withheld {
    /// Every reason, listed by the compiler (strum's `VariantArray`).
    pub const ALL: &'static [Withheld] = <Withheld as strum::VariantArray>::VARIANTS;

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

fn pulse_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0])
}

/// The health stage's families. The supervisor publishes each graded pulse into the `pulse_*`,
/// `saturated`, `host_contended` and `decode_per_token` families directly; the rest through the
/// methods, which know their label sets.
pub struct HealthMetrics {
    pub pulse_duration: HistogramFamily<ModelLabels>,
    pub pulse_last: Family<ModelLabels, F64Gauge>,
    pub pulse_compute_last: Family<ModelLabels, F64Gauge>,
    pub pulse_grade: Family<ModelLabels, Gauge>,
    pulse_yellow_after: Family<ModelLabels, F64Gauge>,
    pulse_red_after: Family<ModelLabels, F64Gauge>,
    pub saturated: Family<ModelLabels, Gauge>,
    /// The share of CPU other processes used during the model's last pulse round.
    pub pulse_host_others_cpu: Family<ModelLabels, F64Gauge>,
    /// 1 while the host explains the model's slow pulse.
    pub host_contended: Family<ModelLabels, Gauge>,
    /// Slow (yellow or red) pulse verdicts the host explained, by cause.
    host_explained: Family<CauseLabels, Counter>,
    /// 1 while restarts for slowness are withheld because one did not cure.
    slow_after_restart: Family<ModelLabels, Gauge>,
    /// Restarts a red pulse asked for and the agent did not make, by `Withheld` reason.
    restarts_withheld: Family<ReasonLabels, Counter>,
    pub decode_per_token: Family<ModelLabels, F64Gauge>,
    engine_up: Family<ModelLabels, Gauge>,
    engine_phase: Family<PhaseLabels, Gauge>,
    engine_restarts: Family<ReasonLabels, Counter>,
    /// Scheduled pulses not sent, by `PulseSkip` reason.
    pulses_skipped: Family<ReasonLabels, Counter>,
}

impl HealthMetrics {
    /// Creates the families and registers them on `r`, in the order `/metrics` shows them.
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            pulse_duration: Family::new_with_constructor(pulse_histogram),
            pulse_last: Family::default(),
            pulse_compute_last: Family::default(),
            pulse_grade: Family::default(),
            pulse_yellow_after: Family::default(),
            pulse_red_after: Family::default(),
            saturated: Family::default(),
            pulse_host_others_cpu: Family::default(),
            host_contended: Family::default(),
            host_explained: Family::default(),
            slow_after_restart: Family::default(),
            restarts_withheld: Family::default(),
            decode_per_token: Family::default(),
            engine_up: Family::default(),
            engine_phase: Family::default(),
            engine_restarts: Family::default(),
            pulses_skipped: Family::default(),
        };
        r.register_with_unit(
            "pulse_duration",
            "Wall time of the pulse, a trivial completion sent straight to the engine",
            Unit::Seconds,
            m.pulse_duration.clone(),
        );
        r.register_with_unit(
            "pulse_last_duration",
            "Wall time of the most recent pulse",
            Unit::Seconds,
            m.pulse_last.clone(),
        );
        r.register_with_unit(
            "pulse_last_compute",
            "Engine compute time (prompt + decode) the most recent pulse reported",
            Unit::Seconds,
            m.pulse_compute_last.clone(),
        );
        r.register("pulse_grade", "Published pulse grade: 0 green, 1 yellow, 2 red", m.pulse_grade.clone());
        r.register_with_unit(
            "pulse_yellow_after",
            "The model's spec.pulse.yellowAfter: pulses slower than this are yellow",
            Unit::Seconds,
            m.pulse_yellow_after.clone(),
        );
        r.register_with_unit(
            "pulse_red_after",
            "The model's spec.pulse.redAfter: pulses slower than this are red",
            Unit::Seconds,
            m.pulse_red_after.clone(),
        );
        r.register(
            "saturated",
            "1 when the model is busy (at its limit with normal compute), not sick",
            m.saturated.clone(),
        );
        r.register_with_unit(
            "pulse_host_others_cpu",
            "Share of all CPU time that processes other than the model's engine used during its last pulse round",
            Unit::Other("ratio".to_owned()),
            m.pulse_host_others_cpu.clone(),
        );
        r.register(
            "host_contended",
            "1 while the host explains the model's slow pulse (other processes, memory, IO, heat): graded by the absolute thresholds alone, not restarted",
            m.host_contended.clone(),
        );
        r.register(
            "pulse_host_explained",
            "Slow (yellow or red) pulse verdicts the host explained, by cause",
            m.host_explained.clone(),
        );
        r.register(
            "slow_after_restart",
            "1 while restarts for slowness are withheld: a restart for a red pulse did not make the engine faster",
            m.slow_after_restart.clone(),
        );
        r.register(
            "restarts_withheld",
            "Restarts a red pulse asked for and the agent did not make: host_contended or slow_after_restart",
            m.restarts_withheld.clone(),
        );
        r.register_with_unit(
            "decode_per_token",
            "Engine decode time per token, EWMA over real responses",
            Unit::Seconds,
            m.decode_per_token.clone(),
        );
        r.register(
            "engine_up",
            "1 when the engine is serving or asleep (it wakes on the next request)",
            m.engine_up.clone(),
        );
        r.register("engine_phase", "1 for the model's current phase, 0 for the others", m.engine_phase.clone());
        r.register("engine_restarts", "Engine restarts by reason", m.engine_restarts.clone());
        r.register(
            "pulses_skipped",
            "Scheduled pulses not sent, by reason: traffic (client requests completed at normal speed stood in), sleeping (a pulse would wake the engine) or idle (an engine allowed to sleep is left alone so it can)",
            m.pulses_skipped.clone(),
        );
        m
    }

    /// Creates the model's bounded counters at 0 (restarts, skipped pulses, withheld restarts and
    /// host causes, by every reason), so alerts see the first event.
    pub fn model_started(&self, model: &ModelKey) {
        for reason in FaultReason::ALL {
            drop(self.engine_restarts.get_or_create(&ReasonLabels::new(model, reason.as_str())));
        }
        for why in PulseSkip::ALL {
            drop(self.pulses_skipped.get_or_create(&ReasonLabels::new(model, why.as_str())));
        }
        for why in Withheld::ALL {
            drop(self.restarts_withheld.get_or_create(&ReasonLabels::new(model, why.as_str())));
        }
        for cause in HostCause::ALL {
            drop(self.host_explained.get_or_create(&cause_labels(model, *cause)));
        }
        self.slow_after_restart.get_or_create(&ModelLabels::new(model)).set(0);
    }

    pub fn set_phase(&self, model: &ModelKey, phase: Phase) {
        for &p in Phase::ALL {
            self.engine_phase.get_or_create(&phase_labels(model, p)).set(i64::from(p == phase));
        }
        self.engine_up.get_or_create(&ModelLabels::new(model)).set(i64::from(phase.engine_up()));
    }

    /// The pulse thresholds of a model's spec, for dashboards to draw next to its pulses.
    pub fn set_pulse_spec(&self, model: &ModelKey, pulse: &PulseSpec) {
        let labels = ModelLabels::new(model);
        self.pulse_yellow_after.get_or_create(&labels).set(pulse.yellow_after.get().as_secs_f64());
        self.pulse_red_after.get_or_create(&labels).set(pulse.red_after.get().as_secs_f64());
    }

    /// A model with no engine to grade (stopped, starting over, failed) has no pulse series,
    /// rather than the last engine's grade, pulse times and saturation.
    pub fn clear_pulse(&self, model: &ModelKey) {
        let labels = ModelLabels::new(model);
        self.pulse_grade.remove(&labels);
        self.saturated.remove(&labels);
        self.host_contended.remove(&labels);
        self.pulse_host_others_cpu.remove(&labels);
        self.pulse_last.remove(&labels);
        self.pulse_compute_last.remove(&labels);
    }

    pub fn restarted(&self, model: &ModelKey, reason: FaultReason) {
        self.engine_restarts.get_or_create(&ReasonLabels::new(model, reason.as_str())).inc();
    }

    pub fn pulse_skipped(&self, model: &ModelKey, why: PulseSkip) {
        self.pulses_skipped.get_or_create(&ReasonLabels::new(model, why.as_str())).inc();
    }

    pub fn restart_withheld(&self, model: &ModelKey, why: Withheld) {
        self.restarts_withheld.get_or_create(&ReasonLabels::new(model, why.as_str())).inc();
    }

    /// A confirmed slow verdict the host explained.
    pub fn host_explained(&self, model: &ModelKey, cause: HostCause) {
        self.host_explained.get_or_create(&cause_labels(model, cause)).inc();
    }

    pub fn set_slow_after_restart(&self, model: &ModelKey, on: bool) {
        self.slow_after_restart.get_or_create(&ModelLabels::new(model)).set(i64::from(on));
    }

    /// Drops every series of a model that is no longer served, so dashboards do not show ghosts.
    pub fn forget(&self, model: &ModelKey) {
        let labels = ModelLabels::new(model);
        for family in [&self.pulse_last, &self.pulse_compute_last, &self.pulse_yellow_after, &self.pulse_red_after] {
            family.remove(&labels);
        }
        self.pulse_duration.remove(&labels);
        for family in
            [&self.pulse_grade, &self.engine_up, &self.saturated, &self.slow_after_restart, &self.host_contended]
        {
            family.remove(&labels);
        }
        self.decode_per_token.remove(&labels);
        self.pulse_host_others_cpu.remove(&labels);
        for &p in Phase::ALL {
            self.engine_phase.remove(&phase_labels(model, p));
        }
        for why in PulseSkip::ALL {
            self.pulses_skipped.remove(&ReasonLabels::new(model, why.as_str()));
        }
        for reason in FaultReason::ALL {
            self.engine_restarts.remove(&ReasonLabels::new(model, reason.as_str()));
        }
        for why in Withheld::ALL {
            self.restarts_withheld.remove(&ReasonLabels::new(model, why.as_str()));
        }
        for cause in HostCause::ALL {
            self.host_explained.remove(&cause_labels(model, *cause));
        }
    }
}

fn cause_labels(model: &ModelKey, cause: HostCause) -> CauseLabels {
    CauseLabels { model: model.to_string(), cause: cause.as_str().to_owned() }
}

fn phase_labels(model: &ModelKey, phase: Phase) -> PhaseLabels {
    PhaseLabels { model: model.to_string(), phase: phase.as_str().to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::AgentRegistry;

    fn registered() -> (AgentRegistry, HealthMetrics) {
        let registry = AgentRegistry::default();
        let health = registry.register(HealthMetrics::register);
        (registry, health)
    }

    #[test]
    fn bounded_counters_exist_at_zero_from_the_model_start() {
        let (registry, health) = registered();
        health.model_started(&ModelKey::new("ns", "m"));
        let text = registry.encode();
        let mut lines = Vec::new();
        for reason in FaultReason::ALL {
            lines.push(format!(
                r#"metalkube_agent_engine_restarts_total{{model="ns/m",reason="{}"}} 0"#,
                reason.as_str()
            ));
        }
        for why in PulseSkip::ALL {
            lines.push(format!(r#"metalkube_agent_pulses_skipped_total{{model="ns/m",reason="{}"}} 0"#, why.as_str()));
        }
        for why in Withheld::ALL {
            lines.push(format!(
                r#"metalkube_agent_restarts_withheld_total{{model="ns/m",reason="{}"}} 0"#,
                why.as_str()
            ));
        }
        for cause in HostCause::ALL {
            lines.push(format!(
                r#"metalkube_agent_pulse_host_explained_total{{model="ns/m",cause="{}"}} 0"#,
                cause.as_str()
            ));
        }
        lines.push(r#"metalkube_agent_slow_after_restart{model="ns/m"} 0"#.to_owned());
        for line in lines {
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn one_phase_is_current_and_a_forgotten_model_leaves_no_series() {
        let (registry, health) = registered();
        health.model_started(&ModelKey::new("ns", "m"));
        health.set_pulse_spec(&ModelKey::new("ns", "m"), &PulseSpec::default());
        health.set_phase(&ModelKey::new("ns", "m"), Phase::Sleeping);
        health.restarted(&ModelKey::new("ns", "m"), FaultReason::Hang);
        health.restart_withheld(&ModelKey::new("ns", "m"), Withheld::SlowAfterRestart);
        health.pulse_grade.get_or_create(&ModelLabels::new(&ModelKey::new("ns", "m"))).set(1);
        let text = registry.encode();
        for line in [
            r#"metalkube_agent_engine_phase{model="ns/m",phase="Sleeping"} 1"#,
            r#"metalkube_agent_engine_phase{model="ns/m",phase="Serving"} 0"#,
            r#"metalkube_agent_engine_up{model="ns/m"} 1"#,
            r#"metalkube_agent_engine_restarts_total{model="ns/m",reason="hang"} 1"#,
            r#"metalkube_agent_restarts_withheld_total{model="ns/m",reason="slow_after_restart"} 1"#,
            r#"metalkube_agent_pulse_grade{model="ns/m"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        health.forget(&ModelKey::new("ns", "m"));
        assert!(!registry.encode().contains("ns/m"), "{}", registry.encode());
    }
}
