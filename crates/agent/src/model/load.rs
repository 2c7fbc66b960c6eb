//! How busy a model is, in the words the stages share: the serving port's load as it reports
//! it (`ServingLoad`), the part the grader weighs (`Load`), and what client responses said about
//! the engine's speed since the pulse last asked (`TrafficEvidence`).

use std::time::Instant;

/// What the serving port says about its load: read by the observe stage for reports and by the
/// health stage for grading; the serving stage is the only writer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServingLoad {
    /// Places in use: engine tasks of the requests admitted and not finished.
    pub in_flight: u32,
    /// Requests waiting in line.
    pub queue_depth: u32,
    /// The admission limit.
    pub max_concurrent: u32,
    /// The upstream circuit breaker: `closed`, `half_open` or `open`.
    pub circuit: &'static str,
    /// Engine decode time per token, an EWMA read from real responses as they pass.
    pub decode_seconds_per_token: Option<f64>,
}

impl ServingLoad {
    /// The part the grader weighs: is a slow pulse queueing behind our own traffic?
    pub fn grading_load(&self) -> Load {
        Load { in_flight: self.in_flight, limit: self.max_concurrent, queued: self.queue_depth }
    }
}

/// How busy the model is with client traffic when the pulse is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    pub in_flight: u32,
    /// The admission limit; 0 means no limit is known (nothing can be at it).
    pub limit: u32,
    pub queued: u32,
}

impl Load {
    pub fn is_at_limit(&self) -> bool {
        self.queued > 0 || (self.limit > 0 && self.in_flight >= self.limit)
    }

    /// Client requests are in the engine or waiting for it.
    pub fn is_busy(&self) -> bool {
        self.in_flight > 0 || self.queued > 0
    }
}

/// Client responses since the last `take`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficEvidence {
    /// Completed, decoded at the usual speed.
    pub normal: u32,
    /// Completed, decoded more than `SLOW_FACTOR` times slower than usual.
    pub slow: u32,
    /// Completed without a per-token figure, or while the usual speed was still being learned.
    pub unmeasured: u32,
    /// Streams that went silent for the stall timeout.
    pub stalled: u32,
    /// When the last normal response completed.
    pub last_normal: Option<Instant>,
}
