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
