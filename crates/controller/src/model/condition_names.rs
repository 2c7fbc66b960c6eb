//! The condition types and the reasons more than one part of the controller reads: what
//! `kubectl describe` shows and what Events and alerts key on, spelled once.

/// MetalModel and MetalNode condition types.
pub mod types {
    pub const READY: &str = "Ready";
    pub const SCHEDULED: &str = "Scheduled";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const SATURATED: &str = "Saturated";
    /// A restart for slowness did not make the engine faster: restarts for slowness are withheld.
    pub const SLOW_AFTER_RESTART: &str = "SlowAfterRestart";
    pub const MEMORY_PRESSURE: &str = "MemoryPressure";
}

/// Reasons that conditions set and Events react to.
pub mod reasons {
    pub const AGENT_CONNECTED: &str = "AgentConnected";
    pub const AGENT_UNREACHABLE: &str = "AgentUnreachable";
    pub const PULSE_RED: &str = "PulseRed";
    /// Past redAfter with the host explaining it: not ready, not restarted.
    pub const HOST_CONTENDED: &str = "HostContended";
}
