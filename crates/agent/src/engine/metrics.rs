//! The engine stage's series: the figures of a model's llama-server processes, summed over every
//! process the model has had: resident memory, llama-server's own token and time counters, the
//! requests it is working on and has deferred, and the share of its context (KV cache) those
//! requests hold. Registered by `EngineMetrics::register`; written by
//! `engine::follower` through a model's `EngineSeries`.

use metalkube_api::ModelKey;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::observe::metrics::{F64Counter, F64Gauge, ModelLabels};

/// The engine stage's families.
pub struct EngineMetrics {
    rss: Family<ModelLabels, Gauge>,
    prompt_tokens: Family<ModelLabels, Counter>,
    prompt_seconds: Family<ModelLabels, F64Counter>,
    predicted_tokens: Family<ModelLabels, Counter>,
    predicted_seconds: Family<ModelLabels, F64Counter>,
    requests_processing: Family<ModelLabels, Gauge>,
    requests_deferred: Family<ModelLabels, Gauge>,
    kv_cache_usage: Family<ModelLabels, F64Gauge>,
}

/// One model's engine series, resolved once per model: what the engine follower writes.
#[derive(Clone)]
pub struct EngineSeries {
    pub rss: Gauge,
    pub prompt_tokens: Counter,
    pub prompt_seconds: F64Counter,
    pub predicted_tokens: Counter,
    pub predicted_seconds: F64Counter,
    pub requests_processing: Gauge,
    pub requests_deferred: Gauge,
    /// Written by the follower from `/slots`; the serving port answers it to endpoint pickers.
    pub kv_cache_usage: F64Gauge,
}

impl EngineMetrics {
    /// Creates the families and registers them on `r`, in the order `/metrics` shows them.
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            rss: Family::default(),
            prompt_tokens: Family::default(),
            prompt_seconds: Family::default(),
            predicted_tokens: Family::default(),
            predicted_seconds: Family::default(),
            requests_processing: Family::default(),
            requests_deferred: Family::default(),
            kv_cache_usage: Family::default(),
        };
        r.register_with_unit(
            "engine_resident_memory",
            "Resident memory of the model's llama-server process (0 while none runs)",
            Unit::Bytes,
            m.rss.clone(),
        );
        r.register(
            "engine_prompt_tokens",
            "Prompt tokens the engine processed, excluding cached ones (llama-server's own count, summed over engine restarts)",
            m.prompt_tokens.clone(),
        );
        r.register_with_unit(
            "engine_prompt",
            "Time the engine spent processing prompts (llama-server's own count)",
            Unit::Seconds,
            m.prompt_seconds.clone(),
        );
        r.register(
            "engine_predicted_tokens",
            "Tokens the engine generated, pulses included (llama-server's own count)",
            m.predicted_tokens.clone(),
        );
        r.register_with_unit(
            "engine_predicted",
            "Time the engine spent generating tokens (llama-server's own count)",
            Unit::Seconds,
            m.predicted_seconds.clone(),
        );
        r.register(
            "engine_requests_processing",
            "Requests the engine is working on, as it reports",
            m.requests_processing.clone(),
        );
        r.register(
            "engine_requests_deferred",
            "Requests the engine has deferred for lack of a free slot, as it reports",
            m.requests_deferred.clone(),
        );
        // No `Unit`: prometheus-client would append `_ratios`; a 0..1 ratio is named `_ratio`.
        r.register(
            "engine_kv_cache_usage_ratio",
            "Share (0 to 1) of the engine's context (KV cache) held by the requests it is working on, read from its /slots",
            m.kv_cache_usage.clone(),
        );
        m
    }

    /// The engine series of `model`, created at 0.
    pub fn series(&self, model: &ModelKey) -> EngineSeries {
        let labels = ModelLabels::new(model);
        EngineSeries {
            rss: self.rss.get_or_create(&labels).clone(),
            prompt_tokens: self.prompt_tokens.get_or_create(&labels).clone(),
            prompt_seconds: self.prompt_seconds.get_or_create(&labels).clone(),
            predicted_tokens: self.predicted_tokens.get_or_create(&labels).clone(),
            predicted_seconds: self.predicted_seconds.get_or_create(&labels).clone(),
            requests_processing: self.requests_processing.get_or_create(&labels).clone(),
            requests_deferred: self.requests_deferred.get_or_create(&labels).clone(),
            kv_cache_usage: self.kv_cache_usage.get_or_create(&labels).clone(),
        }
    }

    /// Drops every series of a model that is no longer served, so dashboards do not show ghosts.
    pub fn forget(&self, model: &ModelKey) {
        let labels = ModelLabels::new(model);
        for family in [&self.rss, &self.requests_processing, &self.requests_deferred] {
            family.remove(&labels);
        }
        for family in [&self.prompt_tokens, &self.predicted_tokens] {
            family.remove(&labels);
        }
        for family in [&self.prompt_seconds, &self.predicted_seconds] {
            family.remove(&labels);
        }
        self.kv_cache_usage.remove(&labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::AgentRegistry;

    #[test]
    fn a_models_counters_exist_at_zero_and_go_with_it() {
        let registry = AgentRegistry::default();
        let engine = registry.register(EngineMetrics::register);
        let series = engine.series(&ModelKey::new("ns", "m"));
        series.rss.set(4096);
        let text = registry.encode();
        for name in ["engine_prompt_tokens_total", "engine_predicted_tokens_total"] {
            let line = format!(r#"metalkube_agent_{name}{{model="ns/m"}} 0"#);
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(text.contains(r#"metalkube_agent_engine_resident_memory_bytes{model="ns/m"} 4096"#), "{text}");
        series.kv_cache_usage.set(0.25);
        let text = registry.encode();
        assert!(text.contains(r#"metalkube_agent_engine_kv_cache_usage_ratio{model="ns/m"} 0.25"#), "{text}");
        engine.forget(&ModelKey::new("ns", "m"));
        assert!(!registry.encode().contains("ns/m"), "{}", registry.encode());
    }
}
