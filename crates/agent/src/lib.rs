//! metalkube-agent: supervises llama-server processes, grades their pulse, and reports health.

pub mod admission;
pub mod agent;
pub mod api_keys;
pub mod context;
pub mod desired;
pub mod desired_store;
pub mod download;
pub mod engine_args;
pub mod engine_metrics;
pub mod engine_process;
pub mod enrollment;
mod error;
pub mod grader;
pub mod grpc;
pub mod grpc_tls;
pub mod host;
pub mod http;
pub mod join;
pub mod memory_ledger;
pub mod metrics;
pub mod model_file;
pub mod models_dir;
pub mod orphans;
pub mod ports;
pub mod pulse;
pub mod report;
pub mod restart_backoff;
pub mod service;
pub mod supervisor;

pub use agent::Agent;
pub use context::AgentConfig;
pub use desired::DesiredModel;
pub use error::AgentError;
