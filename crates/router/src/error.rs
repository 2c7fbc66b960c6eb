//! The router's errors: what stops it from starting or from following an agent.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("agent of node {node}: endpoint {problem}")]
    AgentEndpoint { node: String, problem: String },
    #[error("agent of node {node}: TLS settings")]
    AgentTls {
        node: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("--agent {given:?}: {problem}; expected NODE=URL, e.g. mac-1=https://10.0.0.21:7443")]
    AgentFlag { given: String, problem: &'static str },
    #[error("reading {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {address}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ext_proc server")]
    ExtProc {
        #[source]
        source: tonic::transport::Error,
    },
}
