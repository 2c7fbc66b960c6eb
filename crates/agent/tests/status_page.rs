//! The status page (`/` on the agent's HTTP port) in a real browser, headless Chromium: each
//! model with its numbers readable with JavaScript off, a chart with one point per pulse the
//! API reports and the host beside it, why the engine was restarted, live updates by the page's
//! own script, and a screenshot for people to look at.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;

use metalkube_api::{Grade, ModelKey, Phase};
use metalkube_testkit::browser;
use metalkube_testkit::sim::Fault;
use metalkube_testkit::{set_fault, sim_engine};
use support::{Harness, Stopwatch};

const WINDOW: (u32, u32) = (1280, 900);

async fn serve_http(h: &Harness) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(metalkube_agent::http_port::serve(h.agent.clone(), listener, std::future::pending()));
    format!("http://{addr}")
}

/// Where a test leaves its screenshot: a stable path in the target directory, so a note can
/// cite it after the run.
fn screenshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page").join(format!("{name}.png"))
}

/// The `at_ms` of every pulse the API reports for `name`.
async fn api_pulses(base: &str, name: &str) -> Vec<u64> {
    let models: serde_json::Value = reqwest::get(format!("{base}/api/v1/models")).await.unwrap().json().await.unwrap();
    let model = models["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap();
    model["pulseHistory"].as_array().unwrap().iter().map(|p| p["atMs"].as_u64().unwrap()).collect()
}

/// The serialised `<section>` of one model in a dumped DOM.
fn section<'a>(dom: &'a str, key: &str) -> &'a str {
    let start = dom.find(&format!(r#"data-model="{key}""#)).unwrap_or_else(|| panic!("no {key} in the DOM:\n{dom}"));
    let len = dom[start..].find("</section>").expect("the section ends");
    &dom[start..start + len]
}

/// The `data-at-ms` of every pulse point in a section.
fn dom_pulses(section: &str) -> Vec<u64> {
    section
        .split(r#"<circle class="pulse "#)
        .skip(1)
        .map(|point| {
            let at = point.split(r#"data-at-ms=""#).nth(1).expect("each pulse has its time");
            at.split('"').next().unwrap().parse().unwrap()
        })
        .collect()
}

/// The chart holds every pulse the API reported just before: pulses taken since may follow,
/// and on a slow machine the oldest may have left a full history in between (then the ones
/// still kept must all be there).
fn assert_chart_holds(section: &str, api: &[u64]) {
    let history = metalkube_agent::model::report::PULSE_HISTORY;
    let dom = dom_pulses(section);
    assert!(!api.is_empty());
    assert!(dom.len() >= api.len(), "{} points in the chart, {} pulses in the API", dom.len(), api.len());
    assert!(dom.len() <= history);
    assert!(dom.windows(2).all(|w| w[0] <= w[1]), "points in time order: {dom:?}");
    let oldest = if dom.len() < history { 0 } else { dom[0] };
    for at in api.iter().filter(|&&at| at >= oldest) {
        assert!(dom.contains(at), "pulse at {at} is not in the chart: {dom:?}");
    }
}

async fn check_screenshot(url: &str, name: &str) -> PathBuf {
    let path = screenshot_path(name);
    let clock = Stopwatch::start();
    browser::screenshot(url, WINDOW, &path).await;
    let png = std::fs::read(&path).unwrap();
    assert_eq!(browser::png_size(&png), Some(WINDOW), "{}", path.display());
    println!("status page screenshot: {} ({} bytes, {:?})", path.display(), png.len(), clock.lap());
    path
}

/// The host figures the agent read beside each pulse round are on the page: the last pulse's in
/// words, and the strip under the pulse chart (a pulse answered within a clock tick has no CPU
/// shares, so its point may be missing; PSI, load and the agent's own timers are always read).
fn assert_host_beside_the_pulses(section: &str) {
    let host = section.split(r#"<dd data-field="host">"#).nth(1).and_then(|s| s.split("</dd>").next());
    assert!(host.is_some_and(|h| !h.is_empty() && h != "not measured"), "the last pulse's host figures: {section}");
    assert!(section.contains(r#"<svg class="chart host-chart""#), "the host strip: {section}");
    assert!(section.contains(r#"data-slow-after-restart="false""#), "{section}");
}

/// What the page must say about the two models of the simulator test, in served HTML or a DOM.
fn assert_drift_and_missing(page: &str, api: &[u64]) {
    let drift = section(page, "default/drift");
    assert!(drift.contains(r#"data-phase="Serving""#), "{drift}");
    assert!(drift.contains(r#"data-field="phase">Serving</span>"#), "{drift}");
    assert!(drift.contains(r#"data-field="grade">Green</span>"#), "{drift}");
    assert!(drift.contains(r#"<dd data-field="in-flight">0 of 1</dd>"#), "{drift}");
    assert!(drift.contains(r#"<dd data-field="queue-depth">0</dd>"#), "{drift}");
    assert!(drift.contains(r#"<li data-reason="pulse_red""#), "the restart and its reason: {drift}");
    assert!(drift.contains(r#"class="band yellow""#) && drift.contains(r#"class="band red""#), "{drift}");
    assert!(drift.contains("pulse grade-red"), "the red pulses before the restart are marked: {drift}");
    assert!(
        drift.contains(
            r#"data-field="restart-decision"><strong>Restart decision</strong> restarted: pulse pulse_red: "#
        ),
        "why the engine was restarted, in words: {drift}"
    );
    assert_host_beside_the_pulses(drift);
    assert_chart_holds(drift, api);
    let missing = section(page, "default/missing");
    assert!(missing.contains(r#"data-phase="Failed""#), "{missing}");
    assert!(missing.contains("&lt;b&gt;odd&lt;/b&gt;"), "the error is text, not markup: {missing}");
    assert!(!page.contains("<b>odd"), "{missing}");
}

/// A model that drifts into red and is restarted, beside one whose file is missing (with markup
/// in its path, so its error text tests escaping in the browser).
#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_each_model_its_pulses_and_restarts_in_chromium() {
    let h = Harness::new(sim_engine()).await;
    let base = serve_http(&h).await;
    let missing = format!("file://{}/<b>odd</b>/absent.gguf", h.dir.path().display());
    h.agent.apply(vec![h.desired("drift", None), h.desired("missing", Some(&missing))]).await;
    let r = h
        .wait_for(&ModelKey::new("default", "drift"), "serving with 5 pulses", |r| {
            r.phase == Phase::Serving && r.grade == Some(Grade::Green) && r.pulse_history.len() >= 5
        })
        .await;
    h.wait_for(&ModelKey::new("default", "missing"), "failed", |r| r.phase == Phase::Failed).await;
    set_fault(r.internal_port.unwrap(), &Fault { drift_ms_per_request: 25, ..Default::default() }).await;
    // The new engine has no fault: green again, with pulses from before and after the restart.
    let after = h
        .wait_for(&ModelKey::new("default", "drift"), "restarted and green again", |r| {
            r.restarts >= 1 && r.phase == Phase::Serving && r.grade == Some(Grade::Green)
        })
        .await;
    let seen = after.pulse_history.len();
    h.wait_for(&ModelKey::new("default", "drift"), "5 pulses after the restart", |r| r.pulse_history.len() >= seen + 5)
        .await;

    let api = api_pulses(&base, "drift").await;
    // JavaScript off, a browser shows what the server sends: every number is in it.
    let page = reqwest::get(format!("{base}/")).await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.starts_with("default-src 'none'"), "nothing but the page itself loads: {csp}");
    let html = page.text().await.unwrap();
    assert_drift_and_missing(&html, &api);

    // In the browser, once loaded.
    let clock = Stopwatch::start();
    let loaded = browser::load(&format!("{base}/")).await;
    println!("page loaded and its DOM dumped in {:?}", clock.lap());
    assert_drift_and_missing(&loaded.dom, &api);

    // The page's script fetches its main part again and swaps in the new numbers, with nothing
    // refused by the page's Content-Security-Policy and no script error on the way.
    let live = browser::load_after(&format!("{base}/"), Some(5_000)).await;
    let dom = &live.dom;
    let updates = dom.split(r#"data-live-updates=""#).nth(1).and_then(|s| s.split('"').next()).map(str::parse::<u32>);
    assert!(matches!(updates, Some(Ok(n)) if n >= 1), "no live update happened: {updates:?}\n{dom}");
    assert!(dom.contains(r#"<span id="live" class="live ok">live</span>"#), "{dom}");
    assert!(live.console.is_empty(), "the browser console: {:#?}", live.console);
    assert_drift_and_missing(dom, &api);

    check_screenshot(&format!("{base}/"), "simulator").await;
    h.agent.shutdown().await;
}

/// The same page over the real llama-server and the tiny model: engine compute time is drawn
/// too, since the real engine reports its timings.
#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_a_real_engine_and_its_compute_time_in_chromium() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let base = serve_http(&h).await;
    let key = h.serve(h.desired("tiny", None)).await;
    h.wait_for(&key, "serving with 5 pulses", |r| r.phase == Phase::Serving && r.pulse_history.len() >= 5).await;

    let api = api_pulses(&base, "tiny").await;
    let loaded = browser::load(&format!("{base}/")).await;
    assert!(loaded.console.is_empty(), "the browser console: {:#?}", loaded.console);
    let tiny = section(&loaded.dom, "default/tiny");
    assert!(tiny.contains(r#"data-field="phase">Serving</span>"#), "{tiny}");
    assert_host_beside_the_pulses(tiny);
    assert_chart_holds(tiny, &api);
    assert!(tiny.contains(r#"<path class="compute""#), "the engine's compute time is drawn: {tiny}");
    assert!(tiny.matches("data-compute-seconds=").count() >= api.len(), "{tiny}");

    check_screenshot(&format!("{base}/"), "real-engine").await;
    h.agent.shutdown().await;
}
