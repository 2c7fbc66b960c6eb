//! The vocabulary of an engine's life, pure: why an engine is restarted (the `reason` label of
//! `metalkube_agent_engine_restarts_total`), what its exit means, which start failures are the
//! OS running short (retried) rather than a wrong model or spec (`Failed`), and the phase a
//! restart shows. The supervisor acts on these; metrics and reports name them.

use metalkube_api::Phase;
use nix::errno::Errno;

use super::grader::RestartCause;
use crate::model::FaultReason;

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

/// The OS short of something for the moment: a start that failed for this is retried with
/// backoff, never `Failed`. Opening a model file with every descriptor in use says "Too many
/// open files", which is no verdict on the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// EMFILE (this process) or ENFILE (the whole system).
    FileDescriptors,
    /// ENOMEM.
    Memory,
    /// EAGAIN: the OS said try again (e.g. out of processes or threads for `fork`).
    TryAgain,
}

impl Shortage {
    pub fn of_os_error(code: i32) -> Option<Self> {
        match Errno::from_raw(code) {
            Errno::EMFILE | Errno::ENFILE => Some(Shortage::FileDescriptors),
            Errno::ENOMEM => Some(Shortage::Memory),
            Errno::EAGAIN => Some(Shortage::TryAgain),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Shortage::FileDescriptors => "out of file descriptors",
            Shortage::Memory => "out of memory",
            Shortage::TryAgain => "the OS is short of a resource (it said: try again)",
        }
    }
}

/// The shortage behind `error`, if an OS error somewhere in its chain of causes is one, with
/// that OS error.
pub fn shortage_in<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<(Shortage, &'e std::io::Error)> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(shortage) = io.raw_os_error().and_then(Shortage::of_os_error)
        {
            return Some((shortage, io));
        }
        cause = e.source();
    }
    None
}

/// What a start that failed with `error` while `doing` something means: a shortage is a
/// transient failure whose message says what ran short; anything else needs a person, with
/// the whole chain of causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFailure {
    Transient(String),
    Permanent(String),
}

pub fn classify_start_error(doing: &str, error: &(dyn std::error::Error + 'static)) -> StartFailure {
    match shortage_in(error) {
        Some((shortage, io)) => StartFailure::Transient(format!(
            "{} while {doing} ({io}); not a problem of the model or its spec, retried with backoff",
            shortage.describe()
        )),
        None => StartFailure::Permanent(chain_once(error)),
    }
}

/// `error` and its causes, "outer: inner", leaving out a cause whose text the message
/// already holds (`cannot start X: {source}` would otherwise print the OS error twice).
fn chain_once(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
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

    /// The errors the engine stage raises are classified where they meet, in the supervisor
    /// (`supervisor/start_failure_tests.rs`); here, the OS errors themselves.
    #[test]
    fn a_shortage_is_transient_and_says_what_ran_short() {
        let emfile = std::io::Error::from_raw_os_error(Errno::EMFILE as i32);
        match classify_start_error("reading the model file", &emfile) {
            StartFailure::Transient(m) => {
                assert!(m.starts_with("out of file descriptors while reading the model file"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        let denied = std::io::Error::from_raw_os_error(Errno::EACCES as i32);
        let StartFailure::Permanent(m) = classify_start_error("starting llama-server", &denied) else { panic!() };
        assert!(m.contains("ermission denied"), "{m}");
        for (code, shortage) in [
            (Errno::ENOMEM, Shortage::Memory),
            (Errno::EAGAIN, Shortage::TryAgain),
            (Errno::EMFILE, Shortage::FileDescriptors),
        ] {
            assert_eq!(Shortage::of_os_error(code as i32), Some(shortage));
        }
    }

    proptest! {
        /// Only the four shortage codes are transient; every other OS error needs a person.
        #[test]
        fn only_shortage_codes_are_transient(code in 0i32..200) {
            let transient = [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM, Errno::EAGAIN].map(|e| e as i32).contains(&code);
            let error = std::io::Error::from_raw_os_error(code);
            prop_assert_eq!(shortage_in(&error).is_some(), transient);
        }

        #[test]
        fn any_log_is_classified(lines in prop::collection::vec("\\PC{0,60}", 0..20)) {
            let meaning = classify_exit(&lines);
            let port = lines.iter().any(|l| l.contains("couldn't bind"));
            prop_assert_eq!(meaning == ExitMeaning::PortTaken, port);
        }
    }
}
