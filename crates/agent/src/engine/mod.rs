//! The engine stage: a llama-server process and what it needs to start. Its model file (local,
//! or downloaded into the cache), its arguments, its ports, the memory it may take, the delay
//! before a restart, and engines a crashed agent left behind; the engine's own figures, followed
//! and re-exported per model (`follower`, into the families of `metrics`).

pub mod args;
pub mod download;
pub mod follower;
pub mod memory_ledger;
pub mod metrics;
pub mod model_file;
pub mod orphans;
pub mod ports;
pub mod process;
pub mod restart_backoff;
