//! The agent out of file descriptors, on the real engine: an engine restart that cannot open
//! the model file says descriptors ran out, is retried with backoff, never turns the model
//! `Failed` (the file is fine), and serves again once descriptors are free.
//!
//! The agent runs in this test's process, so lowering this process's soft RLIMIT_NOFILE and
//! holding every descriptor left is exactly what a flood of idle connections does to it. One
//! test per binary: the limit is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use metalkube_agent::engine::restart_backoff::BackoffConfig;
use metalkube_api::Phase;
use support::Harness;

/// Every descriptor the process may still open, held until dropped.
fn take_every_descriptor() -> Vec<std::fs::File> {
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => held.push(f),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(24), "stopped by EMFILE, not {e}");
                return held;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_out_of_descriptors_is_retried_never_failed_and_recovers() {
    // Backoff delays of seconds: the test takes the descriptors an engine's death frees (its
    // pipe, connections to it) while the restart waits, before the next start runs.
    let backoff = BackoffConfig {
        min: Duration::from_secs(2),
        max: Duration::from_secs(4),
        stable_after: Duration::from_secs(60),
    };
    let h = Harness::with(metalkube_testkit::real_engine(), support::port_block(), backoff).await;
    let key = h.serve(h.desired("tiny", None)).await;
    let serving = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    let restarts_before = serving.restarts;

    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft.min(1024), hard).unwrap();
    support::signal(serving.pid.unwrap(), nix::sys::signal::Signal::SIGKILL);
    h.wait_for(&key, "the crash counted", |r| r.restarts > restarts_before).await;
    let held = take_every_descriptor();

    let short = h
        .wait_for(&key, "a restart that ran out of descriptors (or Failed)", |r| {
            r.phase == Phase::Failed || r.last_error.as_deref().is_some_and(|e| e.contains("descriptors"))
        })
        .await;
    let error = short.last_error.clone().unwrap_or_default();
    assert_ne!(short.phase, Phase::Failed, "running out of descriptors is no verdict on the model: {error}");
    assert!(error.starts_with("out of file descriptors while reading the model file"), "{error}");
    assert!(!error.contains("GGUF"), "{error}");
    let latest = short.restart_history.back().unwrap();
    assert_eq!(latest.reason.as_str(), "start_failed");
    assert!(latest.message.contains("out of file descriptors"), "{latest:?}");

    // Retried, still short, still not Failed (a Failed model stays so for 10 s: it would be seen).
    let retried = h.wait_for(&key, "retried", |r| r.restarts > short.restarts || r.phase == Phase::Failed).await;
    assert_ne!(retried.phase, Phase::Failed, "{:?}", retried.last_error);

    drop(held);
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();
    let back = h.wait_for(&key, "serving again", |r| r.phase == Phase::Serving || r.phase == Phase::Failed).await;
    assert_eq!(back.phase, Phase::Serving, "{:?}", back.last_error);
    h.agent.shutdown().await;
}
