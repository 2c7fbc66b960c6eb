//! Inline SVG charts for the HTML report: no script, no external file, every text escaped.

use std::fmt::Write;

use metalkube_api::Grade;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 22.0;
const BOTTOM: f64 = 28.0;

pub use crate::observe::html_text::escape;

/// One line: (x, y) points; a None y breaks the line.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, Option<f64>)>,
}

/// A shaded band of y values (the yellow and red grades of the pulse).
pub struct Band {
    pub from: f64,
    pub to: f64,
    pub color: &'static str,
    pub label: String,
}

/// A shaded stretch of the run (x from..to, seconds): the intervals the host explains.
pub struct Span {
    pub from: f64,
    pub to: f64,
    pub color: &'static str,
    /// Shown on hover: what the stretch is.
    pub label: String,
}

pub struct Chart {
    /// Unit of the y axis, shown with the tick labels ("s", "ms", "MiB", …).
    pub unit: &'static str,
    /// The x axis runs from 0 to this many seconds of the run.
    pub x_max: f64,
    pub series: Vec<Series>,
    pub bands: Vec<Band>,
    pub spans: Vec<Span>,
}

/// The smallest 1, 2 or 5 × 10^k at or above `v`: axis tops people can read.
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|c| *c >= v).unwrap_or(10.0 * magnitude)
}

/// A number for an axis label: few digits, no trailing zeros.
pub fn short(v: f64) -> String {
    let text = if v.abs() >= 100.0 || v == v.trunc() { format!("{v:.0}") } else { format!("{v:.2}") };
    if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_owned() } else { text }
}

impl Chart {
    pub fn render(&self) -> String {
        let values = self.series.iter().flat_map(|s| s.points.iter().filter_map(|p| p.1)).filter(|v| v.is_finite());
        let data_max = values.fold(0.0_f64, f64::max);
        // Bands start within view, so the yellow and red lines show even on a healthy run.
        let band_start = self.bands.iter().map(|b| b.from).fold(0.0_f64, f64::max);
        let y_max = nice_ceiling(data_max.max(band_start * 1.2));
        let x_max = if self.x_max > 0.0 { self.x_max } else { 1.0 };
        let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let x = |v: f64| LEFT + (v / x_max).clamp(0.0, 1.0) * plot_w;
        let y = |v: f64| TOP + plot_h - (v / y_max).clamp(0.0, 1.0) * plot_h;
        let mut svg = format!(
            r#"<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" font-family="sans-serif" font-size="11">"#
        );
        for band in &self.bands {
            let (top, bottom) = (y(band.to.min(y_max)), y(band.from));
            let _ = write!(
                svg,
                r#"<rect x="{LEFT}" y="{top:.1}" width="{plot_w}" height="{:.1}" fill="{}" opacity="0.18"><title>{}</title></rect>"#,
                (bottom - top).max(0.0),
                band.color,
                escape(&band.label)
            );
        }
        for span in &self.spans {
            let (left, right) = (x(span.from), x(span.to));
            let _ = write!(
                svg,
                r#"<rect x="{left:.1}" y="{TOP}" width="{:.1}" height="{plot_h}" fill="{}" opacity="0.22"><title>{}</title></rect>"#,
                (right - left).max(1.0),
                span.color,
                escape(&span.label)
            );
        }
        for i in 0..=4 {
            let v = y_max * f64::from(i) / 4.0;
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" x2="{:.1}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{} {}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                y(v) + 4.0,
                short(v),
                escape(self.unit),
                py = y(v)
            );
        }
        let x_step = nice_ceiling(x_max / 6.0);
        let mut t = 0.0;
        while t <= x_max + 1e-9 {
            let _ =
                write!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}s</text>"#, x(t), HEIGHT - 8.0, short(t));
            t += x_step;
        }
        let mut legend_x = LEFT;
        for s in &self.series {
            for run in runs(&s.points) {
                if let [(px, py)] = run.as_slice() {
                    let _ =
                        write!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"#, x(*px), y(*py), s.color);
                    continue;
                }
                let coords: Vec<String> = run.iter().map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py))).collect();
                let _ = write!(
                    svg,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.8" stroke-linejoin="round"/>"#,
                    coords.join(" "),
                    s.color
                );
            }
            let _ = write!(
                svg,
                r#"<rect x="{legend_x:.1}" y="6" width="10" height="10" fill="{}"/><text x="{:.1}" y="15">{}</text>"#,
                s.color,
                legend_x + 14.0,
                escape(&s.name)
            );
            legend_x += 24.0 + 6.5 * s.name.len() as f64;
        }
        svg.push_str("</svg>");
        svg
    }
}

/// The stretches of consecutive finite points.
fn runs(points: &[(f64, Option<f64>)]) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for (px, py) in points {
        match py.filter(|v| v.is_finite()) {
            Some(v) => current.push((*px, v)),
            None if !current.is_empty() => runs.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

fn grade_color(grade: Option<Grade>) -> &'static str {
    match grade {
        Some(Grade::Green) => "#2e9d4f",
        Some(Grade::Yellow) => "#e0b000",
        Some(Grade::Red) => "#d33c2c",
        None => "#cccccc",
    }
}

/// The colour of the host's row and of the stretches it explains: apart from every grade.
pub const HOST_COLOR: &str = "#7b4fb8";
/// A host that was read and explains nothing.
pub const HOST_QUIET_COLOR: &str = "#e4ddf0";

/// One interval's cell of a strip row.
pub struct Cell {
    pub color: &'static str,
    /// Shown on hover.
    pub title: String,
}

impl Cell {
    pub fn grade(grade: Option<Grade>) -> Self {
        let verdict = grade.map_or("no verdict", |g| match g {
            Grade::Green => "green",
            Grade::Yellow => "yellow",
            Grade::Red => "red",
        });
        Cell { color: grade_color(grade), title: verdict.to_owned() }
    }
}

/// One row per check, one cell per interval (grey: no verdict), coloured by what it says.
pub fn strip(rows: &[(&str, Vec<Cell>)]) -> String {
    let row_h = 22.0;
    let height = TOP + row_h * rows.len() as f64 + 6.0;
    let cells = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(1);
    let cell_w = (WIDTH - LEFT * 2.0 - RIGHT) / cells as f64;
    let mut svg = format!(
        r#"<svg viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" font-family="sans-serif" font-size="11">"#
    );
    for (r, (name, cells_of)) in rows.iter().enumerate() {
        let top = TOP + row_h * r as f64;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT * 2.0 - 6.0,
            top + 14.0,
            escape(name)
        );
        for (i, cell) in cells_of.iter().enumerate() {
            let _ = write!(
                svg,
                r#"<rect x="{:.2}" y="{top:.1}" width="{:.2}" height="{}" fill="{}"><title>interval {i}: {}</title></rect>"#,
                LEFT * 2.0 + cell_w * i as f64,
                cell_w.max(0.5),
                row_h - 4.0,
                cell.color,
                escape(&cell.title)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_tops_and_labels_are_readable() {
        assert_eq!(
            [nice_ceiling(0.7), nice_ceiling(3.1), nice_ceiling(30.0), nice_ceiling(0.0)],
            [1.0, 5.0, 50.0, 1.0]
        );
        assert_eq!([short(0.25), short(2.0), short(150.4), short(0.5)], ["0.25", "2", "150", "0.5"]);
    }

    #[test]
    fn lines_break_at_missing_points_and_names_are_escaped() {
        let chart = Chart {
            unit: "s",
            x_max: 10.0,
            series: vec![Series {
                name: "<b>wall</b>".into(),
                color: "#000",
                points: vec![(1.0, Some(1.0)), (2.0, Some(2.0)), (3.0, None), (4.0, Some(f64::NAN)), (5.0, Some(1.0))],
            }],
            bands: vec![Band { from: 2.0, to: f64::INFINITY, color: "#f00", label: "red".into() }],
            spans: vec![Span { from: 3.0, to: 4.0, color: HOST_COLOR, label: "host: <memory>".into() }],
        };
        let svg = chart.render();
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert_eq!(svg.matches("<circle").count(), 1, "a lone point is a dot");
        assert!(svg.contains("&lt;b&gt;wall&lt;/b&gt;") && !svg.contains("<b>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert!(svg.contains("<title>host: &lt;memory&gt;</title>"), "a span says what it marks");
    }
}
