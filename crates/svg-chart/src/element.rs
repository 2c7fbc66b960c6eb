//! The SVG elements of a chart, written into a `String`: the root, grid lines with their labels,
//! text, bands and columns, lines broken where a point is missing, and points. Coordinates that
//! are the frame's own edges are written as given (a frame's numbers are whole), computed ones to
//! a tenth of a unit: finer than any screen shows, and short.
//!
//! Writes into a `String` cannot fail, so their `fmt::Result` is dropped.

use std::fmt::Write;

use crate::escape;
use crate::frame::Frame;

/// How a text lines up with its x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// Starts at x (SVG's default: no attribute written).
    Start,
    Middle,
    End,
}

/// How grid lines and their labels look: `attrs` of the line and of the label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickStyle<'a> {
    pub line: &'a str,
    pub label: &'a str,
}

/// Opens the chart: `<svg>` over the whole frame. End it with `</svg>`.
pub fn open_svg(out: &mut String, frame: &Frame, attrs: &str) {
    let _ = write!(out, r#"<svg{attrs} viewBox="0 0 {} {}" role="img">"#, frame.width, frame.height);
}

/// A line across the plot at `y`.
pub fn hline(out: &mut String, frame: &Frame, y: f64, attrs: &str) {
    let _ = write!(out, r#"<line{attrs} x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}"/>"#, frame.left, frame.plot_right());
}

/// A grid line across the plot at `y`, with its label in the left margin, level with it.
pub fn y_tick(out: &mut String, frame: &Frame, y: f64, style: TickStyle, label: &str) {
    hline(out, frame, y, style.line);
    text(out, style.label, (frame.left - 6.0, y + 4.0), Anchor::End, label);
}

/// `content` (escaped) at `at`.
pub fn text(out: &mut String, attrs: &str, (x, y): (f64, f64), anchor: Anchor, content: &str) {
    let anchor = match anchor {
        Anchor::Start => "",
        Anchor::Middle => r#" text-anchor="middle""#,
        Anchor::End => r#" text-anchor="end""#,
    };
    let _ = write!(out, r#"<text{attrs} x="{x:.1}" y="{y:.1}"{anchor}>{}</text>"#, escape(content));
}

/// A band across the plot between two y (`upper` above `lower`: the smaller y), with a
/// tooltip when `title` is given (escaped).
pub fn band(out: &mut String, frame: &Frame, (upper, lower): (f64, f64), attrs: &str, title: Option<&str>) {
    let _ = write!(
        out,
        r#"<rect{attrs} x="{}" y="{upper:.1}" width="{}" height="{:.1}""#,
        frame.left,
        frame.plot_width(),
        (lower - upper).max(0.0)
    );
    close(out, "rect", title);
}

/// A column the plot's full height from `x`, `width` wide, with a tooltip when `title` is given
/// (escaped).
pub fn column(out: &mut String, frame: &Frame, (x, width): (f64, f64), attrs: &str, title: Option<&str>) {
    let _ =
        write!(out, r#"<rect{attrs} x="{x:.1}" y="{}" width="{width:.1}" height="{}""#, frame.top, frame.plot_height());
    close(out, "rect", title);
}

/// One path through the points, lifting the pen at a missing (or not finite) point: a gap in
/// the data shows as a gap in the line. Nothing is written when no point is there.
pub fn line(out: &mut String, attrs: &str, points: &[Option<(f64, f64)>]) {
    let mut d = String::new();
    for run in runs(points) {
        for (i, (x, y)) in run.iter().enumerate() {
            let _ = write!(d, "{}{x:.1} {y:.1} ", if i == 0 { "M" } else { "L" });
        }
    }
    if !d.is_empty() {
        let _ = write!(out, r#"<path{attrs} d="{}"/>"#, d.trim_end());
    }
}

/// The points `line` has no neighbour to join to: a path draws nothing for them, so a chart
/// that wants them seen puts a point there.
pub fn lone_points(points: &[Option<(f64, f64)>]) -> Vec<(f64, f64)> {
    runs(points).into_iter().filter_map(|run| if let [only] = run.as_slice() { Some(*only) } else { None }).collect()
}

/// The stretches of consecutive points with finite coordinates.
fn runs(points: &[Option<(f64, f64)>]) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for point in points {
        match point.filter(|(x, y)| x.is_finite() && y.is_finite()) {
            Some(p) => current.push(p),
            None if !current.is_empty() => runs.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

/// Starts a point: a `<circle>` of radius `r` at `at`. The caller may write more attributes
/// (data for scripts and tests) before it ends it with `close`.
pub fn open_circle(out: &mut String, attrs: &str, (x, y): (f64, f64), r: f64) {
    let _ = write!(out, r#"<circle{attrs} cx="{x:.1}" cy="{y:.1}" r="{r}""#);
}

/// Ends an element whose start tag is still open: empty, or holding `title` (escaped) as its
/// tooltip.
pub fn close(out: &mut String, element: &str, title: Option<&str>) {
    match title {
        Some(t) => {
            let _ = write!(out, "><title>{}</title></{element}>", escape(t));
        }
        None => out.push_str("/>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Frame = Frame { width: 100.0, height: 50.0, left: 10.0, right: 5.0, top: 5.0, bottom: 10.0 };

    #[test]
    fn a_line_breaks_at_missing_points_and_never_writes_nan() {
        let points = [
            Some((1.0, 2.0)),
            Some((2.0, 3.25)),
            None,
            Some((4.0, f64::NAN)),
            Some((5.0, 1.0)),
            None,
            Some((6.0, 1.0)),
        ];
        let mut out = String::new();
        line(&mut out, r#" class="wall""#, &points);
        assert_eq!(out, r#"<path class="wall" d="M1.0 2.0 L2.0 3.2 M5.0 1.0 M6.0 1.0"/>"#);
        assert_eq!(lone_points(&points), [(5.0, 1.0), (6.0, 1.0)]);
        let mut empty = String::new();
        line(&mut empty, "", &[None, Some((f64::INFINITY, 1.0))]);
        assert!(empty.is_empty(), "no point, no path: {empty}");
    }

    #[test]
    fn grid_lines_span_the_plot_and_their_labels_sit_left_of_it() {
        let mut out = String::new();
        let style = TickStyle { line: r#" class="grid""#, label: r#" class="axis""# };
        y_tick(&mut out, &FRAME, 20.0, style, "1 s");
        assert_eq!(
            out,
            r#"<line class="grid" x1="10" y1="20.0" x2="95" y2="20.0"/><text class="axis" x="4.0" y="24.0" text-anchor="end">1 s</text>"#
        );
    }

    #[test]
    fn bands_and_columns_fill_the_plot_and_escape_their_titles() {
        let mut out = String::new();
        band(&mut out, &FRAME, (5.0, 12.5), r#" class="band red""#, None);
        assert_eq!(out, r#"<rect class="band red" x="10" y="5.0" width="85" height="7.5"/>"#);
        out.clear();
        band(&mut out, &FRAME, (12.0, 5.0), "", None);
        assert!(out.contains(r#"height="0.0""#), "upside down is empty, not negative: {out}");
        out.clear();
        column(&mut out, &FRAME, (30.0, 6.0), r#" fill="red""#, Some("host: <memory>"));
        assert_eq!(
            out,
            r#"<rect fill="red" x="30.0" y="5" width="6.0" height="35"><title>host: &lt;memory&gt;</title></rect>"#
        );
    }

    #[test]
    fn points_and_texts_take_their_attributes_and_escape_their_words() {
        let mut out = String::new();
        open_svg(&mut out, &FRAME, r#" class="chart""#);
        open_circle(&mut out, r#" class="pulse""#, (1.25, 2.0), 3.2);
        out.push_str(r#" data-at-ms="7""#);
        close(&mut out, "circle", Some("a <b>"));
        text(&mut out, "", (50.0, 45.0), Anchor::Middle, "5s");
        text(&mut out, "", (10.0, 45.0), Anchor::Start, "<now>");
        assert_eq!(
            out,
            concat!(
                r#"<svg class="chart" viewBox="0 0 100 50" role="img">"#,
                r#"<circle class="pulse" cx="1.2" cy="2.0" r="3.2" data-at-ms="7"><title>a &lt;b&gt;</title></circle>"#,
                r#"<text x="50.0" y="45.0" text-anchor="middle">5s</text><text x="10.0" y="45.0">&lt;now&gt;</text>"#
            )
        );
    }
}
