//! The observe stage: what the agent tells people and Prometheus. The metrics registry and its
//! series, the status page (rendered from the model reports), and the engine's own counters
//! re-exported per model. The port that serves them is `http_port`.

pub mod engine_metrics;
pub mod html_text;
pub mod metrics;
pub mod status_page;
