//! The controller at fleet scale: simulated agents that speak the agent's gRPC API over mTLS,
//! cheap enough to run a hundred in one process, and the `metalkube-fleetbench` binary that
//! drives the real controller against them (`cargo xtask bench fleet`).

pub mod agent_server;
pub mod agent_sim;

/// Why a simulated agent could not be served.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("binding a simulated agent's port")]
    Bind(#[source] std::io::Error),
    #[error("TLS {what}")]
    Tls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("TLS client verifier: {0}")]
    Verifier(String),
}
