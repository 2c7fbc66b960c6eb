//! The report's charts (seconds of the run across, one or more series, shaded bands and
//! stretches) and its verdict strip, drawn with `metalkube-svg-chart`'s pieces: inline SVG, no
//! script, no external file, every text escaped.

use std::fmt::Write;

use metalkube_api::Grade;
use metalkube_svg_chart::element::{self, Anchor};
use metalkube_svg_chart::{Frame, Linear, TickStyle, escape, nice_ceiling, short};

/// Every chart of the report: one width, so that their time axes line up down the page.
const FRAME: Frame = Frame { width: 760.0, height: 220.0, left: 64.0, right: 16.0, top: 22.0, bottom: 28.0 };
/// The file carries no stylesheet for its charts: grid lines are drawn grey in place, labels
/// take the chart's font.
const TICKS: TickStyle = TickStyle { line: r##" stroke="#ddd""##, label: "" };

/// The root's attributes: a fixed size (the report's column) and the labels' font.
fn svg_attrs(frame: &Frame) -> String {
    format!(r#" width="{}" height="{}" font-family="sans-serif" font-size="11""#, frame.width, frame.height)
}

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

impl Chart {
    pub fn render(&self) -> String {
        let values = self.series.iter().flat_map(|s| s.points.iter().filter_map(|p| p.1)).filter(|v| v.is_finite());
        let data_max = values.fold(0.0_f64, f64::max);
        // Bands start within view, so the yellow and red lines show even on a healthy run.
        let band_start = self.bands.iter().map(|b| b.from).fold(0.0_f64, f64::max);
        let ys = Linear { lo: 0.0, hi: nice_ceiling(data_max.max(band_start * 1.2)) };
        let xs = Linear { lo: 0.0, hi: if self.x_max > 0.0 { self.x_max } else { 1.0 } };
        let x = |v: f64| FRAME.x(xs.fraction(v));
        let y = |v: f64| FRAME.y(ys.fraction(v));
        let mut svg = String::new();
        element::open_svg(&mut svg, &FRAME, &svg_attrs(&FRAME));
        for band in &self.bands {
            let attrs = format!(r#" fill="{}" opacity="0.18""#, band.color);
            element::band(&mut svg, &FRAME, (y(band.to.min(ys.hi)), y(band.from)), &attrs, Some(&band.label));
        }
        for span in &self.spans {
            let (left, right) = (x(span.from), x(span.to));
            let attrs = format!(r#" fill="{}" opacity="0.22""#, span.color);
            element::column(&mut svg, &FRAME, (left, (right - left).max(1.0)), &attrs, Some(&span.label));
        }
        for v in ys.even_ticks(4) {
            element::y_tick(&mut svg, &FRAME, y(v), TICKS, &format!("{} {}", short(v), self.unit));
        }
        for t in xs.stepped_ticks(nice_ceiling(xs.hi / 6.0)) {
            element::text(&mut svg, "", (x(t), FRAME.height - 8.0), Anchor::Middle, &format!("{}s", short(t)));
        }
        let mut legend_x = FRAME.left;
        for s in &self.series {
            let points: Vec<Option<(f64, f64)>> =
                s.points.iter().map(|(px, py)| py.filter(|v| v.is_finite()).map(|v| (x(*px), y(v)))).collect();
            let stroke = format!(r#" fill="none" stroke="{}" stroke-width="1.8" stroke-linejoin="round""#, s.color);
            element::line(&mut svg, &stroke, &points);
            // A point with no neighbour makes no line: a dot shows it.
            for at in element::lone_points(&points) {
                element::open_circle(&mut svg, &format!(r#" fill="{}""#, s.color), at, 2.5);
                element::close(&mut svg, "circle", None);
            }
            let _ = write!(svg, r#"<rect x="{legend_x:.1}" y="6" width="10" height="10" fill="{}"/>"#, s.color);
            element::text(&mut svg, "", (legend_x + 14.0, 15.0), Anchor::Start, &s.name);
            legend_x += 24.0 + 6.5 * s.name.len() as f64;
        }
        svg.push_str("</svg>");
        svg
    }
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
    // As wide as the charts, the names in a margin twice theirs.
    let frame = Frame { height: FRAME.top + row_h * rows.len() as f64 + 6.0, left: FRAME.left * 2.0, ..FRAME };
    let cells = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(1);
    let cell_w = (frame.width - frame.left - FRAME.right) / cells as f64;
    let mut svg = String::new();
    element::open_svg(&mut svg, &frame, &svg_attrs(&frame));
    for (r, (name, cells_of)) in rows.iter().enumerate() {
        let top = frame.top + row_h * r as f64;
        element::text(&mut svg, "", (frame.left - 6.0, top + 14.0), Anchor::End, name);
        for (i, cell) in cells_of.iter().enumerate() {
            let _ = write!(
                svg,
                r#"<rect x="{:.2}" y="{top:.1}" width="{:.2}" height="{}" fill="{}"><title>interval {i}: {}</title></rect>"#,
                frame.left + cell_w * i as f64,
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
        assert_eq!(svg.matches("<path").count(), 1, "one line, lifted at the gap: {svg}");
        assert_eq!(svg.matches(" M").count() + svg.matches("\"M").count(), 2, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 1, "a lone point is a dot");
        assert!(svg.contains("&lt;b&gt;wall&lt;/b&gt;") && !svg.contains("<b>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert!(svg.contains("<title>host: &lt;memory&gt;</title>"), "a span says what it marks");
    }
}
