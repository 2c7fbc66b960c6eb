//! The start errors of the engine stage as the supervisor takes them: the OS running short
//! while a model file is read or llama-server is started is retried with backoff; a wrong file
//! or a binary that may not run needs a person, told once with every cause. The errors are the
//! engine's, the classification is health's: they meet here.

use nix::errno::Errno;

use super::RunEnd;
use crate::engine::model_file::ModelFileError;
use crate::engine::process::ProcessError;
use crate::model::FaultReason;

#[test]
fn descriptors_running_out_is_transient_and_says_so() {
    let emfile = std::io::Error::from_raw_os_error(Errno::EMFILE as i32);
    let not_gguf = ModelFileError::NotGguf {
        path: "/m/tiny.gguf".into(),
        source: metalkube_gguf::GgufError::Io { path: "/m/tiny.gguf".into(), source: emfile },
    };
    match RunEnd::start_failed("reading the model file", &not_gguf) {
        RunEnd::Fault { reason: FaultReason::StartFailed, message, .. } => {
            assert!(message.starts_with("out of file descriptors while reading the model file"), "{message}");
            assert!(!message.contains("GGUF"), "no verdict on the file: {message}");
        }
        _ => panic!("a shortage must be a fault retried with backoff"),
    }
    let enfile = ProcessError::Spawn {
        binary: "llama-server".into(),
        source: std::io::Error::from_raw_os_error(Errno::ENFILE as i32),
    };
    assert!(matches!(
        RunEnd::start_failed("starting", &enfile),
        RunEnd::Fault { reason: FaultReason::StartFailed, .. }
    ));
}

#[test]
fn other_errors_stay_permanent_with_their_causes() {
    let unreadable = ModelFileError::Unreadable {
        what: "reading the model file",
        path: "/m/x.gguf".into(),
        source: std::io::Error::from_raw_os_error(Errno::EACCES as i32),
    };
    let RunEnd::Permanent(m) = RunEnd::start_failed("reading the model file", &unreadable) else { panic!() };
    assert!(m.contains("/m/x.gguf") && m.contains("ermission denied"), "{m}");
    let bad = ModelFileError::NotGguf { path: "/m/x.gguf".into(), source: metalkube_gguf::GgufError::BadMagic };
    assert!(matches!(RunEnd::start_failed("reading the model file", &bad), RunEnd::Permanent(_)));
    let denied = ProcessError::Spawn {
        binary: "/bin/llama-server".into(),
        source: std::io::Error::from_raw_os_error(Errno::EACCES as i32),
    };
    let RunEnd::Permanent(m) = RunEnd::start_failed("starting llama-server", &denied) else { panic!() };
    assert_eq!(m.matches("ermission denied").count(), 1, "the OS error once: {m}");
}
