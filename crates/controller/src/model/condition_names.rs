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
    /// The model's Service lists the metalkube-router pods (True) or the Macs (False, with why).
    pub const ROUTED: &str = "Routed";
}

/// Reasons that conditions set and Events react to.
pub mod reasons {
    pub const AGENT_CONNECTED: &str = "AgentConnected";
    pub const AGENT_UNREACHABLE: &str = "AgentUnreachable";
    pub const PULSE_RED: &str = "PulseRed";
    /// Past redAfter with the host explaining it: not ready, not restarted.
    pub const HOST_CONTENDED: &str = "HostContended";
    /// Routed: the model's Service lists the router pods.
    pub const THROUGH_ROUTER: &str = "ThroughRouter";
    /// Not routed: the model asks for its Service to list the Macs.
    pub const DIRECT: &str = "Direct";
    /// Not routed although the model asks for it: no router pod is ready, the Macs stand in.
    pub const ROUTER_UNAVAILABLE: &str = "RouterUnavailable";
    /// Not routed although the model asks for it: no router is installed (no --router-service).
    pub const ROUTER_NOT_CONFIGURED: &str = "RouterNotConfigured";
}
