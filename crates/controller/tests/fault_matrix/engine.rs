//! Faults of the engine process (rows 1-3): killed, frozen, starved of CPU mid-stream. The agent
//! replaces it for what its pulse said, and the stream in flight ends with a definite error.

use std::time::Instant;

use metalkube_testkit::cgroup::CpuThrottle;
use metalkube_testkit::processes::{is_running, signal};
use nix::sys::signal::Signal;

use crate::clients::{Outcome, Victim, kind};
use crate::row::{Pulse, Row, secs};
use crate::standalone::{AgentOpts, pid_of, restarts_for, serving, serving_tiny, wait_model};

// --- row 1 ----------------------------------------------------------------------------------

pub async fn engine_sigkill(row: Row) {
    let (mut agent, before, load, url) = serving_tiny(&row, AgentOpts::default(), Pulse::Fast, "3s", 3).await;
    let old = pid_of(&before).unwrap();
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    let killed = Instant::now();
    signal(old, Signal::SIGKILL);
    let outcome = victim.outcome().await;
    row.note(format!("the stream in flight: {outcome:?}"));
    assert!(matches!(outcome, Outcome::Definite(_)), "a stream whose engine died ends with a definite error");
    let after = wait_model(&agent.api, "tiny", "serving on a new engine", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old)
    })
    .await;
    let back = killed.elapsed();
    row.tally.completions_since(Instant::now(), 5, "completions on the new engine").await;
    load.stop().await;
    assert!(after["restarts"].as_u64() >= Some(1), "{after:#}");
    assert!(!is_running(old));
    agent.stop();
    row.summarize(format!("stream: {}; restart, serving after {}", kind(&outcome), secs(back)));
}

// --- row 2 ----------------------------------------------------------------------------------

pub async fn engine_sigstop(row: Row) {
    let (mut agent, before, load, url) = serving_tiny(&row, AgentOpts::default(), Pulse::Fast, "1s", 3).await;
    let old = pid_of(&before).unwrap();
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    let stopped = Instant::now();
    signal(old, Signal::SIGSTOP);
    let outcome = victim.outcome().await;
    let stall_seen = stopped.elapsed();
    row.note(format!("the stream in flight: {outcome:?} after {}", secs(stall_seen)));
    assert_eq!(outcome, Outcome::Definite("SSE error stream_stalled".into()));
    let after = wait_model(&agent.api, "tiny", "serving on a new engine", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old)
    })
    .await;
    let back = stopped.elapsed();
    // The engine is replaced only for what its pulse said: a hang or confirmed reds.
    let reasons = (restarts_for(&agent.api, "hang").await, restarts_for(&agent.api, "pulse_red").await);
    row.note(format!("restarts for (hang, pulse_red): {reasons:?}"));
    assert!(reasons.0 + reasons.1 >= 1, "the stopped engine was replaced for its pulse: {after:#}");
    // SIGCONT, should the stopped process still be there (it must not be).
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), Signal::SIGCONT);
    assert!(!is_running(old), "the stopped engine was killed");
    row.tally.completions_since(Instant::now(), 5, "completions on the new engine").await;
    load.stop().await;
    agent.stop();
    row.summarize(format!(
        "stream: {} after {}; pulse {}, serving after {}",
        kind(&outcome),
        secs(stall_seen),
        if reasons.0 > 0 { "hang" } else { "red" },
        secs(back)
    ));
}

// --- row 3 ----------------------------------------------------------------------------------

pub async fn cpu_throttled(row: Row) {
    let (mut agent, before, load, url) = serving_tiny(&row, AgentOpts::default(), Pulse::Fast, "3s", 3).await;
    let old = pid_of(&before).unwrap();
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    // 0.1% of one CPU: a pulse that needs a few ms of CPU now takes seconds; /health, answered
    // with almost no work, would still look fine.
    let throttle = CpuThrottle::new("fault-cpu", 1000, 1_000_000);
    let throttled = Instant::now();
    throttle.add(old);
    let after = wait_model(&agent.api, "tiny", "serving on a new engine", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old)
    })
    .await;
    let back = throttled.elapsed();
    let outcome = victim.outcome().await;
    row.note(format!("the stream in flight: {outcome:?}"));
    assert!(matches!(outcome, Outcome::Completed | Outcome::Definite(_)));
    let reasons = (restarts_for(&agent.api, "hang").await, restarts_for(&agent.api, "pulse_red").await);
    row.note(format!("restarts for (hang, pulse_red): {reasons:?}"));
    assert!(reasons.0 + reasons.1 >= 1, "the starved engine was replaced for its pulse: {after:#}");
    assert!(!is_running(old));
    row.tally.completions_since(Instant::now(), 5, "completions on the new engine").await;
    load.stop().await;
    agent.stop();
    drop(throttle);
    row.summarize(format!(
        "stream: {}; pulse {}, serving after {}",
        kind(&outcome),
        if reasons.0 > 0 { "hang" } else { "red" },
        secs(back)
    ));
}
