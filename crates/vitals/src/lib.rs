//! metalkube-vitals: an engine's and its host's vital signs, read and explained. The agent
//! grades engines on them; calibrate measures a model with them. Nothing here decides what to do
//! about an engine.
//!
//! - `pulse`: taking one pulse (a timed trivial completion sent straight to the engine), and
//!   the engine's own progress marks and health answer.
//! - `engine_counters`: llama-server's Prometheus counters, parsed.
//! - `slots`: how much of the engine's context (its KV cache) the running requests hold.
//! - `host`: host memory, GPU, load and pressure over a window, and the agent's own scheduling.
//! - `attribution`: whether the host's pressure explains a slow pulse, and which cause.

pub mod attribution;
pub mod engine_counters;
pub mod host;
pub mod host_figures;
pub mod pulse;
pub mod slots;
