//! The observe stage: what the agent tells people and Prometheus. The per-model report, the
//! metrics, the HTTP endpoints and status page, host memory and GPU, and the engine's own
//! counters.

pub mod engine_metrics;
pub mod host;
pub mod html_text;
pub mod http;
pub mod http_guard;
pub mod metrics;
pub mod report;
pub mod status_page;
