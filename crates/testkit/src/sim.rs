//! The simulator's fault switches, shared by the simulator and the tests that flip them.

use serde::{Deserialize, Serialize};

/// Run-time faults of `metalkube-engine-sim` (`POST /sim/fault`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Fault {
    /// Compute time added to every completion.
    pub latency_ms: u64,
    /// Decode time per generated token, in microseconds, on top of `latency_ms`'s share: an
    /// answer of n tokens takes n times this, streamed token by token, so a Mac of half the
    /// speed is a simulator with twice the figure (the routing benchmark's uneven fleet).
    pub token_us: u64,
    /// Prompt-processing time per prompt token (a word of the prompt or of the messages'
    /// contents), in microseconds: a long prompt delays the first token as it does on a Mac.
    pub prompt_token_us: u64,
    /// Compute time added per completion served so far: a gradual slowdown.
    pub drift_ms_per_request: u64,
    /// Only the next completion takes this much longer (the slow first call after idle).
    pub slow_next_ms: u64,
    /// Completions never answer while `/health` stays 200; `/slots` and `/metrics`, which
    /// llama-server serves from its task loop, do not answer either, and streams already
    /// flowing stop mid-stream (the loop that decodes them is the one that is stuck).
    pub wedged: bool,
    /// A decode that hangs inside the engine: completions never answer and no token is decoded,
    /// but `/slots` still answers (llama-server serves it from a worker thread while it decodes),
    /// with counters that no longer move.
    pub hung_decode: bool,
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
    /// Compute time that rises with time since the fault was set: the incident's gradual
    /// slowdown (a trivial call 0.6 s, then 30 s) while `/health` stays 200 and the task
    /// counter in `/slots` keeps climbing as the slower tasks get through.
    pub ramp: Option<Ramp>,
}

/// Compute time `from_ms` for `after_ms`, then rising in a straight line to `to_ms` over
/// `over_ms`, and staying there. Added to whatever else the fault says.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Ramp {
    pub from_ms: u64,
    pub to_ms: u64,
    pub after_ms: u64,
    pub over_ms: u64,
}

impl Ramp {
    /// The compute time of a completion that arrives `elapsed_ms` after the fault was set.
    pub fn compute_ms(&self, elapsed_ms: u64) -> u64 {
        let into = elapsed_ms.saturating_sub(self.after_ms);
        if into >= self.over_ms {
            return self.to_ms;
        }
        // i128 holds any span of u64 milliseconds times any progress short of the end.
        let span = i128::from(self.to_ms) - i128::from(self.from_ms);
        let Some(risen) = span.checked_mul(i128::from(into)) else { return self.to_ms };
        u64::try_from(i128::from(self.from_ms) + risen / i128::from(self.over_ms)).unwrap_or(0)
    }
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
    /// With `--sleep-idle-seconds`: how long waking takes (llama-server reloads the model), in
    /// milliseconds.
    pub wake_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_holds_then_rises_in_a_line_then_holds() {
        let r = Ramp { from_ms: 600, to_ms: 30_600, after_ms: 1_000, over_ms: 10_000 };
        assert_eq!(r.compute_ms(0), 600);
        assert_eq!(r.compute_ms(1_000), 600);
        assert_eq!(r.compute_ms(6_000), 15_600);
        assert_eq!(r.compute_ms(11_000), 30_600);
        assert_eq!(r.compute_ms(u64::MAX), 30_600);
        let down = Ramp { from_ms: 1_000, to_ms: 0, after_ms: 0, over_ms: 10 };
        assert_eq!(down.compute_ms(5), 500, "a ramp may fall too");
        let instant = Ramp { from_ms: 5, to_ms: 9, after_ms: 0, over_ms: 0 };
        assert_eq!(instant.compute_ms(0), 9, "no span: the end value at once");
    }
}
