//! Pulses not sent, on the simulator and on the real engine: while client requests complete at
//! normal speed, scheduled pulses are skipped and counted (`reason="traffic"`), a real pulse still
//! goes out every few intervals, and an idle model is pulsed as before; a sleeping engine is
//! never woken by a pulse (`reason="sleeping"`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use metalkube_agent::health::evidence::MAX_REPLACED_IN_A_ROW;
use metalkube_api::{Grade, ModelKey, Phase};
use metalkube_testkit::{real_engine, sim_engine};
use support::Harness;

fn skipped_for_traffic(metrics: &str, key: &ModelKey) -> u64 {
    let prefix = format!(r#"metalkube_agent_pulses_skipped_total{{model="{key}",reason="traffic"}} "#);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no traffic skip series for {key} (it exists at 0): {metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// Keeps client requests flowing through the serving port until `until` resolves.
async fn steady_clients(port: u16, until: tokio::sync::watch::Receiver<bool>) -> u32 {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let mut done = 0;
    while !*until.borrow() {
        let answer = client
            .post(&url)
            .json(
                &serde_json::json!({"messages": [{"role": "user", "content": format!("hi {done}")}], "max_tokens": 4}),
            )
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{:?}", answer.text().await);
        done += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    done
}

async fn traffic_stands_in_for_pulses(h: Harness, name: &str) {
    let key = h.serve(h.desired(name, None)).await;
    let r = h.wait_for(&key, "serving green", |r| r.phase == Phase::Serving && r.grade == Some(Grade::Green)).await;
    let idle_skips = skipped_for_traffic(&h.metrics().await, &key);
    assert_eq!(idle_skips, 0, "no traffic, no skip");

    let (stop, until) = tokio::sync::watch::channel(false);
    let clients = tokio::spawn(steady_clients(r.serving_port.unwrap(), until));
    // Enough intervals (200 ms) for the usual decode speed to be learned and several pulses to be
    // replaced; every report change is checked: the grade never leaves green.
    let mut rx = h.agent.watch(&key).await.unwrap();
    let pulses_before = rx.borrow().pulse_history.len();
    let watched = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            rx.changed().await.unwrap();
            let r = rx.borrow_and_update().clone();
            assert_eq!(r.grade, Some(Grade::Green), "{r:#?}");
        }
    })
    .await;
    assert!(watched.is_err(), "the watch only ends by the timeout");
    stop.send(true).unwrap();
    let requests = clients.await.unwrap();
    let skipped = skipped_for_traffic(&h.metrics().await, &key);
    let view = h.agent.report(&key).await.unwrap();
    println!("decode per token seen by the serving port: {:?}", view.serving.decode_seconds_per_token);
    let r = view.health;
    let real_pulses = r.pulse_history.len().saturating_sub(pulses_before);
    println!("{name}: {requests} requests; {skipped} scheduled pulses replaced by traffic; {real_pulses} real pulses");
    assert!(requests > 20, "{requests}");
    assert!(skipped > 0, "normal traffic replaced some pulses");
    // However steady the traffic, a real pulse goes out at least every MAX_REPLACED_IN_A_ROW + 1
    // scheduled pulses: runs of skips sit between real pulses (and one before the first and one
    // after the last).
    assert!(
        (real_pulses as u64 + 1) * u64::from(MAX_REPLACED_IN_A_ROW) >= skipped,
        "{real_pulses} real, {skipped} replaced"
    );

    // Idle again: every scheduled pulse is sent.
    let quiet_from = skipped_for_traffic(&h.metrics().await, &key);
    let len = r.pulse_history.len();
    h.wait_for(&key, "five more real pulses", |r| r.pulse_history.len() >= (len + 5).min(120)).await;
    assert!(skipped_for_traffic(&h.metrics().await, &key) <= quiet_from + 1, "at most the interval in progress");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn normal_traffic_stands_in_for_pulses_on_the_simulator() {
    traffic_stands_in_for_pulses(Harness::new(sim_engine()).await, "busy-sim").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn normal_traffic_stands_in_for_pulses_on_the_real_engine() {
    traffic_stands_in_for_pulses(Harness::new(real_engine()).await, "busy-real").await;
}

fn skipped(metrics: &str, key: &ModelKey, reason: &str) -> u64 {
    let prefix = format!(r#"metalkube_agent_pulses_skipped_total{{model="{key}",reason="{reason}"}} "#);
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

async fn engine_says_sleeping(port: u16) -> bool {
    let props: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/props")).await.unwrap().json().await.unwrap();
    props["is_sleeping"].as_bool().unwrap()
}

/// An engine set to sleep after 1 s idle: left alone once clients are away, reported
/// `Sleeping` (ready, grade kept) once it sleeps, never woken by a pulse, and back to `Serving`
/// when a client wakes it, without a red grade for the cold first answer.
async fn a_sleeping_engine_is_left_asleep(h: Harness, name: &str) {
    let mut desired = h.desired(name, None);
    desired.spec.engine.sleep_after_idle = Some(metalkube_api::Duration::from_secs(1));
    let key = h.serve(desired).await;
    h.wait_for(&key, "serving green", |r| r.phase == Phase::Serving && r.grade == Some(Grade::Green)).await;
    let asleep = h.wait_for(&key, "asleep", |r| r.phase == Phase::Sleeping).await;
    assert!(asleep.is_ready(), "a sleeping engine takes traffic (the first request wakes it)");
    assert_eq!(asleep.grade, Some(Grade::Green), "the grade is kept");
    let (internal, serving) = (asleep.internal_port.unwrap(), asleep.serving_port.unwrap());

    // Ten pulse intervals: the agent keeps asking /props (which does not wake it) and sends no
    // pulse; the engine stays asleep.
    let pulses = asleep.pulse_history.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(engine_says_sleeping(internal).await, "no pulse woke it");
    let r = h.agent.report(&key).await.unwrap().health;
    assert_eq!((r.phase, r.pulse_history.len()), (Phase::Sleeping, pulses), "no pulse while asleep");
    let metrics = h.metrics().await;
    assert!(skipped(&metrics, &key, "sleeping") >= 5, "{metrics}");
    assert!(skipped(&metrics, &key, "idle") >= 1, "{metrics}");

    // A client wakes it.
    let answer = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{serving}/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "wake up"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let awake = h
        .wait_for(&key, "awake and pulsed again", |r| r.phase == Phase::Serving && r.pulse_history.len() > pulses)
        .await;
    assert_ne!(awake.grade, Some(Grade::Red));
    assert_eq!(awake.restarts, 0);
    println!("{name}: asleep, {} pulses skipped while asleep, woken by a client", skipped(&metrics, &key, "sleeping"));
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_engine_is_left_asleep_on_the_simulator() {
    a_sleeping_engine_is_left_asleep(Harness::new(sim_engine()).await, "sleepy-sim").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_engine_is_left_asleep_on_the_real_engine() {
    a_sleeping_engine_is_left_asleep(Harness::new(real_engine()).await, "sleepy-real").await;
}
