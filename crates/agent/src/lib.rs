//! metalkube-agent: supervises llama-server processes, grades their pulse, and reports health.
//!
//! A request and a health event each follow one line through these stages: `control` (what is
//! desired) → `supervisor` (orchestrates, one task per model) → `engine` (the process and its
//! model file) → `health` (the pulse and its grade) → `serving` (the port clients use) →
//! `observe` (reports, metrics, HTTP). `install` joins a Mac to the fleet; `calibrate` is the
//! tool that measures a model's pulse and the alternatives under load, to set its thresholds.

pub mod agent;
pub mod calibrate;
mod confined_path;
pub mod context;
pub mod control;
pub mod desired;
pub mod engine;
mod error;
mod ewma;
pub mod health;
pub mod install;
pub mod observe;
pub mod serving;
pub mod supervisor;

pub use agent::Agent;
pub use context::AgentConfig;
pub use desired::DesiredModel;
pub use error::AgentError;
