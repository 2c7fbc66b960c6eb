//! One model's pulse chart: an inline SVG drawn on the server, so that it reads with JavaScript
//! off and fetches nothing. Wall time is a solid line with one point per pulse (coloured by the
//! grade published after it; failed pulses hollow; ringed when the host was busy enough to
//! explain slowness), engine compute time a dashed line, and the yellow and red bands come from
//! the model's own thresholds. Under it, on the same time axis, a strip of the host beside each
//! pulse: the share of all CPU other processes took, and the engine's own.

use std::fmt::Write;

use metalkube_api::Grade;
use metalkube_svg_chart::element::{self, Anchor};
use metalkube_svg_chart::{Frame, Linear, Log, TickStyle, escape};
use metalkube_vitals::attribution::threshold::OTHERS_CPU;

use super::{fmt_age, fmt_seconds, host_text};
use crate::model::report::{ModelReport, PULSE_HISTORY, PulseRecord};

/// The pulse chart, with room for the y labels on the left and the time labels at the bottom.
const FRAME: Frame = Frame { width: 720.0, height: 200.0, left: 58.0, right: 10.0, top: 8.0, bottom: 22.0 };
/// Grid lines and their labels, styled by the page's stylesheet.
const TICKS: TickStyle = TickStyle { line: r#" class="grid""#, label: r#" class="axis""# };

/// The y axis is logarithmic from 1 ms to 30 s. Healthy pulses span 1 ms (the simulator) to
/// about a second (a real model), while a sick engine reaches `redAfter` (5 s) and the
/// incident behind this project saw 30 s: on a linear scale up to 30 s every healthy pulse
/// would sit in the bottom pixel row and a 4x drift (the yellow drift factor) would be
/// invisible. On a log scale a given ratio is the same height anywhere, which is how the
/// drift grading reads pulses too. Pulses outside the range are drawn at its edge (their
/// exact value is in each point's tooltip and data attributes).
const FLOOR_SECONDS: f64 = 0.001;
const CEILING_SECONDS: f64 = 30.0;

/// The host strip under the pulse chart: as wide, with the same margins left and right so that
/// a pulse and the host beside it line up, and no time labels (the chart above has them).
const HOST_FRAME: Frame = Frame { height: 84.0, top: 8.0, bottom: 8.0, ..FRAME };
/// Shares of all CPU time, 0 to 100%, on the host strip.
const SHARE: Linear = Linear { lo: 0.0, hi: 1.0 };

/// Seconds to a y coordinate.
struct YScale(Log);

impl YScale {
    /// The ceiling rises above 30 s only when `redAfter` is so high that its band would not
    /// show.
    fn new(red_after_seconds: f64) -> Self {
        let ceiling =
            if red_after_seconds.is_finite() { CEILING_SECONDS.max(red_after_seconds * 2.0) } else { CEILING_SECONDS };
        Self(Log::new(FLOOR_SECONDS, ceiling))
    }

    fn ceiling(&self) -> f64 {
        self.0.ceiling()
    }

    fn y(&self, seconds: f64) -> f64 {
        FRAME.y(self.0.fraction(seconds))
    }
}

/// Milliseconds since the epoch to an x coordinate: a strip chart ending now. Once the history
/// is full it spans about `PULSE_HISTORY` intervals; until then the pulses gather on the
/// right, so that the picture does not stretch and jump as pulses arrive.
struct XScale {
    end_ms: u64,
    span_ms: u64,
}

impl XScale {
    fn new(pulses: &[&PulseRecord], interval_seconds: f64, now_ms: u64) -> Self {
        let end_ms = pulses.last().map_or(now_ms, |p| p.at_ms.max(now_ms));
        let first_ms = pulses.first().map_or(end_ms, |p| p.at_ms);
        let full_ms = if interval_seconds.is_finite() && interval_seconds > 0.0 {
            (interval_seconds * 1000.0 * PULSE_HISTORY as f64) as u64
        } else {
            0
        };
        let span_ms = (end_ms - first_ms).max(full_ms).max(1);
        Self { end_ms, span_ms }
    }

    fn x(&self, at_ms: u64) -> f64 {
        FRAME.x(1.0 - self.end_ms.saturating_sub(at_ms) as f64 / self.span_ms as f64)
    }
}

/// Appends the chart of `r`'s recent pulses to `out`.
pub(super) fn render(out: &mut String, r: &ModelReport, now_ms: u64) {
    let pulses: Vec<&PulseRecord> = r.pulse_history.iter().collect();
    let ys = YScale::new(r.red_after_seconds);
    let xs = XScale::new(&pulses, r.pulse_interval_seconds, now_ms);
    element::open_svg(out, &FRAME, &format!(r#" class="chart" data-pulses="{}""#, pulses.len()));
    let _ = write!(out, "<title>Pulses of {}: {} recent</title>", escape(&r.key().to_string()), pulses.len());
    bands(out, r, &ys);
    for decade in ys.0.decades() {
        element::y_tick(out, &FRAME, ys.y(decade), TICKS, &fmt_seconds(decade));
    }
    let label_y = FRAME.height - 6.0;
    let window = fmt_seconds(xs.span_ms as f64 / 1000.0);
    element::text(out, TICKS.label, (FRAME.left, label_y), Anchor::Start, &format!("−{window}"));
    element::text(out, TICKS.label, (FRAME.plot_right(), label_y), Anchor::End, "now");
    if pulses.is_empty() {
        let middle = ((FRAME.left + FRAME.plot_right()) / 2.0, (FRAME.top + FRAME.plot_bottom()) / 2.0);
        element::text(out, r#" class="empty""#, middle, Anchor::Middle, "no pulses yet");
        out.push_str("</svg>");
        return;
    }
    let wall: Vec<Option<(f64, f64)>> = pulses.iter().map(|p| Some((xs.x(p.at_ms), ys.y(p.wall_seconds)))).collect();
    let compute: Vec<Option<(f64, f64)>> =
        pulses.iter().map(|p| p.compute_seconds.map(|c| (xs.x(p.at_ms), ys.y(c)))).collect();
    element::line(out, r#" class="compute""#, &compute);
    element::line(out, r#" class="wall""#, &wall);
    for (p, point) in pulses.iter().zip(&compute) {
        if let Some(at) = point {
            element::open_circle(out, r#" class="compute-point""#, *at, 1.8);
            element::close(out, "circle", None);
        }
        point_of(out, p, &xs, &ys, now_ms);
    }
    out.push_str("</svg>");
}

/// The yellow band from `yellowAfter` to `redAfter`, the red one above, each with its label on
/// the left, where a young history leaves room (pulses gather on the right).
fn bands(out: &mut String, r: &ModelReport, ys: &YScale) {
    let (yellow, red) = (r.yellow_after_seconds, r.red_after_seconds);
    let label_x = FRAME.left + 4.0;
    let top = ys.y(ys.ceiling());
    if red > 0.0 {
        element::band(out, &FRAME, (top, ys.y(red)), r#" class="band red""#, None);
        let label = format!("red ≥ {}", fmt_seconds(red));
        element::text(out, r#" class="band-label red""#, (label_x, top + 12.0), Anchor::Start, &label);
    }
    if yellow > 0.0 && (red <= 0.0 || yellow < red) {
        let y = ys.y(yellow);
        let upper = if red > 0.0 { ys.y(red) } else { top };
        // Inside the band when the text fits, else just under its lower edge.
        let label_y = if y - upper >= 13.0 { y - 3.0 } else { y + 12.0 };
        element::band(out, &FRAME, (upper, y), r#" class="band yellow""#, None);
        let label = format!("yellow ≥ {}", fmt_seconds(yellow));
        element::text(out, r#" class="band-label yellow""#, (label_x, label_y), Anchor::Start, &label);
    }
}

/// One pulse: its wall time as a point whose tooltip and data attributes hold the numbers.
fn point_of(out: &mut String, p: &PulseRecord, xs: &XScale, ys: &YScale, now_ms: u64) {
    let grade = p.grade.map_or("none", grade_class);
    let failed = if p.error.is_some() { " failed" } else { "" };
    let cause = p.host.as_ref().and_then(|h| h.cause);
    let host = if cause.is_some() { " host" } else { "" };
    let class = format!(r#" class="pulse grade-{grade}{failed}{host}""#);
    element::open_circle(out, &class, (xs.x(p.at_ms), ys.y(p.wall_seconds)), 3.2);
    let _ = write!(out, r#" data-at-ms="{}" data-wall-seconds="{}""#, p.at_ms, p.wall_seconds);
    if let Some(c) = p.compute_seconds {
        let _ = write!(out, r#" data-compute-seconds="{c}""#);
    }
    if let Some(g) = p.grade {
        let _ = write!(out, r#" data-grade="{}""#, g.as_str());
    }
    if let Some(c) = cause {
        let _ = write!(out, r#" data-host-cause="{}""#, escape(c));
    }
    let mut tip = format!("{}: wall {}", fmt_age(now_ms, p.at_ms), fmt_seconds(p.wall_seconds));
    if let Some(c) = p.compute_seconds {
        let _ = write!(tip, ", compute {}", fmt_seconds(c));
    }
    if let Some(g) = p.grade {
        let _ = write!(tip, ", {}", g.as_str());
    }
    if let Some(e) = &p.error {
        let _ = write!(tip, ", failed: {e}");
    }
    if let Some(h) = &p.host {
        let _ = write!(tip, "; host: {}", host_text(h));
    }
    element::close(out, "circle", Some(&tip));
}

/// A share (0..1) to a y coordinate of the host strip.
fn share_y(share: f64) -> f64 {
    HOST_FRAME.y(SHARE.fraction(share))
}

/// Appends the host strip of `r`'s recent pulses to `out`, on the pulse chart's time axis: other
/// processes' share of all CPU time as a solid line with a point per pulse (its tooltip holds
/// every figure read), the engine's own share dashed, the share at which other processes alone
/// explain a slow pulse as a dashed rule, and a shaded column at each pulse where the host was
/// busy enough to explain slowness (whatever the cause: CPU, memory, IO, heat, scheduling).
/// Draws nothing and returns false when no pulse has host figures (none yet, or the host could
/// not be read).
pub(super) fn render_host(out: &mut String, r: &ModelReport, now_ms: u64) -> bool {
    let pulses: Vec<&PulseRecord> = r.pulse_history.iter().collect();
    let measured = pulses.iter().filter(|p| p.host.is_some()).count();
    if measured == 0 {
        return false;
    }
    let xs = XScale::new(&pulses, r.pulse_interval_seconds, now_ms);
    element::open_svg(out, &HOST_FRAME, &format!(r#" class="chart host-chart" data-host-pulses="{measured}""#));
    let _ = write!(
        out,
        "<title>The host beside the pulses of {}: share of all CPU time other processes and the engine used</title>",
        escape(&r.key().to_string())
    );
    for share in SHARE.even_ticks(2) {
        element::y_tick(out, &HOST_FRAME, share_y(share), TICKS, &format!("{:.0}%", share * 100.0));
    }
    for p in &pulses {
        let Some(h) = &p.host else { continue };
        let Some(cause) = h.cause else { continue };
        let attrs =
            format!(r#" class="explained-column" data-at-ms="{}" data-host-cause="{}""#, p.at_ms, escape(cause));
        let tip = format!("{}: {}", fmt_age(now_ms, p.at_ms), host_text(h));
        element::column(out, &HOST_FRAME, (xs.x(p.at_ms) - 3.0, 6.0), &attrs, Some(&tip));
    }
    let threshold = share_y(OTHERS_CPU);
    element::hline(out, &HOST_FRAME, threshold, r#" class="host-threshold""#);
    let label = format!("others ≥ {:.0}% explain slowness", OTHERS_CPU * 100.0);
    let at = (HOST_FRAME.left + 4.0, threshold - 3.0);
    element::text(out, r#" class="band-label host-threshold""#, at, Anchor::Start, &label);
    let share_points = |share: fn(&PulseRecord) -> Option<f64>| -> Vec<Option<(f64, f64)>> {
        pulses.iter().map(|p| share(p).filter(|v| v.is_finite()).map(|v| (xs.x(p.at_ms), share_y(v)))).collect()
    };
    let others = share_points(|p| p.host.as_ref().and_then(|h| h.figures.others_cpu));
    let engine = share_points(|p| p.host.as_ref().and_then(|h| h.figures.engine_cpu));
    element::line(out, r#" class="engine-cpu""#, &engine);
    element::line(out, r#" class="others""#, &others);
    for (p, point) in pulses.iter().zip(&others) {
        let (Some(at), Some(h)) = (point, &p.host) else { continue };
        let cause = h.cause.map_or("", |_| " explained");
        element::open_circle(out, &format!(r#" class="others-point{cause}""#), *at, 2.4);
        let _ =
            write!(out, r#" data-at-ms="{}" data-others-cpu="{}""#, p.at_ms, h.figures.others_cpu.unwrap_or_default());
        element::close(out, "circle", Some(&format!("{}: {}", fmt_age(now_ms, p.at_ms), host_text(h))));
    }
    out.push_str("</svg>");
    true
}

pub(super) fn grade_class(g: Grade) -> &'static str {
    match g {
        Grade::Green => "green",
        Grade::Yellow => "yellow",
        Grade::Red => "red",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::report::PulseHost;
    use metalkube_vitals::attribution::HostCause;
    use metalkube_vitals::host::pressure::HostPressure;

    fn pulse(at_ms: u64, wall: f64, compute: Option<f64>, grade: Option<Grade>, error: Option<&str>) -> PulseRecord {
        PulseRecord {
            at_ms,
            wall_seconds: wall,
            compute_seconds: compute,
            grade,
            error: error.map(str::to_owned),
            host: None,
        }
    }

    #[test]
    fn the_log_scale_keeps_a_ratio_the_same_height_and_clamps_outside_values() {
        let s = YScale::new(5.0);
        let (a, b) = (s.y(0.002) - s.y(0.008), s.y(0.5) - s.y(2.0));
        assert!((a - b).abs() < 1e-9, "4x is the same height at 2 ms and at 500 ms: {a} vs {b}");
        assert_eq!(s.y(0.0), s.y(FLOOR_SECONDS), "0 s sits on the floor");
        assert_eq!(s.y(f64::NAN), s.y(FLOOR_SECONDS));
        assert_eq!(s.y(1000.0), FRAME.top, "over the ceiling sits at the top");
        assert!(s.y(10.0) < s.y(1.0), "slower is higher");
    }

    #[test]
    fn a_high_red_threshold_lifts_the_ceiling_so_its_band_shows() {
        assert_eq!(YScale::new(5.0).ceiling().round(), 30.0);
        let s = YScale::new(40.0);
        assert!((s.ceiling() - 80.0).abs() < 1e-6);
        assert!(s.y(40.0) > FRAME.top + 10.0, "the red band has height");
    }

    #[test]
    fn time_runs_left_to_right_and_a_young_history_gathers_on_the_right() {
        let a = pulse(10_000, 0.01, None, None, None);
        let b = pulse(11_000, 0.01, None, None, None);
        let xs = XScale::new(&[&a, &b], 1.0, 11_000);
        assert_eq!(xs.span_ms, 120_000, "the window of a full history");
        assert!((xs.x(11_000) - FRAME.plot_right()).abs() < 1e-9, "the last pulse is now, at the right edge");
        assert!(xs.x(10_000) < xs.x(11_000) && xs.x(10_000) > FRAME.width / 2.0);
        let empty = XScale::new(&[], 0.0, 5);
        assert_eq!(empty.x(5), FRAME.plot_right(), "no interval, no pulses: still a valid scale");
    }

    #[test]
    fn each_pulse_is_one_point_with_its_numbers_and_failed_ones_are_marked() {
        let mut r = ModelReport::new("ns", "m");
        r.pulse_interval_seconds = 1.0;
        r.yellow_after_seconds = 2.0;
        r.red_after_seconds = 5.0;
        r.push_pulse(pulse(1_000, 0.012, Some(0.008), Some(Grade::Green), None));
        r.push_pulse(pulse(2_000, 6.5, None, Some(Grade::Red), Some("timed out <after> 6s")));
        r.push_pulse(pulse(3_000, 0.015, Some(0.01), Some(Grade::Green), None));
        let mut out = String::new();
        render(&mut out, &r, 3_000);
        assert_eq!(out.matches(r#"<circle class="pulse "#).count(), 3, "{out}");
        assert_eq!(out.matches("class=\"pulse grade-red failed\"").count(), 1, "{out}");
        assert!(out.contains(r#"data-wall-seconds="0.012" data-compute-seconds="0.008" data-grade="Green""#), "{out}");
        assert!(out.contains("timed out &lt;after&gt; 6s"), "error text is escaped: {out}");
        assert!(!out.contains("<after>"));
        assert_eq!(out.matches("compute-point").count(), 2);
        let compute_path = out.split(r#"<path class="compute" d=""#).nth(1).unwrap_or_default();
        let compute_path = compute_path.split('"').next().unwrap_or_default();
        assert_eq!(
            compute_path.matches('M').count(),
            2,
            "the compute line breaks where compute is missing: {compute_path}"
        );
        assert!(out.contains(r#"class="band yellow""#) && out.contains(r#"class="band red""#));
        assert!(out.contains("yellow ≥ 2 s") && out.contains("red ≥ 5 s"), "{out}");
        assert!(out.contains(r#"data-pulses="3""#));
    }

    fn host(others: Option<f64>, engine: Option<f64>, cause: Option<HostCause>) -> PulseHost {
        let p =
            HostPressure { others_cpu: others, engine_cpu: engine, load_per_cpu: Some(1.5), ..HostPressure::default() };
        PulseHost::new(&p, cause)
    }

    #[test]
    fn the_host_strip_shares_the_time_axis_and_marks_what_the_host_explains() {
        let mut r = ModelReport::new("ns", "m");
        r.pulse_interval_seconds = 1.0;
        r.yellow_after_seconds = 2.0;
        r.red_after_seconds = 5.0;
        let with_host = |at, wall, grade, h| PulseRecord { host: Some(h), ..pulse(at, wall, None, grade, None) };
        r.push_pulse(with_host(1_000, 0.02, Some(Grade::Green), host(Some(0.1), Some(0.3), None)));
        let busy = HostCause::OtherProcessesCpu;
        r.push_pulse(with_host(2_000, 6.0, Some(Grade::Red), host(Some(0.75), Some(0.2), Some(busy))));
        // Memory explains this one: no CPU figures, but its column is drawn.
        r.push_pulse(with_host(3_000, 3.0, Some(Grade::Yellow), host(None, None, Some(HostCause::Memory))));
        r.push_pulse(pulse(4_000, 0.02, None, Some(Grade::Green), None));
        let mut out = String::new();
        assert!(render_host(&mut out, &r, 4_000), "pulses with host figures draw the strip");
        assert!(out.starts_with(r#"<svg class="chart host-chart""#) && out.ends_with("</svg>"), "{out}");
        assert!(out.contains(r#"data-host-pulses="3""#), "{out}");

        // The same x as the pulse it stands beside.
        let kept: Vec<&PulseRecord> = r.pulse_history.iter().collect();
        let xs = XScale::new(&kept, 1.0, 4_000);
        let point = format!(
            r#"<circle class="others-point explained" cx="{:.1}" cy="{:.1}" r="2.4" data-at-ms="2000" data-others-cpu="0.75">"#,
            xs.x(2_000),
            share_y(0.75)
        );
        assert!(out.contains(&point), "{point} in {out}");
        let mut chart = String::new();
        render(&mut chart, &r, 4_000);
        assert!(chart.contains(&format!(r#"cx="{:.1}""#, xs.x(2_000))), "{chart}");
        assert_eq!(out.matches(r#"<circle class="others-point"#).count(), 2, "a point per pulse with a CPU figure");
        assert_eq!(out.matches(r#"<circle class="others-point explained""#).count(), 1);

        // A column where the host was busy enough to explain slowness, whatever the cause.
        assert_eq!(out.matches(r#"<rect class="explained-column""#).count(), 2, "{out}");
        assert!(out.contains(r#"data-at-ms="3000" data-host-cause="memory""#), "{out}");
        assert!(out.contains("tasks stalled on memory"), "the cause in words: {out}");
        assert!(out.contains("other processes 75% of CPU, engine 20%, load 1.50/CPU"), "the figures: {out}");

        // The others' line is unbroken over the pulses that have the figure, and so is the engine's.
        let others = out.split(r#"<path class="others" d=""#).nth(1).unwrap_or_default();
        assert_eq!(others.split('"').next().unwrap_or_default().matches('M').count(), 1, "{out}");
        assert!(out.contains(r#"<path class="engine-cpu" d="M"#), "{out}");
        let threshold = format!(r#"<line class="host-threshold" x1="{}" y1="{:.1}""#, FRAME.left, share_y(OTHERS_CPU));
        assert!(out.contains(&threshold) && out.contains("others ≥ 50% explain slowness"), "{out}");
        assert!(out.contains(">100%</text>") && out.contains(">0%</text>"));

        // In the pulse chart, the pulses the host could explain are ringed and name the cause.
        assert_eq!(chart.matches(r#"<circle class="pulse grade-red host""#).count(), 1, "{chart}");
        assert!(chart.contains(r#"data-grade="Red" data-host-cause="other_processes_cpu""#), "{chart}");
        assert!(chart.contains("; host: other processes 75% of CPU"), "the tooltip: {chart}");
        assert_eq!(chart.matches(" host\"").count(), 2, "{chart}");
    }

    #[test]
    fn no_host_figures_draw_no_strip_and_shares_stay_on_it() {
        let mut r = ModelReport::new("ns", "m");
        r.push_pulse(pulse(1_000, 0.02, None, Some(Grade::Green), None));
        let mut out = String::new();
        assert!(!render_host(&mut out, &r, 1_000));
        assert!(out.is_empty(), "{out}");
        assert_eq!(share_y(1.5), share_y(1.0), "over 100% sits at the top");
        assert_eq!(share_y(-0.1), share_y(0.0));
        assert_eq!(share_y(f64::NAN), share_y(0.0));
        assert!(share_y(0.8) < share_y(0.2), "busier is higher");
        // The summary is text from the agent, yet escaped like any other.
        let mut odd = host(Some(0.9), None, Some(HostCause::OtherProcessesCpu));
        odd.summary = "<b>busy</b>".to_owned();
        r.push_pulse(PulseRecord { host: Some(odd), ..pulse(2_000, 0.02, None, None, None) });
        assert!(render_host(&mut out, &r, 2_000));
        assert!(out.contains("&lt;b&gt;busy&lt;/b&gt;") && !out.contains("<b>"), "{out}");
    }

    #[test]
    fn no_pulses_and_no_thresholds_draw_an_empty_chart() {
        let r = ModelReport::new("ns", "m");
        let mut out = String::new();
        render(&mut out, &r, 0);
        assert!(out.contains("no pulses yet") && out.ends_with("</svg>"), "{out}");
        assert!(!out.contains("class=\"band"), "no thresholds, no bands");
        assert!(!out.contains("class=\"pulse"));
    }
}
