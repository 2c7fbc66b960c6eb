//! The status page on the agent's HTTP port (`/`): every model's phase, grade, load, restarts
//! and last error, with a chart of its recent pulses and, under it, how busy the host was beside
//! each pulse (a busy host is not a sick engine: `HostContended` and its cause,
//! `SlowAfterRestart`, and in words why a restart was or was not made). Rendered on the server
//! from the same reports as `/api/v1/models`, so every number is in the HTML and reads with
//! JavaScript off.
//! Everything is inline (style, SVG, a small script that re-fetches the page for live
//! updates) and the page's Content-Security-Policy forbids any other fetch: it works on a Mac
//! with no route to the internet and leaks nothing about who looks at it.

mod chart;

use std::collections::BTreeMap;
use std::fmt::Write;

use metalkube_api::Phase;
use metalkube_svg_chart::escape;
use metalkube_vitals::attribution::HostCause;

use crate::model::ServingLoad;
use crate::model::report::{ModelReport, ModelView, PulseHost, PulseRecord};

const STYLE: &str = include_str!("page.css");
/// Re-fetches the page every 2 s and swaps in its `<main>`.
const SCRIPT: &str = include_str!("live.js");
/// Without JavaScript the page reloads itself this often instead.
const NOSCRIPT_REFRESH_SECONDS: u32 = 5;

/// The Content-Security-Policy sent with the page: only its own inline style and script (by
/// `nonce`, fresh per response) and fetches of this same origin (the live updates). A model
/// name or an engine's error that got past escaping still could not run or load anything.
pub fn content_security_policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; connect-src 'self'; \
         img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// The whole page. `source_errors` are model files that could not be used (standalone mode);
/// `now_ms` (milliseconds since the Unix epoch) dates the page and ages the pulses; `nonce`
/// must be the one in `content_security_policy`.
pub fn render(models: &[ModelView], source_errors: &BTreeMap<String, String>, now_ms: u64, nonce: &str) -> String {
    let mut out = String::with_capacity(16 * 1024 + models.len() * 24 * 1024);
    let nonce = escape(nonce);
    let _ = write!(
        out,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>metalkube agent</title><noscript><meta http-equiv="refresh" content="{NOSCRIPT_REFRESH_SECONDS}"></noscript><style nonce="{nonce}">{STYLE}</style></head><body><header><h1>metalkube agent</h1><span id="live" class="live">refreshes every {NOSCRIPT_REFRESH_SECONDS} s</span><nav><a href="/api/v1/models">JSON</a> <a href="/metrics">metrics</a> <a href="/readyz">readyz</a></nav></header>"#
    );
    models_part(&mut out, models, source_errors, now_ms);
    let _ = write!(out, r#"<script nonce="{nonce}">{SCRIPT}</script></body></html>"#);
    out
}

/// Only the page's `<main>`: what the live updates fetch (`/?part=main`) and swap in. A whole
/// page would carry a style whose fresh nonce the open page's policy refuses, in the browser
/// console every two seconds.
pub fn render_main(models: &[ModelView], source_errors: &BTreeMap<String, String>, now_ms: u64) -> String {
    let mut out = String::with_capacity(4 * 1024 + models.len() * 24 * 1024);
    models_part(&mut out, models, source_errors, now_ms);
    out
}

fn models_part(out: &mut String, models: &[ModelView], source_errors: &BTreeMap<String, String>, now_ms: u64) {
    let _ = write!(out, r#"<main id="models" data-now-ms="{now_ms}">"#);
    summary(out, models, now_ms);
    if !source_errors.is_empty() {
        out.push_str(r#"<section class="source-errors"><h2>Files that could not be used</h2><ul>"#);
        for (file, error) in source_errors {
            let _ = write!(out, "<li><code>{}</code>: {}</li>", escape(file), escape(error));
        }
        out.push_str("</ul></section>");
    }
    if models.is_empty() {
        out.push_str(
            r#"<p class="empty" data-empty="true">No models on this agent yet. Standalone, it serves the MetalModel files in its <code>--models-dir</code>; in a cluster, the controller places models here.</p>"#,
        );
    }
    let mut sorted: Vec<&ModelView> = models.iter().collect();
    sorted.sort_by_key(|v| (v.health.namespace.as_str(), v.health.name.as_str()));
    for v in sorted {
        model(out, &v.health, &v.serving, now_ms);
    }
    out.push_str("</main>");
}

/// "2 models: 1 Serving, 1 Failed · 14:03:07 UTC".
fn summary(out: &mut String, models: &[ModelView], now_ms: u64) {
    let mut phases: BTreeMap<&str, usize> = BTreeMap::new();
    for v in models {
        *phases.entry(v.health.phase.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = phases.iter().map(|(phase, n)| format!("{n} {phase}")).collect();
    let secs = now_ms / 1000;
    let _ = write!(
        out,
        r#"<p class="summary">{n} model{s}{colon}{counts} · as of {h:02}:{m:02}:{sec:02} UTC</p>"#,
        n = models.len(),
        s = if models.len() == 1 { "" } else { "s" },
        colon = if counts.is_empty() { "" } else { ": " },
        counts = counts.join(", "),
        h = secs / 3600 % 24,
        m = secs / 60 % 60,
        sec = secs % 60,
    );
}

fn model(out: &mut String, r: &ModelReport, load: &ServingLoad, now_ms: u64) {
    let key = escape(&r.key().to_string());
    let phase = r.phase.as_str();
    let grade = r.grade.map_or("none", chart::grade_class);
    let phase_class = if r.phase == Phase::HostContended { " host-contended" } else { "" };
    let _ = write!(
        out,
        r#"<section class="model grade-{grade}" data-model="{key}" data-phase="{phase}" data-saturated="{sat}" data-host-contended="{host}" data-slow-after-restart="{slow}"><h2><span class="name">{key}</span> <span class="badge phase{phase_class}" data-field="phase">{phase}</span> <span class="badge grade-{grade}" data-field="grade">{grade_text}</span>"#,
        sat = r.saturated,
        host = escape(r.host_contended.unwrap_or("")),
        slow = r.slow_after_restart,
        grade_text = r.grade.map_or("no grade", |g| g.as_str()),
    );
    if r.saturated {
        out.push_str(r#" <span class="badge saturated" data-field="saturated">Saturated</span>"#);
    }
    if let Some(cause) = r.host_contended {
        let _ = write!(
            out,
            r#" <span class="badge host-contended" data-field="host-contended-badge" title="{}: graded by the absolute thresholds alone, not restarted for it">Host contended: {}</span>"#,
            escape(cause_words(cause)),
            escape(cause)
        );
    }
    if r.slow_after_restart {
        out.push_str(
            r#" <span class="badge slow-after-restart" data-field="slow-after-restart-badge" title="a restart for slowness did not make the engine faster: restarts for slowness are withheld">SlowAfterRestart</span>"#,
        );
    }
    out.push_str("</h2>");
    numbers(out, r, load, now_ms);
    out.push_str(r#"<div class="chart-box">"#);
    chart::render(out, r, now_ms);
    let host_drawn = chart::render_host(out, r, now_ms);
    out.push_str(
        r#"<p class="legend"><span class="key wall">wall time</span> <span class="key compute">engine compute</span> <span class="key band-yellow">yellow</span> <span class="key band-red">red</span> <span class="key failed">failed pulse</span>"#,
    );
    if host_drawn {
        out.push_str(
            r#" <span class="key host-ring">host busy enough to explain slowness</span> <span class="key others">other processes' CPU</span> <span class="key engine-cpu">engine CPU</span> <span class="key host-threshold">others' share that explains slowness</span>"#,
        );
    }
    out.push_str("</p></div>");
    if let Some(e) = &r.last_error {
        let _ = write!(
            out,
            r#"<p class="last-error" data-field="last-error"><strong>Last error</strong> {}</p>"#,
            escape(e)
        );
    }
    if let Some(why) = &r.restart_decision {
        let _ = write!(
            out,
            r#"<p class="restart-decision" data-field="restart-decision"><strong>Restart decision</strong> {}</p>"#,
            escape(why)
        );
    }
    restarts(out, r, now_ms);
    out.push_str("</section>");
}

/// What a `HostCause` label means, for people.
fn cause_words(label: &str) -> &'static str {
    let Some(cause) = HostCause::ALL.iter().copied().find(|c| c.as_str() == label) else {
        return "the host explains it";
    };
    match cause {
        HostCause::OtherProcessesCpu => "other processes kept the CPUs busy",
        HostCause::EngineWaitedForCpu => "the engine waited for CPUs other processes held",
        HostCause::Memory => "tasks stalled on memory, or memory is short",
        HostCause::Io => "tasks stalled on IO",
        HostCause::Thermal => "the CPU runs slower to keep cool",
        HostCause::SchedulingDelay => "the whole host is slow: the agent itself ran late",
    }
}

/// The host beside one pulse, in words: the figures read and, when the host was busy enough to
/// explain slowness, what would explain it.
fn host_text(h: &PulseHost) -> String {
    match h.cause {
        Some(cause) => format!("{}; busy enough to explain slowness: {} ({cause})", h.summary, cause_words(cause)),
        None => h.summary.clone(),
    }
}

/// The numbers, as a definition list: the part of the page that must read without JavaScript.
fn numbers(out: &mut String, r: &ModelReport, load: &ServingLoad, now_ms: u64) {
    out.push_str(r#"<dl class="numbers">"#);
    let mut item = |field: &str, label: &str, value: String| {
        let _ = write!(out, r#"<div><dt>{label}</dt><dd data-field="{field}">{}</dd></div>"#, escape(&value));
    };
    item(
        "last-pulse",
        "Last pulse",
        r.last_pulse.as_ref().map_or_else(|| "none yet".to_owned(), |p| pulse_text(p, now_ms)),
    );
    item("baseline", "Baseline", r.baseline_seconds.map_or_else(|| "not yet".to_owned(), fmt_seconds));
    item(
        "thresholds",
        "Thresholds",
        format!(
            "yellow ≥ {}, red ≥ {}, every {}",
            fmt_seconds(r.yellow_after_seconds),
            fmt_seconds(r.red_after_seconds),
            fmt_seconds(r.pulse_interval_seconds)
        ),
    );
    item("in-flight", "In flight", format!("{} of {}", load.in_flight, load.max_concurrent));
    item("queue-depth", "Queued", load.queue_depth.to_string());
    item("saturated", "Saturated", if r.saturated { "yes" } else { "no" }.to_owned());
    item(
        "host-contended",
        "Host contended",
        r.host_contended.map_or_else(|| "no".to_owned(), |cause| format!("yes: {} ({cause})", cause_words(cause))),
    );
    item(
        "slow-after-restart",
        "Slow after restart",
        if r.slow_after_restart { "yes: restarts for slowness withheld" } else { "no" }.to_owned(),
    );
    item("circuit", "Circuit", load.circuit.to_owned());
    let mut restarts = r.restarts.to_string();
    if let Some(b) = r.backoff_seconds {
        let _ = write!(restarts, ", next start in {}", fmt_seconds(b));
    }
    item("restarts", "Restarts", restarts);
    if r.red_streak > 0 {
        item("red-streak", "Red streak", r.red_streak.to_string());
    }
    let ports = match (r.internal_port, r.serving_port) {
        (Some(i), Some(s)) => format!("serving :{s}, engine :{i}"),
        (None, Some(s)) => format!("serving :{s}, no engine"),
        (Some(i), None) => format!("engine :{i}"),
        (None, None) => "none".to_owned(),
    };
    item("ports", "Ports", ports);
    if let Some(pid) = r.pid {
        item("pid", "Engine pid", pid.to_string());
    }
    if let Some(s) = r.last_start_seconds {
        item("last-start", "Last start took", fmt_seconds(s));
    }
    if let Some(b) = r.memory_bytes {
        item("memory", "Memory estimate", fmt_bytes(b));
    }
    if let Some(d) = &r.download {
        let mut text = fmt_bytes(d.done_bytes);
        if let Some(total) = d.total_bytes {
            let _ = write!(text, " of {}", fmt_bytes(total));
        }
        if let Some(rate) = d.bytes_per_second {
            let _ = write!(text, ", {}/s", fmt_bytes(rate as u64));
        }
        if let Some(eta) = d.eta_seconds {
            let _ = write!(text, ", {} left", fmt_seconds(eta));
        }
        item("download", "Downloaded", text);
    }
    // The host's figures read long: a row of their own.
    let host = r.last_pulse.as_ref().and_then(|p| p.host.as_ref()).map_or_else(|| "not measured".to_owned(), host_text);
    let _ = write!(
        out,
        r#"<div class="wide"><dt>Host at the last pulse</dt><dd data-field="host">{}</dd></div>"#,
        escape(&host)
    );
    out.push_str("</dl>");
}

fn pulse_text(p: &PulseRecord, now_ms: u64) -> String {
    let mut text = fmt_seconds(p.wall_seconds);
    if let Some(c) = p.compute_seconds {
        let _ = write!(text, " (compute {})", fmt_seconds(c));
    }
    if p.error.is_some() {
        text.push_str(", failed");
    }
    let _ = write!(text, ", {}", fmt_age(now_ms, p.at_ms));
    text
}

/// The kept restarts, newest first.
fn restarts(out: &mut String, r: &ModelReport, now_ms: u64) {
    if r.restart_history.is_empty() {
        return;
    }
    let _ =
        write!(out, r#"<h3>Restarts (last {} of {})</h3><ol class="restarts">"#, r.restart_history.len(), r.restarts);
    for rec in r.restart_history.iter().rev() {
        let reason = rec.reason.as_str();
        let _ = write!(
            out,
            r#"<li data-reason="{reason}" data-at-ms="{at}"><span class="age">{age}</span> <code>{reason}</code> <span class="message">{msg}</span></li>"#,
            at = rec.at_ms,
            age = fmt_age(now_ms, rec.at_ms),
            msg = escape(&rec.message),
        );
    }
    out.push_str("</ol>");
}

/// A duration the way people read one: "4.2 ms", "850 ms", "2 s", "12.5 s", "10 min".
fn fmt_seconds(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".to_owned();
    }
    if seconds < 0.01 {
        format!("{} ms", trimmed(seconds * 1000.0, 1))
    } else if seconds < 1.0 {
        format!("{:.0} ms", seconds * 1000.0)
    } else if seconds < 10.0 {
        format!("{} s", trimmed(seconds, 2))
    } else if seconds < 120.0 {
        format!("{} s", trimmed(seconds, 1))
    } else if seconds < 7200.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{} h", trimmed(seconds / 3600.0, 1))
    }
}

/// `value` with at most `decimals` decimals, trailing zeros dropped ("2", "2.5").
fn trimmed(value: f64, decimals: usize) -> String {
    let s = format!("{value:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_owned() } else { s }
}

/// "just now", "12 s ago", "3 min ago", "5 h ago", "2 d ago".
fn fmt_age(now_ms: u64, at_ms: u64) -> String {
    let s = now_ms.saturating_sub(at_ms) / 1000;
    match s {
        0 => "just now".to_owned(),
        1..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86400),
    }
}

/// Bytes in binary units: "512 B", "1.5 KiB", "3.2 GiB".
fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{} {}", trimmed(value, 1), UNITS[unit])
}

#[cfg(test)]
mod tests;
