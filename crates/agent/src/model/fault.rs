//! Why an engine was restarted: the `reason` of a restart in reports, events and the
//! `metalkube_agent_engine_restarts_total` metric.

/// Why an engine was restarted. Its label (`as_str`) is the variant's name in snake_case, and
/// every variant has an `engine_restarts_total` series from the model's start: both come from the
/// derives, so a new reason needs nothing else to be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
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
    /// Every reason, listed by the compiler (strum's `VariantArray`).
    pub const ALL: &'static [FaultReason] = <FaultReason as strum::VariantArray>::VARIANTS;

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// A sick but running engine: in-flight requests get the drain grace before it is
    /// replaced (a crashed or never-started one has none to finish).
    pub fn drains_first(self) -> bool {
        matches!(self, FaultReason::PulseRed | FaultReason::Hang)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label values dashboards, alerts and restart records already hold.
    #[test]
    fn reasons_keep_their_label_values() {
        let labels: Vec<&str> = FaultReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, ["crash", "pulse_red", "hang", "start_failed"]);
    }
}
