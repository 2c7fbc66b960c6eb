//! Why an engine was restarted: the `reason` of a restart in reports, events and the
//! `metalkube_agent_engine_restarts_total` metric.

/// Why an engine was restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// It exited by itself.
    Crash,
    /// Its pulse stayed red for `redStreak` confirmed pulses.
    PulseRed,
    /// A pulse got no answer within `timeout`.
    Hang,
    /// It never became ready (startup timeout, no free port, a spawn error).
    StartFailed,
}

impl FaultReason {
    pub const ALL: [FaultReason; 4] =
        [FaultReason::Crash, FaultReason::PulseRed, FaultReason::Hang, FaultReason::StartFailed];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultReason::Crash => "crash",
            FaultReason::PulseRed => "pulse_red",
            FaultReason::Hang => "hang",
            FaultReason::StartFailed => "start_failed",
        }
    }

    /// A sick but running engine: in-flight requests get the drain grace before it is
    /// replaced (a crashed or never-started one has none to finish).
    pub fn drains_first(self) -> bool {
        matches!(self, FaultReason::PulseRed | FaultReason::Hang)
    }
}
