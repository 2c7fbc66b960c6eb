//! The vocabulary of an engine's life, pure: why an engine is restarted (the `reason` label of
//! `metalkube_agent_engine_restarts_total`), what its exit means, and the phase a restart
//! shows. The supervisor acts on these; metrics and reports name them.

use metalkube_api::Phase;

use super::grader::RestartCause;

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

impl From<RestartCause> for FaultReason {
    fn from(cause: RestartCause) -> Self {
        match cause {
            RestartCause::PulseRed => FaultReason::PulseRed,
            RestartCause::Hang => FaultReason::Hang,
        }
    }
}

/// What an engine's exit means, read from the last lines of its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitMeaning {
    /// Another process took its port between the agent's check and its bind: try another.
    PortTaken,
    /// llama-server refused its command line (a bad `spec.engine.extraArgs`): restarting
    /// cannot help, the spec must change. Holds the line that says so.
    BadArguments(String),
    /// Anything else: a crash, restarted with backoff.
    Crash,
}

pub fn classify_exit(log_tail: &[String]) -> ExitMeaning {
    if log_tail.iter().any(|l| l.contains("couldn't bind")) {
        return ExitMeaning::PortTaken;
    }
    match log_tail.iter().find(|l| l.contains("invalid argument") || l.contains("error while handling argument")) {
        Some(line) => ExitMeaning::BadArguments(line.trim().to_owned()),
        None => ExitMeaning::Crash,
    }
}

/// The phase while waiting to restart: `CrashLoopBackOff` once restarts follow each other.
pub fn backoff_phase(failures_in_a_row: u32) -> Phase {
    if failures_in_a_row >= 2 { Phase::CrashLoopBackOff } else { Phase::Restarting }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reasons_have_distinct_label_values() {
        let labels: std::collections::BTreeSet<&str> = FaultReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), FaultReason::ALL.len());
        assert_eq!(FaultReason::from(RestartCause::Hang), FaultReason::Hang);
        assert!(FaultReason::PulseRed.drains_first() && !FaultReason::Crash.drains_first());
    }

    #[test]
    fn exits_are_read_from_the_log() {
        let lines = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(classify_exit(&lines(&["main: couldn't bind HTTP server socket"])), ExitMeaning::PortTaken);
        assert_eq!(
            classify_exit(&lines(&["x", "  error while handling argument \"--foo\"  "])),
            ExitMeaning::BadArguments("error while handling argument \"--foo\"".into())
        );
        assert_eq!(classify_exit(&lines(&["GGML_ASSERT failed"])), ExitMeaning::Crash);
        assert_eq!(classify_exit(&[]), ExitMeaning::Crash);
        assert_eq!((backoff_phase(1), backoff_phase(2)), (Phase::Restarting, Phase::CrashLoopBackOff));
    }

    proptest! {
        #[test]
        fn any_log_is_classified(lines in prop::collection::vec("\\PC{0,60}", 0..20)) {
            let meaning = classify_exit(&lines);
            let port = lines.iter().any(|l| l.contains("couldn't bind"));
            prop_assert_eq!(meaning == ExitMeaning::PortTaken, port);
        }
    }
}
