//! The observe stage: what the agent tells people and Prometheus. The metrics plumbing every
//! stage registers its own families on (`metrics`), and the status page (rendered from the model
//! reports). The port that serves them is `http_port`.

pub mod metrics;
pub mod status_page;
