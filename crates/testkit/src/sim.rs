//! The simulator's fault switches, shared by the simulator and the tests that flip them.

use serde::{Deserialize, Serialize};

/// Run-time faults of `metalkube-engine-sim` (`POST /sim/fault`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Fault {
    /// Compute time added to every completion.
    pub latency_ms: u64,
    /// Compute time added per completion served so far: a gradual slowdown.
    pub drift_ms_per_request: u64,
    /// Only the next completion takes this much longer (the slow first call after idle).
    pub slow_next_ms: u64,
    /// Completions never answer while `/health` stays 200; `/slots` and `/metrics`, which
    /// llama-server serves from its task loop, do not answer either, and streams already
    /// flowing stop mid-stream (the loop that decodes them is the one that is stuck).
    pub wedged: bool,
    /// Completions answer 200 with a truncated JSON body.
    pub malformed: bool,
    /// Completions answer with this HTTP status (e.g. 500) instead of working.
    pub error_status: u16,
    /// Exit with status 3 at once.
    pub exit_now: bool,
    /// Streams send one token every this many milliseconds (a fixed cadence, whatever
    /// `latency_ms` says), and every chunk carries `"sent_us"`: when the simulator sent it, in
    /// microseconds since the Unix epoch, so a client on the same machine measures the latency
    /// of each chunk (the streaming benchmark).
    pub stream_token_ms: u64,
}

/// Start-up behaviour, read from `<model>.sim.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SimStartup {
    /// `/health` answers 503 "Loading model" for this long.
    pub load_ms: u64,
    pub exit_at_start: bool,
    /// Wait this long before binding the port (so a test can take it first).
    pub bind_delay_ms: u64,
    /// Faults in force from the start.
    pub fault: Fault,
    /// Decoding slots, instead of `--parallel` (a MetalModel allows at most 256; the streaming
    /// benchmark holds 1,000 streams at once).
    pub slots: Option<usize>,
}
