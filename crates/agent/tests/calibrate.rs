//! `metalkube-agent calibrate` with the agent: the incident reproduced on the simulator through
//! the binary, as a person runs it (a trivial call going from 0.6 s to 30 s while `/health`
//! stays 200, uptime runs on and the task counter climbs), and a run on the real engine through
//! a running agent (`--agent`, `--model`). Runs with no agent: `crates/calibrate/tests/runs.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use metalkube_api::{Grade, ModelKey, Phase};
use metalkube_calibrate::report::Report;
use metalkube_calibrate::shape::Shape;
use metalkube_calibrate::target::Target;
use metalkube_calibrate::{self as calibrate, Settings};
use metalkube_testkit::engines::start_sim;
use metalkube_testkit::sim::{Fault, Ramp, SimStartup};
use support::Harness;

/// The incident: a trivial call rises from 0.6 s to 30 s. /health stays 200, the engine process
/// runs on and takes new tasks (slowly): the uptime and task-counter checks stay green while
/// the pulse is red. The drift is time-compressed (8 s healthy, then 16 s to reach 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn the_incident_uptime_and_task_counter_stay_green_while_the_pulse_is_red() {
    let dir = tempfile::tempdir().unwrap();
    let ramp = Ramp { from_ms: 600, to_ms: 30_000, after_ms: 8_000, over_ms: 16_000 };
    let startup = SimStartup { fault: Fault { ramp: Some(ramp), ..Fault::default() }, ..SimStartup::default() };
    let (sim, port) = start_sim(dir.path(), "drift.gguf", &startup, &["--parallel", "40"]).await;

    let out = dir.path().join("report");
    let engine = format!("http://127.0.0.1:{port}");
    // The binary, as a person runs it. 32 clients keep tasks starting while each takes long; a
    // 5 s check window is the incident's periodic check, compressed like the drift.
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_metalkube-agent"))
        .args(["calibrate", "--engine-url", &engine, "--engine-pid", &sim.pid().to_string(), "--shape", "chat"])
        .args(["--duration", "34s", "--interval", "1s", "--concurrency", "32", "--healthy-for", "7s"])
        .args(["--check-window", "5s", "--out"])
        .arg(&out)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run).await.expect("calibrate ends").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");

    let report: Report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let s = report.suggested.as_ref().expect("thresholds from the healthy 7 s");
    assert!((0.55..0.7).contains(&s.basis.p50_seconds), "healthy pulses are the sim's 0.6 s: {:?}", s.basis);
    assert!(s.yellow_after_seconds < s.red_after_seconds && s.red_after_seconds < 5.0, "{s:?}");
    let iv = &report.intervals;
    assert!(iv.len() >= 33, "{} intervals", iv.len());
    assert!(iv[..6].iter().all(|i| i.verdicts.pulse == Some(Grade::Green)), "healthy start: {:#?}", &iv[..6]);
    for last in &iv[iv.len() - 3..] {
        assert_eq!(last.verdicts.pulse, Some(Grade::Red), "pulse at the end: {last:#?}");
        assert_eq!(last.verdicts.uptime, Some(Grade::Green), "uptime at the end: {last:#?}");
        assert_eq!(last.verdicts.task_counter, Some(Grade::Green), "task counter at the end: {last:#?}");
        assert!(last.verdicts.pulse_seconds.is_some_and(|w| w > 10.0), "{last:#?}");
    }
    let red = &report.summary.while_pulse_red;
    assert!(red.intervals >= 15, "{red:?}");
    assert_eq!(red.uptime_green, red.intervals, "uptime never noticed: {red:?}");
    assert!(red.task_counter_green * 10 >= red.intervals * 9, "the counter kept climbing: {red:?}");
    // Users saw it; the pulse tracks it; so does the counter's pace, which a check on "it moved"
    // never reads.
    let rho = |name: &str| report.indicators.iter().find(|c| c.indicator.starts_with(name)).unwrap().spearman_rho;
    assert!(rho("pulse wall").is_some_and(|r| r > 0.7), "{:#?}", report.indicators);
    assert!(report.summary.latency_p99_seconds.is_some_and(|p| p > 10.0), "{:?}", report.summary);
    // And all along, /health said ok.
    let health = reqwest::get(format!("{engine}/health")).await.unwrap();
    assert!(health.status().is_success());
    // What the page holds is the library's to test (crates/calibrate); the binary writes it.
    assert!(out.join("report.html").is_file());
}

/// On the real engine, through a running agent (--agent / --model): the report is made from real
/// answers, with thresholds in order and correlations computed, and every request fits the
/// model's context.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_on_the_real_engine_through_the_agent_suggests_ordered_thresholds() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let key = h.serve(h.desired("calib", None)).await;
    let serving = h.wait_for(&key, "serving", |r| r.phase == Phase::Serving && r.serving_port.is_some()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(metalkube_agent::http_port::serve(h.agent.clone(), listener, async move {
        let _ = stopped.await;
    }));

    let out = h.dir.path().join("report");
    let settings = Settings {
        target: Target::agent(&agent_url, ModelKey::new("default", "calib")),
        shape: Shape::Mixed,
        duration: Duration::from_secs(12),
        interval: Duration::from_secs(1),
        concurrency: 2,
        seed: 7,
        healthy_for: None,
        check_window: Duration::from_secs(1),
        pulse_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(60),
        api_key: None,
        out: out.clone(),
    };
    let mut lines = 0;
    let finished = calibrate::run(settings, |i| {
        lines += 1;
        println!("{}", i.progress_line());
    })
    .await
    .unwrap();
    let r = &finished.report;
    println!("{}", r.summary_text());
    assert_eq!(lines, 12);
    assert_eq!(r.target.engine_pid, serving.pid);
    assert_eq!(r.settings.slot_context_tokens, 256, "512 tokens over 2 slots, from /props");
    assert!(r.summary.requests >= 10, "{:?}", r.summary);
    assert_eq!(r.summary.request_errors, 0, "every plan fits the context: {:?}", r.intervals);
    let s = r.suggested.as_ref().expect("12 pulses on a healthy engine");
    assert!(s.yellow_after_seconds < s.red_after_seconds, "{s:?}");
    assert!(s.drift.yellow_factor < s.drift.red_factor, "{s:?}");
    assert!(r.pulse_spec_yaml.as_deref().is_some_and(|y| y.contains("yellowAfter:")));
    assert_eq!(r.indicators.len(), 6);
    let computed = r.indicators.iter().filter(|c| c.spearman_rho.is_some()).count();
    assert!(computed >= 2, "the pulse and the load's own rates vary: {:#?}", r.indicators);
    let last = r.intervals.last().unwrap();
    assert!(last.engine.uptime_seconds.is_some() && last.engine.rss_bytes.is_some(), "{last:#?}");
    assert!(last.engine.task_counter.is_some() && last.engine.tokens_served.is_some(), "{last:#?}");
    assert!(r.intervals.iter().any(|i| i.requests.ttft_p50_seconds.is_some()), "streams time their first token");
    assert!(r.intervals.iter().any(|i| i.requests.decode_ms_per_token_p50.is_some()));
    assert_eq!(finished.json_path, out.join("report.json"));
    assert!(finished.html_path.is_file());

    let _ = stop.send(());
    let _ = http.await;
    h.agent.shutdown().await;
}
