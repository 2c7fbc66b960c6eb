//! `report.html`: one file a person can open anywhere, offline. Inline CSS and SVG only; no
//! script, no `src` or `href`, nothing fetched. Every text that comes from the run (URLs, error
//! messages from the engine) is escaped.

use std::fmt::Write;

use metalkube_api::Grade;
use metalkube_svg_chart::{escape, short};

use super::analysis::ThresholdSource;
use super::record::Interval;
use super::report::Report;
use super::svg::{Band, Cell, Chart, HOST_COLOR, HOST_QUIET_COLOR, Series, Span, strip};

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:800px;margin:2em auto;padding:0 1em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}\
th{background:#f4f4f4}td.l,th.l{text-align:left}pre{background:#f6f6f6;padding:.8em}\
.note{color:#555;font-size:.9em}.red{color:#b52a1c;font-weight:bold}.green{color:#2e7d32;font-weight:bold}\
.host{color:#5d3a94;font-weight:bold}tr.host td{background:#f1ebf8}";

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
}

fn grade_word(g: Option<Grade>) -> &'static str {
    match g {
        Some(Grade::Green) => "green",
        Some(Grade::Yellow) => "yellow",
        Some(Grade::Red) => "red",
        None => "–",
    }
}

fn series(name: &str, color: &'static str, intervals: &[Interval], pick: impl Fn(&Interval) -> Option<f64>) -> Series {
    Series { name: name.into(), color, points: intervals.iter().map(|i| (i.end_seconds, pick(i))).collect() }
}

/// What a `HostCause` label means, for people.
fn cause_text(cause: &str) -> &'static str {
    match cause {
        "other_processes_cpu" => "other processes kept the CPUs busy",
        "engine_waited_for_cpu" => "the engine waited for CPUs other processes held",
        "memory" => "memory was short (stalls, or the kernel's pressure level)",
        "io" => "tasks stalled on IO",
        "thermal" => "the CPU ran slower to keep cool",
        "scheduling_delay" => "the whole host was scheduled late (calibrate's own timers woke late)",
        _ => "the host was busy",
    }
}

/// The stretches of the run the host explains, shaded on the charts.
fn host_spans(intervals: &[Interval]) -> Vec<Span> {
    intervals
        .iter()
        .filter_map(|i| {
            let cause = i.host_explained_by()?;
            Some(Span {
                from: i.start_seconds,
                to: i.end_seconds,
                color: HOST_COLOR,
                label: format!("host: {cause} ({})", cause_text(cause)),
            })
        })
        .collect()
}

fn pct(v: Option<f64>) -> Option<f64> {
    v.map(|v| v * 100.0)
}

pub fn render(r: &Report) -> String {
    let mut h = String::new();
    let s = &r.settings;
    let iv = &r.intervals;
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>metalkube calibrate report</title>\
         <style>{STYLE}</style></head><body><h1>Pulse calibration</h1><p>{} · shape <b>{}</b> · {} s in {} s intervals · \
         {} clients · seed {} · serving port {} · engine {}{}</p>",
        escape(&r.tool),
        escape(&format!("{:?}", s.shape).to_lowercase()),
        short(s.duration_seconds),
        short(s.interval_seconds),
        s.concurrency,
        s.seed,
        escape(&r.target.serving_url),
        escape(&r.target.engine_url),
        r.target.engine_pid.map_or_else(String::new, |p| format!(" (pid {p})")),
    );
    suggestion(&mut h, r);
    incident(&mut h, r);
    host_pressure(&mut h, r);
    charts(&mut h, r);
    correlations(&mut h, r);
    interval_table(&mut h, iv);
    h.push_str("</body></html>\n");
    h
}

fn suggestion(h: &mut String, r: &Report) {
    h.push_str("<h2>Suggested pulse thresholds</h2>");
    let Some(sg) = &r.suggested else {
        let _ = write!(
            h,
            "<p class=\"red\">No suggestion: {}</p>",
            escape(r.no_suggestion.as_deref().unwrap_or("no healthy pulses"))
        );
        return;
    };
    // Factors of a drift suggested off would only mislead.
    let drift = |value: String| if sg.drift.enabled { value } else { "–".to_owned() };
    let healthy = r
        .settings
        .healthy_for_seconds
        .map_or_else(|| "the whole run".to_owned(), |s| format!("the first {} s", short(s)));
    let _ = write!(
        h,
        "<table><tr><th class=\"l\">yellowAfter</th><td>{:.2} s</td></tr><tr><th class=\"l\">redAfter</th><td>{:.2} s</td></tr>\
         <tr><th class=\"l\">timeout</th><td>{:.2} s</td></tr>\
         <tr><th class=\"l\">drift</th><td>{}</td></tr>\
         <tr><th class=\"l\">drift.yellowFactor</th><td>{}</td></tr><tr><th class=\"l\">drift.redFactor</th><td>{}</td></tr>\
         <tr><th class=\"l\">drift.floor</th><td>{}</td></tr></table>\
         <p>From {} healthy pulses ({}): p50 {:.3} s, p99 {:.3} s, slowest {:.3} s.</p><p{}>Baseline: {}.</p>\
         <p class=\"note\">Rule: {}</p><pre>{}</pre>",
        sg.yellow_after_seconds,
        sg.red_after_seconds,
        sg.timeout_seconds,
        if sg.drift.enabled { "on" } else { "off (healthy pulses spread over more than 4x)" },
        drift(sg.drift.yellow_factor.to_string()),
        drift(sg.drift.red_factor.to_string()),
        drift(format!("{:.2} s", sg.drift.floor_seconds)),
        sg.basis.pulses,
        escape(&healthy),
        sg.basis.p50_seconds,
        sg.basis.p99_seconds,
        sg.basis.max_seconds,
        if r.baseline.host_explained_intervals > 0 { " class=\"host\"" } else { "" },
        escape(&r.baseline.note),
        escape(&sg.rule),
        escape(r.pulse_spec_yaml.as_deref().unwrap_or_default()),
    );
}

fn incident(h: &mut String, r: &Report) {
    let w = &r.summary.while_pulse_red;
    let _ = write!(
        h,
        "<h2>What each check said, interval by interval</h2><p>The pulse was <span class=\"red\">red</span> in {} of {} \
         intervals. In those, the uptime check said <span class=\"green\">green</span> in {} and the task-counter check in {}; \
         the <span class=\"host\">host</span> explains {} of them.</p>",
        w.intervals, r.summary.intervals, w.uptime_green, w.task_counter_green, w.host_explained
    );
    let grades = |pick: fn(&Interval) -> Option<Grade>| r.intervals.iter().map(|i| Cell::grade(pick(i))).collect();
    let host = r
        .intervals
        .iter()
        .map(|i| match (&i.host, i.host_explained_by()) {
            (_, Some(cause)) => Cell { color: HOST_COLOR, title: format!("host explains: {}", cause_text(cause)) },
            (Some(_), None) => Cell { color: HOST_QUIET_COLOR, title: "host explains nothing".into() },
            (None, _) => Cell::grade(None),
        })
        .collect();
    let rows = [
        ("pulse", grades(|i| i.verdicts.pulse)),
        ("uptime", grades(|i| i.verdicts.uptime)),
        ("task counter", grades(|i| i.verdicts.task_counter)),
        ("host", host),
    ];
    h.push_str(&strip(&rows));
    let source = match r.graded_with.source {
        ThresholdSource::Suggested => "the suggested thresholds",
        ThresholdSource::Seed => "the seed thresholds (no suggestion was possible)",
    };
    let _ = write!(
        h,
        "<ul class=\"note\"><li>Pulse graded with {source}: yellow from {:.2} s, red from {:.2} s. {}</li><li>{}</li><li>{}</li>\
         <li>Check window: {} s.</li></ul>",
        r.graded_with.yellow_after_seconds,
        r.graded_with.red_after_seconds,
        escape(&r.checks.pulse),
        escape(&r.checks.uptime),
        escape(&r.checks.task_counter),
        short(r.checks.check_window_seconds),
    );
}

fn charts(h: &mut String, r: &Report) {
    let iv = &r.intervals;
    let x_max = r.settings.duration_seconds;
    let g = &r.graded_with;
    let pulse = Chart {
        unit: "s",
        x_max,
        series: vec![
            series("pulse wall (as graded)", "#1f5fbf", iv, |i| i.verdicts.pulse_seconds),
            series("pulse compute", "#8a5cc2", iv, |i| i.pulse.compute_seconds),
        ],
        bands: vec![
            Band { from: g.yellow_after_seconds, to: g.red_after_seconds, color: "#e0b000", label: "yellow".into() },
            Band { from: g.red_after_seconds, to: f64::INFINITY, color: "#d33c2c", label: "red".into() },
        ],
        spans: host_spans(iv),
    };
    let latency = Chart {
        unit: "s",
        x_max,
        series: vec![
            series("p50 latency", "#2e7d32", iv, |i| i.requests.latency_p50_seconds),
            series("p99 latency", "#d33c2c", iv, |i| i.requests.latency_p99_seconds),
            series("p50 time to first token", "#1f5fbf", iv, |i| i.requests.ttft_p50_seconds),
        ],
        bands: vec![],
        spans: host_spans(iv),
    };
    let answers = Chart {
        unit: "",
        x_max,
        series: vec![
            series("answered", "#2e7d32", iv, |i| {
                Some(f64::from(i.requests.completed.saturating_sub(i.requests.errors + i.requests.refused)))
            }),
            series("refused (busy)", "#e0b000", iv, |i| Some(f64::from(i.requests.refused))),
            series("failed", "#d33c2c", iv, |i| Some(f64::from(i.requests.errors))),
        ],
        bands: vec![],
        spans: vec![],
    };
    let decode = Chart {
        unit: "ms",
        x_max,
        series: vec![series("decode ms per token (p50)", "#8a5cc2", iv, |i| i.requests.decode_ms_per_token_p50)],
        bands: vec![],
        spans: host_spans(iv),
    };
    let one = |name: &str, unit: &'static str, pick: fn(&Interval) -> Option<f64>| Chart {
        unit,
        x_max,
        series: vec![series(name, "#555555", iv, pick)],
        bands: vec![],
        spans: vec![],
    };
    let _ = write!(
        h,
        "<h2>Pulse</h2><p class=\"note\">Wall time of the trivial round-trip as the pulse check graded it (a pulse still \
         waiting at an interval's end counts with its wait so far) and the engine's own compute time, against the yellow \
         and red bands.</p>{}\
         <h2>Latency users saw</h2>{}<h2>Requests per interval</h2><p class=\"note\">Answered, refused by the serving \
         port's admission because the model was busy (429, or 503 queue_timeout: the queue doing its job; the client \
         waits the Retry-After it is given, up to {} s, before its next request) and failed.</p>{}\
         <h2>Decode time per token</h2>{}\
         <h2>Indicators the incident tried first</h2><p class=\"note\">Engine uptime, the /slots task counter, resident \
         memory and tokens served, at each interval's end.</p>{}{}{}{}",
        pulse.render(),
        latency.render(),
        super::drive::MAX_BACKOFF.as_secs(),
        answers.render(),
        decode.render(),
        one("engine uptime", "s", |i| i.engine.uptime_seconds).render(),
        one("task counter (largest id_task)", "", |i| i.engine.task_counter.map(|c| c as f64)).render(),
        one("engine RSS", "MiB", |i| i.engine.rss_bytes.map(|b| b as f64 / 1048576.0)).render(),
        one("tokens served", "", |i| i.engine.tokens_served).render(),
    );
}

fn host_pressure(h: &mut String, r: &Report) {
    let hp = &r.host_pressure;
    h.push_str("<h2>Host pressure: the engine or the machine?</h2>");
    if hp.intervals_read == 0 {
        let _ = write!(h, "<p class=\"note\">{}</p>", escape(&hp.note));
        return;
    }
    let causes: Vec<String> = hp.causes.iter().map(|(c, n)| format!("{} in {n}", escape(cause_text(c)))).collect();
    let _ = write!(
        h,
        "<p>Read in {} of {} intervals. The <span class=\"host\">host explains {}</span>{}; they are shaded on the \
         charts and marked in the table.</p><p class=\"note\">{}</p>",
        hp.intervals_read,
        r.summary.intervals,
        hp.intervals_explained,
        if causes.is_empty() { String::new() } else { format!(": {}", causes.join("; ")) },
        escape(&hp.note),
    );
    let iv = &r.intervals;
    let cpu = Chart {
        unit: "%",
        x_max: r.settings.duration_seconds,
        series: vec![
            series("other processes CPU", HOST_COLOR, iv, |i| pct(i.host.as_ref()?.figures.others_cpu)),
            series("engine CPU", "#1f5fbf", iv, |i| pct(i.host.as_ref()?.figures.engine_cpu)),
            series("calibrate CPU", "#888888", iv, |i| pct(i.host.as_ref()?.calibrate_cpu)),
            series("CPU stall", "#e07b00", iv, |i| pct(i.host.as_ref()?.figures.cpu_stall)),
            series("memory stall", "#d33c2c", iv, |i| pct(i.host.as_ref()?.figures.memory_stall)),
            series("IO stall", "#2e7d32", iv, |i| pct(i.host.as_ref()?.figures.io_stall)),
        ],
        bands: vec![],
        spans: host_spans(iv),
    };
    let load = Chart {
        unit: "",
        x_max: r.settings.duration_seconds,
        series: vec![series("load per CPU", "#555555", iv, |i| i.host.as_ref()?.figures.load_per_cpu)],
        bands: vec![],
        spans: host_spans(iv),
    };
    let late = Chart {
        unit: "ms",
        x_max: r.settings.duration_seconds,
        series: vec![series("calibrate timer lateness", "#555555", iv, |i| {
            i.host.as_ref()?.figures.timer_lateness_seconds.map(|s| s * 1000.0)
        })],
        bands: vec![],
        spans: host_spans(iv),
    };
    let _ = write!(
        h,
        "<p class=\"note\">Share of all CPUs' time, and PSI stalls (share of the last 10 s some task waited), per \
         interval.</p>{}<p class=\"note\">1-minute load average over the number of CPUs.</p>{}\
         <p class=\"note\">How late calibrate's own short timers woke, at most, in each interval.</p>{}",
        cpu.render(),
        load.render(),
        late.render()
    );
}

fn correlations(h: &mut String, r: &Report) {
    h.push_str(
        "<h2>How well each indicator tracks the latency users saw</h2><p class=\"note\">Spearman rank correlation with \
         each interval's p99 request latency: ±1 tracks it in rank order, 0 not at all; none when an indicator never \
         changed or too few intervals had both. On a run where latency drifts one way, anything else that drifts \
         with time (memory that grows) correlates too: the verdict rows above say what a check would have done.</p><table><tr><th class=\"l\">indicator</th><th class=\"l\">compared as</th>\
         <th>rho</th><th>intervals</th></tr>",
    );
    for c in &r.indicators {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.indicator),
            escape(&c.reads),
            c.spearman_rho.map_or_else(|| "none".to_owned(), |r| format!("{r:+.2}")),
            c.intervals
        );
    }
    h.push_str("</table>");
}

fn interval_table(h: &mut String, iv: &[Interval]) {
    h.push_str(
        "<h2>Intervals</h2><details><summary>every interval</summary><table><tr><th>end s</th><th>pulse s</th>\
         <th>compute s</th><th>requests</th><th>errors</th><th>refused</th><th>p50 s</th><th>p99 s</th><th>ttft s</th>\
         <th>uptime s</th><th>tasks</th><th>pulse</th><th>uptime</th><th>counter</th><th>others CPU %</th>\
         <th>engine CPU %</th><th>load/CPU</th><th>timers late ms</th><th class=\"l\">host explains</th>\
         <th class=\"l\">note</th></tr>",
    );
    for i in iv {
        let note = i
            .pulse
            .error
            .as_deref()
            .or(i.requests.first_error.as_deref())
            .or(i.requests.first_refusal.as_deref())
            .unwrap_or_default();
        let host = i.host.as_ref();
        let explains = match (host, i.host_explained_by()) {
            (_, Some(cause)) => cause,
            (Some(_), None) => "nothing",
            (None, _) => "not read",
        };
        let _ = write!(
            h,
            "<tr{}><td>{:.1}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"l\"><span title=\"{}\">{}</span></td><td class=\"l\">{}</td></tr>",
            if i.host_explained_by().is_some() { " class=\"host\"" } else { "" },
            i.end_seconds,
            opt(i.verdicts.pulse_seconds, 3),
            if i.pulse.in_flight { " (waiting)" } else { "" },
            opt(i.pulse.compute_seconds, 3),
            i.requests.completed,
            i.requests.errors,
            i.requests.refused,
            opt(i.requests.latency_p50_seconds, 3),
            opt(i.requests.latency_p99_seconds, 3),
            opt(i.requests.ttft_p50_seconds, 3),
            opt(i.engine.uptime_seconds, 0),
            i.engine.task_counter.map_or_else(|| "–".to_owned(), |c| c.to_string()),
            grade_word(i.verdicts.pulse),
            grade_word(i.verdicts.uptime),
            grade_word(i.verdicts.task_counter),
            opt(pct(host.and_then(|h| h.figures.others_cpu)), 0),
            opt(pct(host.and_then(|h| h.figures.engine_cpu)), 0),
            opt(host.and_then(|h| h.figures.load_per_cpu), 2),
            opt(host.and_then(|h| h.figures.timer_lateness_seconds).map(|s| s * 1000.0), 0),
            escape(host.map_or("", |h| h.text.as_str())),
            escape(explains),
            escape(note),
        );
    }
    h.push_str("</table></details>");
}

#[cfg(test)]
mod tests {
    use metalkube_vitals::host_figures::HostFigures;

    use super::*;
    use crate::analysis::{Baseline, HostPressureSummary};
    use crate::analysis::{GradedWith, ThresholdSource};
    use crate::record::{HostCell, PulseCell, RequestCell, Verdicts};
    use crate::report::{Checks, ReportSettings, Summary};
    use crate::sample::EngineReading;
    use crate::shape::Shape;
    use crate::target::Resolved;

    /// Engine answers and URLs are outside input: what they say shows as text, never as markup.
    #[test]
    fn text_from_the_run_is_escaped_and_nothing_is_fetched() {
        let hostile = r#"<img src="http://evil/x.png" onerror="alert(1)">"#;
        let interval = Interval {
            index: 0,
            start_seconds: 0.0,
            end_seconds: 1.0,
            healthy_period: true,
            pulse: PulseCell { error: Some(hostile.into()), ..PulseCell::default() },
            requests: RequestCell { first_error: Some(hostile.into()), ..RequestCell::default() },
            engine: EngineReading::default(),
            host: Some(HostCell {
                figures: HostFigures { others_cpu: Some(0.8), ..HostFigures::default() },
                causes: vec!["other_processes_cpu".into()],
                explained_by: Some("other_processes_cpu".into()),
                text: hostile.into(),
                ..HostCell::default()
            }),
            verdicts: Verdicts { pulse: Some(Grade::Red), ..Verdicts::default() },
        };
        let report = Report {
            tool: "metalkube-agent calibrate test".into(),
            settings: ReportSettings {
                shape: Shape::Chat,
                duration_seconds: 1.0,
                interval_seconds: 1.0,
                concurrency: 1,
                seed: 1,
                healthy_for_seconds: None,
                pulse_timeout_seconds: 1.0,
                request_timeout_seconds: 1.0,
                slot_context_tokens: 256,
            },
            target: Resolved { serving_url: hostile.into(), engine_url: "http://127.0.0.1:1".into(), engine_pid: None },
            summary: Summary::default(),
            baseline: Baseline::default(),
            host_pressure: HostPressureSummary {
                intervals_read: 1,
                intervals_explained: 1,
                causes: [("other_processes_cpu".to_owned(), 1)].into(),
                note: hostile.into(),
            },
            suggested: None,
            no_suggestion: Some(hostile.into()),
            pulse_spec_yaml: None,
            graded_with: GradedWith {
                yellow_after_seconds: 2.0,
                red_after_seconds: 5.0,
                source: ThresholdSource::Seed,
            },
            checks: Checks {
                pulse: "p".into(),
                uptime: "u".into(),
                task_counter: "t".into(),
                check_window_seconds: 1.0,
            },
            indicators: vec![],
            initial_engine: EngineReading::default(),
            intervals: vec![interval],
        };
        let html = render(&report);
        assert!(html.contains("&lt;img src=&quot;http://evil/x.png&quot;"), "shown as text");
        assert!(!html.contains("<img") && !html.contains("src=\"") && !html.contains("href="));
        assert!(html.contains("<svg") && html.starts_with("<!doctype html>") && html.ends_with("</html>\n"));
        assert!(html.contains("the seed thresholds"));
        assert!(html.contains("<tr class=\"host\">"), "the interval the host explains is marked");
        assert!(html.contains("other processes kept the CPUs busy in 1"), "with its cause");
        assert!(html.contains("<title>host: other_processes_cpu"), "and shaded on the charts");
        assert!(html.contains(">80</td>"), "others' CPU share in the table");
    }
}
