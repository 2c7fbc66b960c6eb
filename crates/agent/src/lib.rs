//! metalkube-agent: supervises llama-server processes, grades their pulse, and reports health.
//!
//! Floors, top to bottom; each module imports only from floors below it (checked by
//! `tests/layering.rs`):
//! - the binary: `main` (parsing, dispatch), then `cli/` (each subcommand's flags and start-up;
//!   `calibrate`, measuring a model's pulse under load, is the `metalkube-calibrate` crate, a
//!   client of the agent);
//! - `install` (joining a fleet);
//! - the agent's ports: `control` (what is desired: the controller's gRPC API, the models
//!   directory) and `http_port` (status page, readiness, metrics, model state);
//! - `agent` (every model's supervisor, by key), then `supervisor` (one task per model: it
//!   orchestrates the stages), then `context` and `tls` (what they share);
//! - the stages: `engine` (the process and its model file), `health` (grades the pulse, decides
//!   restarts), `serving` (the port clients use, its queue and guards);
//! - `observe` (the metrics plumbing, the status page); each stage above owns its metric
//!   families (`health::metrics`, `engine::metrics`, `serving::metrics`, `tls`), and
//!   `context::metrics` composes them into the agent's registry;
//! - `model`, the ground floor: the words every stage shares (what is desired of a model, its
//!   report, its load, why it restarted).
//!
//! What the pulse and the host measure is in the `metalkube-vitals` crate, below all of these.

pub mod agent;
mod confined_path;
pub mod context;
pub mod control;
pub mod engine;
mod ewma;
pub mod health;
pub mod http_port;
pub mod install;
pub mod model;
pub mod observe;
pub mod serving;
pub mod supervisor;
pub mod tls;

pub use agent::Agent;
pub use context::AgentConfig;
pub use model::DesiredModel;
