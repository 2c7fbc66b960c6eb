//! The model download's series: how far a model's download has come and how fast it goes (while one
//! runs), and the bytes received and resumes over all downloads. Registered by
//! `DownloadMetrics::register`; the supervisor publishes a running download's progress.

use metalkube_api::{DownloadProgress, ModelKey};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::observe::metrics::{F64Gauge, ModelLabels};

/// The model download's families.
pub struct DownloadMetrics {
    done: Family<ModelLabels, Gauge>,
    size: Family<ModelLabels, Gauge>,
    rate: Family<ModelLabels, F64Gauge>,
    received: Counter,
    resumes: Counter,
}

impl DownloadMetrics {
    /// Creates the families and registers them on `r`, in the order `/metrics` shows them.
    pub fn register(r: &mut Registry) -> Self {
        let m = Self {
            done: Family::default(),
            size: Family::default(),
            rate: Family::default(),
            received: Counter::default(),
            resumes: Counter::default(),
        };
        r.register_with_unit(
            "model_download",
            "Bytes of the model's files on disk while it downloads (resumed bytes included)",
            Unit::Bytes,
            m.done.clone(),
        );
        r.register_with_unit(
            "model_download_size",
            "Size of the model's files while it downloads, once the server has said",
            Unit::Bytes,
            m.size.clone(),
        );
        r.register("model_download_rate_bytes_per_second", "Recent download rate of the model's files", m.rate.clone());
        r.register_with_unit(
            "download_received",
            "Model bytes received over the network",
            Unit::Bytes,
            m.received.clone(),
        );
        r.register("download_resumes", "Downloads continued from a partial file after a cut", m.resumes.clone());
        m
    }

    /// A model's download progress, or None to drop its series when no download runs.
    pub fn set_progress(&self, model: &ModelKey, progress: Option<&DownloadProgress>) {
        let labels = ModelLabels::new(model);
        match progress {
            Some(p) => {
                self.done.get_or_create(&labels).set(i64::try_from(p.done_bytes).unwrap_or(i64::MAX));
                match p.total_bytes {
                    Some(t) => {
                        self.size.get_or_create(&labels).set(i64::try_from(t).unwrap_or(i64::MAX));
                    }
                    None => {
                        self.size.remove(&labels);
                    }
                }
                self.rate.get_or_create(&labels).set(p.bytes_per_second.unwrap_or(0.0));
            }
            None => {
                self.done.remove(&labels);
                self.size.remove(&labels);
                self.rate.remove(&labels);
            }
        }
    }

    /// Bytes that came over the network for one file, and how often it was resumed.
    pub fn downloaded(&self, received_bytes: u64, resumes: u64) {
        self.received.inc_by(received_bytes);
        self.resumes.inc_by(resumes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::metrics::AgentRegistry;

    #[test]
    fn progress_shows_while_a_download_runs_and_totals_stay() {
        let registry = AgentRegistry::default();
        let downloads = registry.register(DownloadMetrics::register);
        let progress =
            DownloadProgress { done_bytes: 10, total_bytes: Some(100), bytes_per_second: Some(5.0), eta_seconds: None };
        downloads.set_progress(&ModelKey::new("ns", "m"), Some(&progress));
        downloads.downloaded(100, 1);
        let text = registry.encode();
        for line in [
            r#"metalkube_agent_model_download_bytes{model="ns/m"} 10"#,
            r#"metalkube_agent_model_download_size_bytes{model="ns/m"} 100"#,
            r#"metalkube_agent_model_download_rate_bytes_per_second{model="ns/m"} 5.0"#,
            "metalkube_agent_download_received_bytes_total 100",
            "metalkube_agent_download_resumes_total 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        downloads.set_progress(&ModelKey::new("ns", "m"), None);
        let text = registry.encode();
        assert!(!text.contains("ns/m"), "no download series once done: {text}");
        assert!(text.contains("metalkube_agent_download_resumes_total 1"), "{text}");
    }
}
