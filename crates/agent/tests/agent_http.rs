//! The agent's HTTP port over a real socket: readiness, model JSON, and metrics that pass
//! promtool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use metalkube_api::Phase;
use support::Harness;

async fn serve_http(h: &Harness) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(metalkube_agent::observe::http::serve(h.agent.clone(), listener, std::future::pending()));
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_models_and_metrics_over_http() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let base = serve_http(&h).await;
    let missing = format!("file://{}/absent.gguf", h.dir.path().display());
    h.agent.apply(vec![h.desired("good", None), h.desired("bad", Some(&missing))]).await;
    h.wait_for("default/good", "serving", |r| r.phase == Phase::Serving && r.last_pulse.is_some()).await;
    h.wait_for("default/bad", "failed", |r| r.phase == Phase::Failed).await;

    assert_eq!(reqwest::get(format!("{base}/healthz")).await.unwrap().status(), 200);

    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503, "one model is failed");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["models"]["default/good"]["ready"], true, "{body}");
    assert_eq!(body["models"]["default/bad"]["phase"], "Failed", "{body}");
    assert!(body["models"]["default/bad"]["message"].as_str().unwrap().contains("absent.gguf"), "{body}");

    let models: serde_json::Value = reqwest::get(format!("{base}/api/v1/models")).await.unwrap().json().await.unwrap();
    let good = models["models"].as_array().unwrap().iter().find(|m| m["name"] == "good").unwrap();
    for field in ["phase", "grade", "lastPulse", "restarts", "internalPort"] {
        assert!(!good[field].is_null(), "{field} missing: {good}");
    }
    assert!(good["lastPulse"]["computeSeconds"].as_f64().unwrap() > 0.0, "{good}");

    h.agent.apply(vec![h.desired("good", None)]).await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200, "the failed model is gone");

    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert!(metrics.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = metrics.text().await.unwrap();
    for name in [
        "metalkube_agent_pulse_duration_seconds_bucket",
        "metalkube_agent_pulse_grade",
        "metalkube_agent_engine_up",
        "metalkube_agent_engine_phase",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(!text.contains(r#"model="default/bad""#), "series of removed models are dropped:\n{text}");
    metalkube_testkit::promtool::check_metrics(&text);
    h.agent.shutdown().await;
}
