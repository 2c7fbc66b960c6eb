//! Faults the OS cannot make on demand, injected into the engine simulator at run time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures::StreamExt;
use metalkube_api::{Grade, Phase};
use metalkube_testkit::sim::{Fault, SimStartup};
use metalkube_testkit::{set_fault, sim_engine};
use support::{GUARD, Harness, Stopwatch};

#[tokio::test(flavor = "multi_thread")]
async fn gradual_drift_goes_yellow_then_red_then_restarts() {
    let h = Harness::new(sim_engine()).await;
    let key = h.serve(h.desired("drift", None)).await;
    let r = h.wait_for(&key, "serving green", |r| r.phase == Phase::Serving && r.grade == Some(Grade::Green)).await;
    let old_pid = r.pid.unwrap();
    set_fault(r.internal_port.unwrap(), &Fault { drift_ms_per_request: 25, ..Default::default() }).await;

    let mut rx = h.agent.watch(&key).await.unwrap();
    let mut grades = vec![Grade::Green];
    let watched = tokio::time::timeout(support::GUARD, async {
        loop {
            rx.changed().await.unwrap();
            let r = rx.borrow_and_update().clone();
            if r.restarts >= 1 {
                return r;
            }
            if let Some(g) = r.grade
                && grades.last() != Some(&g)
            {
                grades.push(g);
            }
        }
    })
    .await
    .expect("restart within the guard");
    assert_eq!(grades, [Grade::Green, Grade::Yellow, Grade::Red], "grade path before the restart");
    assert_eq!(watched.restarts, 1);
    h.wait_for(&key, "serving again", |r| {
        r.phase == Phase::Serving && r.grade == Some(Grade::Green) && r.pid.is_some_and(|p| p != old_pid)
    })
    .await;
    assert!(h.metrics().await.contains(r#"reason="pulse_red"} 1"#));
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_slow_pulse_after_idle_is_confirmed_fast_and_never_red() {
    let h = Harness::new(sim_engine()).await;
    let key = h.serve(h.desired("idle", None)).await;
    let r = h.wait_for(&key, "serving green", |r| r.phase == Phase::Serving && r.grade == Some(Grade::Green)).await;
    // Slower than redAfter (600ms), within the timeout (1s).
    set_fault(r.internal_port.unwrap(), &Fault { slow_next_ms: 800, ..Default::default() }).await;

    let mut rx = h.agent.watch(&key).await.unwrap();
    let port = r.internal_port.unwrap();
    let slow_taken = || async move {
        let fault: Fault =
            reqwest::get(format!("http://127.0.0.1:{port}/sim/fault")).await.unwrap().json().await.unwrap();
        fault.slow_next_ms == 0
    };
    let r = tokio::time::timeout(support::GUARD, async {
        // Watch every report from the fault on until six reports after a pulse took the slow
        // answer. The confirming sample goes out while the slow one is still out and answers
        // fast, so the slow one is dismissed, often before it even ends.
        let mut after_slow = 0;
        loop {
            rx.changed().await.unwrap();
            let r = rx.borrow_and_update().clone();
            assert_ne!(r.grade, Some(Grade::Red), "one slow pulse must not publish red: {r:#?}");
            if after_slow > 0 || slow_taken().await {
                after_slow += 1;
                if after_slow > 6 {
                    return r;
                }
            }
        }
    })
    .await
    .expect("pulses continue");
    assert_eq!(r.restarts, 0);
    assert_eq!(r.grade, Some(Grade::Green));
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wedged_loop_with_health_200_goes_red_and_restarts() {
    let h = Harness::new(sim_engine()).await;
    let key = h.serve(h.desired("wedged", None)).await;
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    let (port, old_pid) = (r.internal_port.unwrap(), r.pid.unwrap());
    let clock = Stopwatch::start();
    set_fault(port, &Fault { wedged: true, ..Default::default() }).await;
    let health = reqwest::get(format!("http://127.0.0.1:{port}/health")).await.unwrap();
    assert_eq!(health.status(), 200, "the point of the fault: /health still says fine");

    let red = h.wait_for(&key, "red", |r| r.grade == Some(Grade::Red)).await;
    let to_red = clock.lap();
    // Red came from pulses still out past redAfter, before any pulse reached its timeout: the
    // engine is pulled without waiting for two timeouts.
    let last = red.last_pulse.clone().unwrap();
    assert!(last.error.as_deref().is_some_and(|e| e.contains("still waiting")), "{last:?}");
    assert!(
        red.pulse_history.iter().all(|p| !p.error.as_deref().unwrap_or_default().contains("no answer within")),
        "{:?}",
        red.pulse_history
    );
    assert!(!red.is_ready());
    let r =
        h.wait_for(&key, "serving again", |r| r.phase == Phase::Serving && r.pid.is_some_and(|p| p != old_pid)).await;
    println!("wedged → red {to_red:?}; → serving again {:?}", clock.lap());
    assert_eq!(r.restarts, 1);
    assert!(h.metrics().await.contains(r#"reason="hang"} 1"#));
    h.agent.shutdown().await;
}

/// A decode that hangs inside the engine while `/slots` still answers (llama-server answers it from
/// a worker thread): its counters stand still, so the pulse still out is red at redAfter.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_decode_is_pulled_even_though_slots_still_answers() {
    let h = Harness::new(sim_engine()).await;
    let key = h.serve(h.desired("hung-decode", None)).await;
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    let (port, old_pid) = (r.internal_port.unwrap(), r.pid.unwrap());
    set_fault(port, &Fault { hung_decode: true, ..Default::default() }).await;
    let slots = reqwest::get(format!("http://127.0.0.1:{port}/slots")).await.unwrap();
    assert_eq!(slots.status(), 200, "the point of the fault: /slots still answers");

    let red = h.wait_for(&key, "red", |r| r.grade == Some(Grade::Red)).await;
    let last = red.last_pulse.clone().unwrap();
    assert!(last.error.as_deref().is_some_and(|e| e.contains("still waiting")), "{last:?}");
    assert!(!red.is_ready());
    h.wait_for(&key, "a new engine", |r| r.pid.is_some_and(|p| p != old_pid)).await;
    assert!(h.metrics().await.contains(r#"reason="hang"} 1"#));
    h.agent.shutdown().await;
}

/// An engine slower than redAfter but still decoding is graded on its answers (their wall and
/// compute times), not counted red at a deadline: its `/slots` counters move.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_engine_that_keeps_working_is_graded_on_its_answers() {
    let h = Harness::new(sim_engine()).await;
    let key = h.serve(h.desired("slow-working", None)).await;
    let r = h.wait_for(&key, "serving green", |r| r.phase == Phase::Serving && r.grade == Some(Grade::Green)).await;
    // 900 ms of compute: over redAfter (600 ms), within the timeout (1 s).
    set_fault(r.internal_port.unwrap(), &Fault { latency_ms: 900, ..Default::default() }).await;
    let restarted = h.wait_for(&key, "restarted for red pulses", |r| r.restarts >= 1).await;
    let slow: Vec<_> = restarted.pulse_history.iter().filter(|p| p.wall_seconds >= 0.6).collect();
    assert!(!slow.is_empty());
    assert!(
        slow.iter().all(|p| p.error.is_none() && p.compute_seconds.is_some_and(|c| c >= 0.6)),
        "red from answers with their compute time, none counted at a deadline: {slow:?}"
    );
    assert!(h.metrics().await.contains(r#"reason="pulse_red"} 1"#));
    h.agent.shutdown().await;
}

/// llama-server decodes every stream in the loop that wedges, so streams already flowing stop
/// too, with `/health` still 200: the simulator does the same, and the agent ends such a stream
/// for its client as stalled (the bench's "stall mid-stream" scenario builds on this).
#[tokio::test(flavor = "multi_thread")]
async fn a_loop_wedged_mid_stream_stops_the_stream_and_the_agent_ends_it() {
    let h = Harness::new(sim_engine()).await;
    let mut d = h.desired("midstream", None);
    d.spec.admission.stream_stall_timeout = Duration::from_secs(1).into();
    let key = h.serve(d).await;
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving && r.serving_port.is_some()).await;
    let port = r.internal_port.unwrap();
    set_fault(port, &Fault { stream_token_ms: 50, ..Default::default() }).await;
    let body = serde_json::json!({"prompt": "a long story", "n_predict": 256, "stream": true});
    let url = format!("http://127.0.0.1:{}/completion", r.serving_port.unwrap());
    let resp = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = tokio::time::timeout(GUARD, stream.next()).await.unwrap();
    assert!(first.is_some_and(|c| c.is_ok()), "the stream flows");
    set_fault(port, &Fault { stream_token_ms: 50, wedged: true, ..Default::default() }).await;
    let mut tail = Vec::new();
    let ended = tokio::time::timeout(GUARD, async {
        while let Some(Ok(bytes)) = stream.next().await {
            tail.extend_from_slice(&bytes);
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends instead of hanging");
    let text = String::from_utf8_lossy(&tail);
    assert!(text.contains("stream_stalled"), "{}", &text[text.len().saturating_sub(400)..]);
    assert!(!text.contains("\"stop\":true"), "the stalled stream never reached its end: {text}");
    let health = reqwest::get(format!("http://127.0.0.1:{port}/health")).await.unwrap();
    assert_eq!(health.status(), 200, "and /health still says fine");
    h.agent.shutdown().await;
}

/// A new pulse spec replaces the grader, also in the middle of a round (between a slow sample and
/// its confirmation): the round ends with what the new grader holds, and pulses go on.
#[tokio::test(flavor = "multi_thread")]
async fn pulses_go_on_through_pulse_spec_changes_in_the_middle_of_rounds() {
    let h = Harness::new(sim_engine()).await;
    let key = h.serve(h.desired("respec", None)).await;
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    // 900 ms a pulse: red, within the timeout, so each round waits for a confirmation.
    set_fault(r.internal_port.unwrap(), &Fault { latency_ms: 900, ..Default::default() }).await;
    // For 4 s, a changed pulse spec every 50 ms: many land between a sample and its confirmation.
    for i in 0..80u64 {
        let mut d = h.desired("respec", None);
        d.spec.pulse.yellow_after = metalkube_api::Duration::from_millis(300 + i % 2);
        d.spec.pulse.red_streak = 1000; // no restart: this is about the rounds going on
        h.agent.upsert(d).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pulses = h.agent.report(&key).await.unwrap().health.pulse_history.len();
    let later =
        h.wait_for(&key, "more pulses after the changes", |r| r.pulse_history.len() >= (pulses + 3).min(120)).await;
    assert_eq!(later.restarts, 0);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_answers_count_as_red() {
    let h = Harness::new(sim_engine()).await;
    let key = h.serve(h.desired("malformed", None)).await;
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    set_fault(r.internal_port.unwrap(), &Fault { malformed: true, ..Default::default() }).await;
    let r = h.wait_for(&key, "restarted", |r| r.restarts == 1).await;
    assert!(r.last_error.unwrap().contains("malformed"));
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_load_stays_starting_until_health_and_a_good_pulse() {
    let h = Harness::new(sim_engine()).await;
    let startup = SimStartup { load_ms: 1500, ..Default::default() };
    std::fs::write(format!("{}.sim.json", h.model.display()), serde_json::to_vec(&startup).unwrap()).unwrap();
    let key = h.serve(h.desired("slowload", None)).await;
    let starting = h.wait_for(&key, "starting", |r| r.phase == Phase::Starting && r.pid.is_some()).await;
    let url = format!("http://127.0.0.1:{}/health", starting.internal_port.unwrap());
    // The process exists before it listens: retry the connection, not the answer.
    let health = loop {
        match reqwest::get(&url).await {
            Ok(resp) => break resp,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    assert_eq!(health.status(), 503, "loading");
    assert_eq!(h.agent.watch(&key).await.unwrap().borrow().phase, Phase::Starting);
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    assert_eq!(r.restarts, 0);
    assert_eq!(r.pid, starting.pid);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_engine_that_loses_the_bind_race_is_retried_on_another_port() {
    let h = Harness::new(sim_engine()).await;
    let startup = SimStartup { bind_delay_ms: 1500, ..Default::default() };
    std::fs::write(format!("{}.sim.json", h.model.display()), serde_json::to_vec(&startup).unwrap()).unwrap();
    let key = h.serve(h.desired("race", None)).await;
    let starting = h.wait_for(&key, "starting", |r| r.phase == Phase::Starting && r.internal_port.is_some()).await;
    let raced = starting.internal_port.unwrap();
    // Another process takes the port between the agent's check and the engine's bind.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", raced)).unwrap();
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    assert_ne!(r.internal_port, Some(raced));
    assert_eq!(r.restarts, 0, "a lost bind race is not a crash: {r:#?}");
    h.agent.shutdown().await;
}
