//! A busy host is not a sick engine, on the real engine (llama-server, tiny model):
//! - slowed only by other processes on the host, the engine is never restarted, and is not ready
//!   only when a pulse crossed redAfter (phase HostContended, never Degraded);
//! - slowed in its own cgroup on a quiet host, the same engine is restarted;
//! - a restart for slowness that does not cure turns into SlowAfterRestart: no more restarts,
//!   and restarts resume once the pulse is fast again.
//!
//! The tests of this binary take turns (`TURN`): each measures the host, and the others' engines
//! would be part of what it measures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command};
use std::time::Duration;

use metalkube_agent::model::report::ModelReport;
use metalkube_api::{Grade, ModelKey, Phase, PulseSpec};
use metalkube_testkit::cgroup::CpuThrottle;
use support::{Harness, fast_backoff, port_block};

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RED_AFTER: Duration = Duration::from_millis(600);

fn engine() -> std::path::PathBuf {
    metalkube_testkit::real_engine()
}

fn ms(v: u64) -> metalkube_api::Duration {
    metalkube_api::Duration::from_millis(v)
}

/// Fast pulses; two engine threads, as llama-server picks on a 2-CPU host by default: its threads
/// wait for each other at every step, which is what makes a busy host slow it down.
fn desired(h: &Harness, name: &str) -> metalkube_agent::DesiredModel {
    let mut d = h.desired(name, None);
    d.spec.engine.extra_args = vec!["--threads".into(), "2".into()];
    d.spec.pulse = PulseSpec {
        interval: ms(200),
        // Long enough that a pulse slowed to a second still answers: slowness, not a hang.
        timeout: ms(5000),
        yellow_after: ms(300),
        red_after: metalkube_api::Duration::from_millis(RED_AFTER.as_millis() as u64),
        red_streak: 2,
        drift: Default::default(),
    };
    d
}

/// Busy loops at normal priority, killed when dropped.
struct BusyLoops(Vec<Child>);

impl BusyLoops {
    fn start(n: usize) -> Self {
        Self((0..n).map(|_| Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap()).collect())
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every report the model publishes while `for_how_long` passes.
async fn follow(h: &Harness, key: &ModelKey, for_how_long: Duration) -> Vec<ModelReport> {
    let mut rx = h.agent.watch(key).await.unwrap();
    let mut seen = vec![rx.borrow().clone()];
    let until = tokio::time::Instant::now() + for_how_long;
    while let Ok(Ok(())) = tokio::time::timeout_at(until, rx.changed()).await {
        seen.push(rx.borrow_and_update().clone());
    }
    seen
}

async fn serving_with_a_baseline(h: &Harness, key: &ModelKey) -> ModelReport {
    h.wait_for(key, "serving green with a pulse baseline", |r| {
        r.phase == Phase::Serving && r.grade == Some(Grade::Green) && r.baseline_seconds.is_some()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_engine_slowed_by_other_processes_is_not_restarted_and_not_ready_only_past_red_after() {
    let _turn = TURN.lock().await;
    let h = Harness::new(engine()).await;
    let key = h.serve(desired(&h, "busy-host")).await;
    let before = serving_with_a_baseline(&h, &key).await;

    // Eight busy processes per CPU at normal priority.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let busy = BusyLoops::start(8 * cpus);
    let seen = follow(&h, &key, Duration::from_secs(25)).await;
    drop(busy);

    let pulses: Vec<_> = seen.iter().filter_map(|r| r.last_pulse.clone()).collect();
    let slowest = pulses.iter().map(|p| p.wall_seconds).fold(0.0, f64::max);
    let explained = pulses.iter().filter(|p| p.host.as_ref().is_some_and(|h| h.cause.is_some())).count();
    let phases: std::collections::BTreeSet<&str> = seen.iter().map(|r| r.phase.as_str()).collect();
    println!(
        "busy host: {} reports, slowest pulse {slowest:.3}s, {explained} pulses the host explains, phases {phases:?}, last host reading: {:?}",
        seen.len(),
        pulses.last().and_then(|p| p.host.as_ref()).map(|h| h.summary.clone())
    );
    assert!(slowest >= 0.3, "the busy host must slow the engine for this test to mean anything ({slowest:.3}s)");
    assert!(explained > 0, "the host pressure explained no pulse");
    for r in &seen {
        assert_eq!(r.restarts, 0, "restarted on a busy host: {:?}", r.restart_history);
        assert_eq!(r.pid, before.pid, "a new engine process");
    }
    // Reports in phase Degraded (a red the host did not explain, not restarted): a round whose
    // window began before the busy processes measured a quieter host than the one that slowed it.
    let degraded = seen.iter().filter(|r| r.phase == Phase::Degraded).count();
    println!("busy host: {degraded} of {} reports Degraded", seen.len());
    if seen.iter().any(|r| r.grade == Some(Grade::Red)) {
        assert!(phases.contains("HostContended"), "red on a busy host, never named: {phases:?}");
    }
    // The grade turned red only on a pulse that crossed redAfter (or never answered in time).
    for pair in seen.windows(2) {
        let (was, now) = (&pair[0], &pair[1]);
        if was.grade != Some(Grade::Red) && now.grade == Some(Grade::Red) {
            let p = now.last_pulse.as_ref().unwrap();
            assert!(
                p.error.is_some() || p.wall_seconds >= RED_AFTER.as_secs_f64(),
                "not ready on a pulse below redAfter: {p:?}"
            );
        }
    }
    let after =
        h.wait_for(&key, "serving green again", |r| r.phase == Phase::Serving && r.grade == Some(Grade::Green)).await;
    assert_eq!((after.restarts, after.pid), (0, before.pid));
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"metalkube_agent_engine_restarts_total{model="default/busy-host",reason="pulse_red"} 0"#)
    );
    assert!(metrics.contains("metalkube_agent_pulse_host_explained_total{"), "{metrics}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_engine_slowed_in_its_own_cgroup_on_a_quiet_host_is_restarted() {
    let _turn = TURN.lock().await;
    let h = Harness::new(engine()).await;
    let key = h.serve(desired(&h, "own-cgroup")).await;
    let before = serving_with_a_baseline(&h, &key).await;
    let old_pid = before.pid.unwrap();
    // 0.2% of a CPU for the engine alone: its pulses take about a second, and nothing else on
    // the host is busy.
    let throttle = CpuThrottle::new("own-cgroup", 1000, 500_000);
    throttle.add(old_pid);
    let after = h.wait_for(&key, "restarted", |r| r.restarts >= 1 && r.pid.is_some_and(|p| p != old_pid)).await;
    drop(throttle);
    let restart = after.restart_history.back().unwrap();
    println!("own cgroup throttled: restart {restart:?}");
    assert!(matches!(restart.reason.as_str(), "pulse_red" | "hang"), "{restart:?}");
    assert!(after.restart_decision.as_deref().is_some_and(|d| d.starts_with("restarted")), "{after:?}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_that_does_not_cure_slowness_stops_restarts_until_the_engine_is_fast_again() {
    let _turn = TURN.lock().await;
    // Every engine the agent starts joins one CPU group, throttled or not: the slowness outlives
    // a restart, as a cause outside the engine does.
    let throttle = CpuThrottle::new("not-cured", 1000, 100_000);
    throttle.lift();
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("llama-server");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\necho $$ > {}\nexec {} \"$@\"\n", throttle.procs_file().display(), engine().display()),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let h = Harness::with(wrapper, port_block(), fast_backoff()).await;
    // 1% of a CPU leaves an engine able to start (its model loads in seconds) and pulses of about
    // 0.2 s: thresholds to match, so that such a pulse is red.
    let mut d = desired(&h, "not-cured");
    d.spec.pulse.yellow_after = ms(100);
    d.spec.pulse.red_after = ms(150);
    d.spec.pulse.drift.floor = ms(100);
    let key = h.serve(d).await;
    let first = serving_with_a_baseline(&h, &key).await;

    throttle.limit(1000);
    let slow = h.wait_for(&key, "slow after restart", |r| r.slow_after_restart).await;
    assert_eq!(slow.restarts, 1, "{:?}", slow.restart_history);
    assert_ne!(slow.pid, first.pid);
    println!("SlowAfterRestart: {:?}", slow.restart_decision);
    // Slow for a while longer: no restart, and the red pulses ask for restarts that are withheld.
    let seen = follow(&h, &key, Duration::from_secs(12)).await;
    assert!(seen.iter().all(|r| r.restarts == 1 && r.slow_after_restart), "restarted again: {:?}", seen.last());
    assert!(seen.iter().any(|r| r.grade == Some(Grade::Red) && !r.is_ready()), "a red model stays out of traffic");
    let metrics = h.metrics().await;
    assert!(
        !metrics.contains(
            r#"metalkube_agent_restarts_withheld_total{model="default/not-cured",reason="slow_after_restart"} 0"#
        ),
        "no restart was withheld: {metrics}"
    );
    assert!(metrics.contains(r#"metalkube_agent_slow_after_restart{model="default/not-cured"} 1"#));

    throttle.lift();
    let recovered = h.wait_for(&key, "restarts resumed", |r| !r.slow_after_restart).await;
    assert_eq!(recovered.restarts, 1);
    assert!(recovered.restart_decision.as_deref().is_some_and(|d| d.contains("resumed")), "{recovered:?}");
    h.agent.shutdown().await;
    drop(throttle);
}
