use metalkube_api::{Grade, Phase};
use metalkube_vitals::attribution::HostCause;
use metalkube_vitals::host::pressure::HostPressure;

use super::*;
use crate::model::FaultReason;
use crate::model::report::{PulseHost, RestartRecord};

const NOW: u64 = 1_700_000_000_000;

fn serving(name: &str) -> ModelReport {
    let mut r = ModelReport::new("default", name);
    r.phase = Phase::Serving;
    r.grade = Some(Grade::Green);
    r.pulse_interval_seconds = 5.0;
    r.yellow_after_seconds = 2.0;
    r.red_after_seconds = 5.0;
    for i in 0..4 {
        r.push_pulse(PulseRecord {
            at_ms: NOW - 20_000 + i * 5_000,
            wall_seconds: 0.04,
            compute_seconds: Some(0.03),
            grade: Some(Grade::Green),
            error: None,
            host: None,
        });
    }
    r
}

fn idle() -> ServingLoad {
    ServingLoad { in_flight: 0, queue_depth: 0, max_concurrent: 4, circuit: "closed", decode_seconds_per_token: None }
}

fn view(health: ModelReport) -> ModelView {
    ModelView { health, serving: idle() }
}

fn page(models: &[ModelReport]) -> String {
    page_of(&models.iter().cloned().map(view).collect::<Vec<_>>())
}

fn page_of(models: &[ModelView]) -> String {
    render(models, &BTreeMap::new(), NOW, "abc123")
}

/// The `<section>` of one model.
fn section<'a>(html: &'a str, key: &str) -> &'a str {
    let start = html.find(&format!(r#"data-model="{key}""#)).unwrap_or_else(|| panic!("{key} missing: {html}"));
    let len = html[start..].find("</section>").unwrap_or(html.len() - start);
    &html[start..start + len]
}

#[test]
fn no_models_says_so_and_is_a_whole_page() {
    let html = page(&[]);
    assert!(html.starts_with("<!doctype html>") && html.ends_with("</html>"));
    assert!(html.contains(r#"data-empty="true""#) && html.contains("No models on this agent yet"), "{html}");
    assert!(html.contains("0 models · as of 22:13:20 UTC"), "{html}");
    assert!(!html.contains("data-model="));
}

#[test]
fn every_model_shows_its_state_load_and_pulses() {
    let mut busy = serving("busy");
    busy.grade = Some(Grade::Yellow);
    busy.saturated = true;
    busy.baseline_seconds = Some(0.035);
    let mut failed = ModelReport::new("other", "broken");
    failed.phase = Phase::Failed;
    failed.last_error = Some("model file /m/absent.gguf does not exist".into());
    let busy =
        ModelView { health: busy, serving: ServingLoad { in_flight: 2, max_concurrent: 3, queue_depth: 5, ..idle() } };
    let html = page_of(&[view(failed), busy, view(serving("calm"))]);

    let order: Vec<usize> = ["default/busy", "default/calm", "other/broken"]
        .iter()
        .filter_map(|k| html.find(&format!("data-model=\"{k}\"")))
        .collect();
    assert!(order.len() == 3 && order.windows(2).all(|w| w[0] < w[1]), "sorted by namespace and name");
    assert!(html.contains("3 models: 1 Failed, 2 Serving"), "{html}");

    let busy = section(&html, "default/busy");
    assert!(busy.contains(r#"data-phase="Serving" data-saturated="true""#), "{busy}");
    assert!(busy.contains(r#"<span class="badge grade-yellow" data-field="grade">Yellow</span>"#), "{busy}");
    assert!(busy.contains(r#"data-field="saturated">Saturated</span>"#));
    assert!(busy.contains(r#"<dd data-field="in-flight">2 of 3</dd>"#), "{busy}");
    assert!(busy.contains(r#"<dd data-field="queue-depth">5</dd>"#));
    assert!(busy.contains(r#"<dd data-field="baseline">35 ms</dd>"#));
    assert!(busy.contains(r#"<dd data-field="last-pulse">40 ms (compute 30 ms), 5 s ago</dd>"#), "{busy}");
    assert!(busy.contains("yellow ≥ 2 s, red ≥ 5 s, every 5 s"));
    assert_eq!(busy.matches(r#"<circle class="pulse "#).count(), 4);

    let broken = section(&html, "other/broken");
    assert!(broken.contains(r#"data-field="phase">Failed</span>"#) && broken.contains("no grade"));
    assert!(broken.contains("model file /m/absent.gguf does not exist"));
    assert!(broken.contains("no pulses yet"));
}

#[test]
fn restarts_are_listed_newest_first_with_their_reasons() {
    let mut r = serving("flaky");
    r.push_restart(RestartRecord::new(NOW - 120_000, FaultReason::Crash, "exit status 3"));
    r.push_restart(RestartRecord::new(NOW - 30_000, FaultReason::PulseRed, "took 6.2s (engine compute 6.1s)"));
    r.backoff_seconds = Some(1.5);
    let html = page(&[r]);
    let s = section(&html, "default/flaky");
    assert!(s.contains(r#"<dd data-field="restarts">2, next start in 1.5 s</dd>"#), "{s}");
    let (red, crash) = (s.find(r#"data-reason="pulse_red""#), s.find(r#"data-reason="crash""#));
    assert!(red.is_some() && crash.is_some() && red < crash, "newest first: {s}");
    assert!(
        s.contains("30 s ago</span> <code>pulse_red</code>") && s.contains("2 min ago</span> <code>crash</code>"),
        "{s}"
    );
}

/// A pulse round's host figures, as the agent records them beside the pulse.
fn host(others: f64, cause: Option<HostCause>) -> PulseHost {
    let p = HostPressure {
        others_cpu: Some(others),
        engine_cpu: Some(0.1),
        load_per_cpu: Some(2.0),
        ..HostPressure::default()
    };
    PulseHost::new(&p, cause)
}

#[test]
fn a_busy_host_is_shown_beside_the_pulse_and_named_as_the_cause() {
    let mut r = serving("shared");
    let busy = Some(HostCause::OtherProcessesCpu);
    for (i, p) in r.pulse_history.iter_mut().enumerate() {
        p.host = Some(if i < 2 { host(0.05, None) } else { host(0.8, busy) });
        if i >= 2 {
            p.wall_seconds = 6.0;
            p.grade = Some(Grade::Red);
        }
    }
    r.last_pulse = r.pulse_history.back().cloned();
    r.phase = Phase::HostContended;
    r.grade = Some(Grade::Red);
    r.host_contended = Some("other_processes_cpu");
    r.restart_decision = Some(
        "not restarted: the pulse took 6.000s, past redAfter, and the host explains it (other_processes_cpu: other processes 80% of CPU); a restart would not help".into(),
    );
    let html = page(&[r]);
    assert!(html.contains("1 model: 1 HostContended"), "{html}");
    let s = section(&html, "default/shared");
    assert!(
        s.contains(r#"data-phase="HostContended" data-saturated="false" data-host-contended="other_processes_cpu" data-slow-after-restart="false""#),
        "{s}"
    );
    assert!(s.contains(r#"<span class="badge phase host-contended" data-field="phase">HostContended</span>"#), "{s}");
    assert!(
        s.contains(r#"title="other processes kept the CPUs busy: graded by the absolute thresholds alone, not restarted for it">Host contended: other_processes_cpu</span>"#),
        "the cause as a badge, in words on hover: {s}"
    );
    assert!(
        s.contains(r#"<div class="wide"><dt>Host at the last pulse</dt><dd data-field="host">other processes 80% of CPU, engine 10%, load 2.00/CPU; busy enough to explain slowness: other processes kept the CPUs busy (other_processes_cpu)</dd></div>"#),
        "the last pulse's host figures: {s}"
    );
    assert!(
        s.contains(
            r#"<dd data-field="host-contended">yes: other processes kept the CPUs busy (other_processes_cpu)</dd>"#
        ),
        "{s}"
    );
    assert!(s.contains(r#"<dd data-field="slow-after-restart">no</dd>"#), "{s}");
    assert!(!s.contains("badge slow-after-restart"), "{s}");
    assert!(
        s.contains(r#"<p class="restart-decision" data-field="restart-decision"><strong>Restart decision</strong> not restarted: the pulse took 6.000s, past redAfter, and the host explains it"#),
        "why no restart was made, in words: {s}"
    );
    // The host strip under the pulse chart: a point per pulse, the busy ones marked, and the
    // pulses the host could explain ringed in the chart above.
    assert!(s.contains(r#"<svg class="chart host-chart""#) && s.contains(r#"data-host-pulses="4""#), "{s}");
    assert_eq!(s.matches(r#"<circle class="others-point"#).count(), 4, "{s}");
    assert_eq!(s.matches(r#"<circle class="others-point explained""#).count(), 2, "{s}");
    assert_eq!(s.matches(r#"<circle class="pulse grade-red host""#).count(), 2, "{s}");
    assert!(s.contains(r#"<span class="key others">other processes' CPU</span>"#), "the strip's legend: {s}");
}

#[test]
fn slow_after_restart_says_restarts_for_slowness_are_withheld_and_why() {
    let mut r = serving("stubborn");
    r.phase = Phase::Degraded;
    r.grade = Some(Grade::Red);
    r.slow_after_restart = true;
    r.push_restart(RestartRecord::new(NOW - 90_000, FaultReason::PulseRed, "took 6.2s (engine compute 6.1s)"));
    r.restart_decision = Some(
        "not restarted: 2 confirmed red pulse(s) (last took 6.300s), but the last restart for slowness did not make the engine faster (SlowAfterRestart)".into(),
    );
    let html = page(&[r]);
    let s = section(&html, "default/stubborn");
    assert!(s.contains(r#"data-host-contended="" data-slow-after-restart="true""#), "{s}");
    assert!(s.contains(r#"data-field="slow-after-restart-badge""#) && s.contains(">SlowAfterRestart</span>"), "{s}");
    assert!(s.contains(r#"<dd data-field="slow-after-restart">yes: restarts for slowness withheld</dd>"#), "{s}");
    assert!(s.contains(r#"<dd data-field="host-contended">no</dd>"#), "{s}");
    assert!(s.contains(r#"<dd data-field="host">not measured</dd>"#), "{s}");
    assert!(!s.contains("badge host-contended") && !s.contains("phase host-contended"), "{s}");
    // The decision reads next to the restarts it explains, and the history is still there.
    let (decision, history) = (s.find(r#"data-field="restart-decision""#), s.find(r#"<ol class="restarts">"#));
    assert!(decision.is_some() && history.is_some() && decision < history, "{s}");
    assert!(s.contains("did not make the engine faster (SlowAfterRestart)</p>"), "{s}");
    assert!(s.contains(r#"<li data-reason="pulse_red""#), "{s}");
    // No host figures: no strip and no legend for one.
    assert!(!s.contains("host-chart") && !s.contains("key others"), "{s}");
}

#[test]
fn a_model_with_no_restart_decision_says_nothing_about_one() {
    let html = page(&[serving("calm")]);
    let s = section(&html, "default/calm");
    assert!(!s.contains("restart-decision") && !s.contains("SlowAfterRestart"), "{s}");
    assert!(s.contains(r#"data-host-contended="" data-slow-after-restart="false""#), "{s}");
}

#[test]
fn outside_text_is_escaped_everywhere() {
    let mut r = serving("<script>alert(1)</script>");
    r.last_error = Some(r#"engine said "><img src=x onerror=alert(2)>"#.into());
    r.push_restart(RestartRecord::new(NOW, FaultReason::Crash, "</li><script>x</script>"));
    r.restart_decision = Some("restarted: pulse said <iframe src=x>".into());
    r.host_contended = Some(r#""><i>cause</i>"#);
    let mut odd = host(0.9, Some(HostCause::OtherProcessesCpu));
    odd.summary = "<u>busy</u> & 'loud'".into();
    r.pulse_history.back_mut().unwrap().host = Some(odd.clone());
    r.last_pulse = r.pulse_history.back().cloned();
    let errors = BTreeMap::from([("<b>m.yaml</b>".to_owned(), "line 1: 'bad' & <worse>".to_owned())]);
    let html = render(&[view(r)], &errors, NOW, "n0nce");
    assert_eq!(html.matches("<script").count(), 1, "only the page's own script: {html}");
    assert!(!html.contains("<img") && !html.contains("<b>"), "{html}");
    assert!(!html.contains("<iframe") && !html.contains("<i>") && !html.contains("<u>"), "{html}");
    assert!(html.contains("default/&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("engine said &quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
    assert!(html.contains("line 1: &#39;bad&#39; &amp; &lt;worse&gt;"));
    assert!(html.contains("&lt;/li&gt;&lt;script&gt;x&lt;/script&gt;"));
    assert!(html.contains("restarted: pulse said &lt;iframe src=x&gt;"), "{html}");
    assert!(html.contains(r#"data-host-contended="&quot;&gt;&lt;i&gt;cause&lt;/i&gt;""#), "{html}");
    assert!(html.contains("&lt;u&gt;busy&lt;/u&gt; &amp; &#39;loud&#39;"), "{html}");
}

#[test]
fn the_page_fetches_nothing_and_its_inline_parts_carry_the_nonce() {
    let html = page(&[serving("m")]);
    for outside in ["http://", "https://", " src=", "url(", "@import", "@font-face"] {
        assert!(!html.contains(outside), "{outside:?} in the page");
    }
    assert!(html.contains(r#"<style nonce="abc123">"#) && html.contains(r#"<script nonce="abc123">"#));
    let csp = content_security_policy("abc123");
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'nonce-abc123'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "the live updates fetch this page: {csp}");
    assert!(html.contains(r#"<noscript><meta http-equiv="refresh" content="5"></noscript>"#));
    assert!(html.contains(r#"<main id="models" data-now-ms="1700000000000">"#), "the script swaps this element");
}

#[test]
fn a_download_in_progress_shows_its_numbers() {
    let mut r = ModelReport::new("default", "big");
    r.phase = Phase::Downloading;
    r.download = Some(metalkube_api::DownloadProgress::new(512 << 20, Some(2 << 30), Some(64.0 * 1024.0 * 1024.0)));
    let html = page(&[r]);
    assert!(html.contains(r#"<dd data-field="download">512 MiB of 2 GiB, 64 MiB/s, 24 s left</dd>"#), "{html}");
}

#[test]
fn durations_ages_and_sizes_read_like_people_write_them() {
    let cases = [
        (0.0004, "0.4 ms"),
        (0.001, "1 ms"),
        (0.0042, "4.2 ms"),
        (0.85, "850 ms"),
        (2.0, "2 s"),
        (1.25, "1.25 s"),
        (12.54, "12.5 s"),
        (600.0, "10 min"),
        (9000.0, "2.5 h"),
        (f64::NAN, "?"),
        (-1.0, "?"),
    ];
    for (s, want) in cases {
        assert_eq!(fmt_seconds(s), want, "{s}");
    }
    assert_eq!(fmt_age(10_000, 9_500), "just now");
    assert_eq!(fmt_age(10_000, 20_000), "just now", "a pulse from a clock step ahead");
    assert_eq!(fmt_age(100_000, 10_000), "1 min ago");
    assert_eq!(fmt_age(3 * 86_400_000, 0), "3 d ago");
    assert_eq!(fmt_bytes(512), "512 B");
    assert_eq!(fmt_bytes(1536), "1.5 KiB");
    assert_eq!(fmt_bytes(3 << 30), "3 GiB");
}

#[test]
fn the_live_part_is_the_main_of_the_whole_page_without_style_or_script() {
    let models = [view(serving("m"))];
    let errors = BTreeMap::from([("x.yaml".to_owned(), "bad".to_owned())]);
    let part = render_main(&models, &errors, NOW);
    assert!(part.starts_with(r#"<main id="models""#) && part.ends_with("</main>"), "{part}");
    assert!(render(&models, &errors, NOW, "n").contains(&part), "the same numbers either way");
    assert!(!part.contains("<style") && !part.contains("<script"));
}
