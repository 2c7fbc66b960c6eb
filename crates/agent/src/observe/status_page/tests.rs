use super::*;
use crate::health::lifecycle::FaultReason;
use crate::observe::report::RestartRecord;
use metalkube_api::{Grade, Phase};

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

#[test]
fn outside_text_is_escaped_everywhere() {
    let mut r = serving("<script>alert(1)</script>");
    r.last_error = Some(r#"engine said "><img src=x onerror=alert(2)>"#.into());
    r.push_restart(RestartRecord::new(NOW, FaultReason::Crash, "</li><script>x</script>"));
    let errors = BTreeMap::from([("<b>m.yaml</b>".to_owned(), "line 1: 'bad' & <worse>".to_owned())]);
    let html = render(&[view(r)], &errors, NOW, "n0nce");
    assert_eq!(html.matches("<script").count(), 1, "only the page's own script: {html}");
    assert!(!html.contains("<img") && !html.contains("<b>"), "{html}");
    assert!(html.contains("default/&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("engine said &quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
    assert!(html.contains("line 1: &#39;bad&#39; &amp; &lt;worse&gt;"));
    assert!(html.contains("&lt;/li&gt;&lt;script&gt;x&lt;/script&gt;"));
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
