use thiserror::Error;

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("agent {node}: {message}")]
    Agent { node: String, message: String },
    #[error("agent {node}: circuit open after repeated failures; next probe in {retry_in_ms} ms")]
    CircuitOpen { node: String, retry_in_ms: u64 },
    #[error("MetalNode {node}: spec.agentEndpoint {endpoint:?}: {message}")]
    BadEndpoint { node: String, endpoint: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("MetalModel {key}: {message}")]
    Model { key: String, message: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("lease {name}: {message}")]
    Lease { name: String, message: String },
}

/// Every `metric_label()`, so each kind's error counter exists at 0 from the start.
pub const ERROR_KINDS: [&str; 6] = ["kube", "agent", "circuit_open", "model", "finalizer", "lease"];

impl ControllerError {
    /// The `kind` label of `metalkube_controller_reconcile_errors_total`: one of `ERROR_KINDS`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ControllerError::Kube(_) => "kube",
            ControllerError::Agent { .. } | ControllerError::BadEndpoint { .. } | ControllerError::Tls(_) => "agent",
            ControllerError::CircuitOpen { .. } => "circuit_open",
            ControllerError::Model { .. } => "model",
            ControllerError::Finalizer(_) => "finalizer",
            ControllerError::Lease { .. } => "lease",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_counted_under_a_label_that_exists_at_zero() {
        let s = String::new;
        let all = [
            ControllerError::Kube(kube::Error::LinesCodecMaxLineLengthExceeded),
            ControllerError::Agent { node: s(), message: s() },
            ControllerError::CircuitOpen { node: s(), retry_in_ms: 0 },
            ControllerError::BadEndpoint { node: s(), endpoint: s(), message: s() },
            ControllerError::Tls(s()),
            ControllerError::Model { key: s(), message: s() },
            ControllerError::Finalizer(s()),
            ControllerError::Lease { name: s(), message: s() },
        ];
        for e in &all {
            assert!(ERROR_KINDS.contains(&e.metric_label()), "{e:?}");
        }
        let used: std::collections::BTreeSet<_> = all.iter().map(ControllerError::metric_label).collect();
        assert_eq!(used.len(), ERROR_KINDS.len(), "every kind is used by some error");
    }
}
