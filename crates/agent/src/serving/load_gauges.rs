//! The serving port's own `GET /metrics`: the three figures the Gateway API inference
//! extension's model-server protocol reads from a model server, for an endpoint picker (llm-d's
//! EPP) that routes to this port: requests waiting, requests running, and the share of the
//! engine's context (KV cache) in use.
//!
//! Why here and not only on the agent's port: the picker scrapes the address it routes to
//! (`metrics-data-source`: the endpoint's own host and port, path `/metrics` by default; llm-d's
//! file discovery of endpoints cannot scrape elsewhere at all), and it reads one sample per
//! family with no label to tell models apart unless each model gets an engine config of its own.
//! The serving port is one model's, so its answer needs no label, and one engine config maps every
//! metalkube model. The agent's port shows the same families labelled by model for Prometheus.
//!
//! The names are the agent's own (`metalkube_agent_*`, the families `/metrics` on the agent's port
//! shows with a `model` label), not vLLM's: a picker told "this endpoint is vLLM" would also read
//! vLLM's LoRA and cache-config families, which we do not have. The text is Prometheus' classic
//! format (0.0.4), which the picker's parser (Go `expfmt.TextParser`) reads.

use std::fmt::Write as _;

/// What `GET /metrics` on the serving port answers with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Requests waiting in the admission queue (the protocol's TotalQueuedRequests).
pub const QUEUED: &str = "metalkube_agent_queue_depth";
/// Engine tasks of the requests admitted and not finished (TotalRunningRequests).
pub const RUNNING: &str = "metalkube_agent_in_flight_requests";
/// Share (0 to 1) of the engine's context held by the requests it works on (KVCacheUtilization).
pub const KV_CACHE_USAGE: &str = "metalkube_agent_engine_kv_cache_usage_ratio";

/// One model's figures at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadGauges {
    pub queued: i64,
    pub running: i64,
    pub kv_cache_usage: f64,
}

impl LoadGauges {
    /// The figures as Prometheus text, unlabelled: the port is the model's.
    pub fn exposition(&self) -> String {
        let mut text = String::new();
        let mut gauge = |name: &str, help: &str, value: &dyn std::fmt::Display| {
            // Writing to a String cannot fail.
            let _ = write!(text, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
        };
        gauge(QUEUED, "Requests waiting in the admission queue", &self.queued);
        gauge(RUNNING, "Requests admitted to the engine and not finished (engine tasks)", &self.running);
        // A figure that is not a number would make a picker's score NaN: say 0..1 or nothing.
        if self.kv_cache_usage.is_finite() {
            gauge(
                KV_CACHE_USAGE,
                "Share (0 to 1) of the engine's context (KV cache) held by the requests it is working on",
                &self.kv_cache_usage.clamp(0.0, 1.0),
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_unlabelled_gauges_in_the_classic_text_format() {
        let text = LoadGauges { queued: 3, running: 2, kv_cache_usage: 0.125 }.exposition();
        assert_eq!(
            text,
            "# HELP metalkube_agent_queue_depth Requests waiting in the admission queue\n\
             # TYPE metalkube_agent_queue_depth gauge\n\
             metalkube_agent_queue_depth 3\n\
             # HELP metalkube_agent_in_flight_requests Requests admitted to the engine and not finished (engine tasks)\n\
             # TYPE metalkube_agent_in_flight_requests gauge\n\
             metalkube_agent_in_flight_requests 2\n\
             # HELP metalkube_agent_engine_kv_cache_usage_ratio Share (0 to 1) of the engine's context (KV cache) held by the requests it is working on\n\
             # TYPE metalkube_agent_engine_kv_cache_usage_ratio gauge\n\
             metalkube_agent_engine_kv_cache_usage_ratio 0.125\n"
        );
    }

    #[test]
    fn the_ratio_stays_within_0_and_1_or_is_left_out() {
        let text = LoadGauges { queued: 0, running: 0, kv_cache_usage: 0.0 }.exposition();
        assert!(text.contains("\nmetalkube_agent_engine_kv_cache_usage_ratio 0\n"), "{text}");
        let text = LoadGauges { queued: 0, running: 0, kv_cache_usage: 7.0 }.exposition();
        assert!(text.contains("\nmetalkube_agent_engine_kv_cache_usage_ratio 1\n"), "{text}");
        let text = LoadGauges { queued: 0, running: 0, kv_cache_usage: f64::NAN }.exposition();
        assert!(!text.contains("kv_cache"), "{text}");
    }
}
