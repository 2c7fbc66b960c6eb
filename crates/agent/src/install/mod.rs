//! Joining the fleet: the bundle from `kubectl metalkube enroll` installed into the state
//! directory, and the launchd or systemd service that runs the agent with it.

pub mod enrollment;
mod error;
pub mod join;
pub mod service;

pub use error::InstallError;
