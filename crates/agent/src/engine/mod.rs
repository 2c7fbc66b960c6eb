//! The engine stage: a llama-server process and what it needs to start. Its model file (local,
//! or downloaded into the cache), its arguments, its ports, the memory it may take, the delay
//! before a restart, and engines a crashed agent left behind.

pub mod args;
pub mod download;
pub mod memory_ledger;
pub mod model_file;
pub mod orphans;
pub mod ports;
pub mod process;
pub mod restart_backoff;
