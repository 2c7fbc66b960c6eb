//! What `run` or `serve` started, handed to the daemon that runs it to the end.

use std::sync::Arc;

use metalkube_agent::Agent;
use metalkube_agent::http_port::HttpPortOptions;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What a mode started: the agent, its HTTP port (bound, not yet served) and the mode's own
/// work (following the models directory, serving the gRPC API), whose end stops the agent.
pub struct Started {
    pub agent: Arc<Agent>,
    pub listener: TcpListener,
    pub http_options: HttpPortOptions,
    pub work: JoinHandle<anyhow::Result<()>>,
}
