//! The supervisor against the real llama-server and the tiny model: real processes, real
//! signals, real ports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use metalkube_api::{Grade, ModelKey, Phase};
use metalkube_testkit::cgroup::CpuThrottle;
use nix::sys::signal::Signal;
use support::{Harness, Stopwatch, is_running, signal};

fn engine() -> std::path::PathBuf {
    metalkube_testkit::real_engine()
}

#[tokio::test(flavor = "multi_thread")]
async fn starts_serving_with_green_pulses_and_answers_chat() {
    let h = Harness::new(engine()).await;
    let key = h.serve(h.desired("tiny", None)).await;
    let r = h
        .wait_for(&key, "serving with 3 green pulses", |r| {
            r.phase == Phase::Serving && r.grade == Some(Grade::Green) && r.pulse_history.len() >= 3
        })
        .await;
    let pulse = r.last_pulse.unwrap();
    assert!(pulse.compute_seconds.is_some(), "llama-server reports timings: {pulse:?}");
    assert_eq!(r.restarts, 0);

    // The tiny model's output is valid text through the OpenAI-style API.
    let port = r.internal_port.unwrap();
    let resp: serde_json::Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = resp["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty(), "{resp}");

    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"metalkube_agent_engine_up{model="default/tiny"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"metalkube_agent_pulse_grade{model="default/tiny"} 0"#), "{metrics}");
    h.agent.shutdown().await;
    assert!(!is_running(r.pid.unwrap()), "shutdown stops the engine");
}

/// A model whose estimate fits the budget alone but not beside a model already serving waits,
/// saying for what, and starts once the memory is given back; the serving model is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_waits_for_memory_the_serving_models_hold() {
    let dir = tempfile::tempdir().unwrap();
    let header = metalkube_gguf::read_header(&metalkube_testkit::tiny_model(dir.path())).unwrap();
    let one = metalkube_gguf::estimate_memory(&header, 512).unwrap().total();
    let h = Harness::with_memory_budget(engine(), one + one / 2).await;
    let (first, second) = (h.desired("first", None), h.desired("second", None));
    h.agent.apply(vec![first.clone()]).await;
    let serving = h.wait_for(&ModelKey::new("default", "first"), "serving", |r| r.phase == Phase::Serving).await;
    h.agent.apply(vec![first.clone(), second.clone()]).await;
    let waiting = h
        .wait_for(&ModelKey::new("default", "second"), "waiting for memory", |r| {
            r.last_error.as_deref().is_some_and(|e| e.starts_with("waiting for memory"))
        })
        .await;
    assert_eq!((waiting.phase, waiting.pid), (Phase::Pending, None), "no engine started: {waiting:#?}");
    assert!(waiting.last_error.unwrap().contains("held by default/first"));
    assert_eq!(waiting.memory_bytes, Some(one), "the estimate is reported while waiting");
    let first_now = h.agent.report(&ModelKey::new("default", "first")).await.unwrap();
    assert_eq!(
        (first_now.health.phase, first_now.health.pid),
        (Phase::Serving, serving.pid),
        "the serving model is untouched"
    );

    h.agent.apply(vec![second]).await;
    let r = h
        .wait_for(&ModelKey::new("default", "second"), "serving once first is gone", |r| r.phase == Phase::Serving)
        .await;
    assert_eq!(r.last_error, None);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_is_noticed_and_the_engine_restarted() {
    let h = Harness::new(engine()).await;
    let key = h.serve(h.desired("killed", None)).await;
    let before = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    let old_pid = before.pid.unwrap();
    let clock = Stopwatch::start();
    signal(old_pid, Signal::SIGKILL);
    let after = h
        .wait_for(&key, "serving again with a new process", |r| {
            r.phase == Phase::Serving && r.pid.is_some_and(|p| p != old_pid)
        })
        .await;
    println!("SIGKILL → serving again: {:?}", clock.lap());
    assert_eq!(after.restarts, 1);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"metalkube_agent_engine_restarts_total{model="default/killed",reason="crash"} 1"#),
        "{metrics}"
    );
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigstop_turns_red_and_the_engine_is_replaced() {
    let h = Harness::new(engine()).await;
    let key = h.serve(h.desired("stopped", None)).await;
    let before =
        h.wait_for(&key, "serving green", |r| r.phase == Phase::Serving && r.grade == Some(Grade::Green)).await;
    let old_pid = before.pid.unwrap();
    let clock = Stopwatch::start();
    signal(old_pid, Signal::SIGSTOP);
    let red = h.wait_for(&key, "red", |r| r.grade == Some(Grade::Red)).await;
    let to_red = clock.lap();
    // Red from pulses still out past redAfter, with /slots silent, before any pulse timed out.
    let last = red.last_pulse.clone().unwrap();
    assert!(last.error.as_deref().is_some_and(|e| e.contains("still waiting")), "{last:?}");
    assert!(!red.is_ready());
    let after = h
        .wait_for(&key, "serving again with a new process", |r| {
            r.phase == Phase::Serving && r.pid.is_some_and(|p| p != old_pid)
        })
        .await;
    let to_serving = clock.lap();
    println!("detection: SIGSTOP → red {to_red:?}; red → serving again {:?}", to_serving - to_red);
    assert!(!is_running(old_pid), "the stopped engine was killed");
    assert_eq!(after.restarts, 1);
    let metrics = h.metrics().await;
    assert!(metrics.contains(r#"reason="hang"} 1"#), "{metrics}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_in_use_by_another_process_is_skipped() {
    let ports = support::port_block();
    let taken = *ports.start();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", taken)).unwrap();
    let h = Harness::with(engine(), ports, support::fast_backoff()).await;
    let key = h.serve(h.desired("ports", None)).await;
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    assert_ne!(r.internal_port, Some(taken));
    assert_eq!(r.restarts, 0);
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_model_file_fails_clearly_without_a_restart_loop() {
    let h = Harness::new(engine()).await;
    let missing = h.dir.path().join("nowhere/model.gguf");
    let key = h.serve(h.desired("missing", Some(&format!("file://{}", missing.display())))).await;
    let r = h.wait_for(&key, "failed", |r| r.phase == Phase::Failed).await;
    let message = r.last_error.unwrap();
    assert!(message.contains(&missing.display().to_string()) && message.contains("does not exist"), "{message}");
    assert_eq!(r.restarts, 0);
    assert_eq!(r.pid, None, "no engine was started");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_model_crash_loops_with_growing_delays() {
    let h = Harness::new(engine()).await;
    let truncated = h.dir.path().join("truncated.gguf");
    let bytes = std::fs::read(&h.model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let key = h.serve(h.desired("truncated", Some(&format!("file://{}", truncated.display())))).await;

    let mut delays = Vec::new();
    for n in 1..=4 {
        let r = h.wait_for(&key, "backing off", |r| r.restarts == n && r.backoff_seconds.is_some()).await;
        delays.push(r.backoff_seconds.unwrap());
        if n >= 2 {
            assert_eq!(r.phase, Phase::CrashLoopBackOff, "{r:#?}");
        }
        let message = r.last_error.unwrap();
        assert!(message.contains("engine exited"), "{message}");
        // The engine's own words, read from its output, explain the exit.
        assert!(!message.contains("no output"), "{message}");
        assert!(message.to_ascii_lowercase().contains("failed") || message.contains("error"), "{message}");
    }
    // And its whole output is in its log file.
    let logs = h.dir.path().join("state/logs");
    let log: String = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("truncated"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        log.contains("llama") && log.to_ascii_lowercase().contains("failed"),
        "engine log in {}: {log}",
        logs.display()
    );
    println!("crash-loop delays: {delays:?}");
    assert!(delays.windows(2).all(|w| w[1] >= w[0]), "delays grow: {delays:?}");
    assert!(delays[3] > delays[0] * 3.0, "delays grow exponentially: {delays:?}");
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_starvation_turns_red_and_the_engine_is_replaced() {
    let h = Harness::new(engine()).await;
    let key = h.serve(h.desired("throttled", None)).await;
    let before =
        h.wait_for(&key, "serving green", |r| r.phase == Phase::Serving && r.grade == Some(Grade::Green)).await;
    let old_pid = before.pid.unwrap();
    // 0.1% of one CPU: a pulse that needs a few ms of CPU now takes seconds. /health, answered
    // by another thread with almost no work, is not what the agent trusts.
    let throttle = CpuThrottle::new("test-starved", 1000, 1_000_000);
    let clock = Stopwatch::start();
    throttle.add(old_pid);
    h.wait_for(&key, "red", |r| r.grade == Some(Grade::Red)).await;
    let to_red = clock.lap();
    let after = h
        .wait_for(&key, "serving green with a new process", |r| {
            r.phase == Phase::Serving && r.grade == Some(Grade::Green) && r.pid.is_some_and(|p| p != old_pid)
        })
        .await;
    println!("CPU throttled to 0.1%: → red {to_red:?}; → serving green again {:?}", clock.lap());
    assert_eq!(after.restarts, 1);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"model="default/throttled",reason="hang"} 1"#)
            || metrics.contains(r#"model="default/throttled",reason="pulse_red"} 1"#),
        "{metrics}"
    );
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_see_the_model_by_its_metalmodel_name_not_a_path() {
    let h = Harness::new(engine()).await;
    let key = h.serve(h.desired("named", None)).await;
    let r = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving && r.serving_port.is_some()).await;
    let base = format!("http://127.0.0.1:{}", r.serving_port.unwrap());
    let models: serde_json::Value = reqwest::get(format!("{base}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "named", "{models}");
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["model"], "named", "{answer}");
    assert!(!answer.to_string().contains(".gguf"), "no path on the Mac leaks: {answer}");
    h.agent.shutdown().await;
}

/// Stopping a model takes up to the drain grace (a request in flight on a frozen engine) and the
/// stop grace: the agent's reports (`/readyz`, `/api/v1/models`, the Watch stream) answer
/// meanwhile, and a model wanted again waits for its predecessor to be gone.
#[tokio::test(flavor = "multi_thread")]
async fn reports_answer_while_an_engine_stops_and_a_model_wanted_again_waits_for_it() {
    let h = Harness::new(engine()).await;
    let key = h.serve(h.desired("slow-stop", None)).await;
    let serving = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving).await;
    let (pid, port) = (serving.pid.unwrap(), serving.serving_port.unwrap());
    // A request in flight that the frozen engine never answers: the stop drains it first.
    signal(pid, Signal::SIGSTOP);
    let in_flight = tokio::spawn(
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/v1/completions"))
            .json(&serde_json::json!({"prompt": "Once upon a time", "max_tokens": 256}))
            .send(),
    );
    // The queue's numbers are read live, not pushed: look until the request is in.
    let admitted = std::time::Instant::now();
    while h.agent.report(&key).await.is_none_or(|r| r.serving.in_flight == 0) {
        assert!(admitted.elapsed() < std::time::Duration::from_secs(10), "the request never reached the engine");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let agent = h.agent.clone();
    let removing = tokio::spawn(async move { agent.remove(&ModelKey::new("default", "slow-stop")).await });
    // Every look answers within 500 ms although the stop takes seconds; the model leaves the
    // reports as soon as its stop begins.
    loop {
        let reports = tokio::time::timeout(std::time::Duration::from_millis(500), h.agent.reports())
            .await
            .expect("reports answer while an engine stops");
        if reports.is_empty() {
            break;
        }
        assert!(!removing.is_finished(), "the model stayed in the reports until its stop ended: {reports:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::timeout(std::time::Duration::from_millis(500), h.agent.upsert(h.desired("slow-stop", None)))
        .await
        .expect("an upsert does not wait for the stop either");
    assert!(!removing.is_finished(), "the engine is still within its stop grace");
    assert!(removing.await.unwrap());
    let _ = in_flight.await;
    assert!(!is_running(pid), "the old engine is gone");
    let again = h.wait_for(&key, "serving again", |r| r.phase == Phase::Serving).await;
    assert_ne!(again.pid, Some(pid), "a new engine, started after the old one was gone");
    h.agent.shutdown().await;
}
