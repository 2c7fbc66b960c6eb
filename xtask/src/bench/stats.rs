//! Figures across interleaved rounds: median and range, paired comparisons, and tables a
//! person can read. Rounds interleave the targets (A B C D A B C D …), so round r of two
//! targets saw the same moment of the machine: comparing them round by round cancels most of
//! what a busy neighbour does to both.

use std::collections::BTreeMap;

/// One figure over the rounds: median and range (min–max).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// The finite values of `xs`; None when there are none.
    pub fn of(xs: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = xs.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Spread { median, min: v[0], max: v[n - 1], n })
    }

    /// Whether every round is on one side of zero: only then is the figure distinguishable
    /// from nothing, and only then may it divide another.
    pub fn excludes_zero(&self) -> bool {
        self.min > 0.0 || self.max < 0.0
    }
}

/// `12.3 [11.0–14.2]`, or `12.3` for one round, or `-`.
pub fn cell(s: Option<Spread>, precision: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n == 1 || s.min == s.max => format!("{:.*}", precision, s.median),
        Some(s) => format!("{:.p$} [{:.p$}–{:.p$}]", s.median, s.min, s.max, p = precision),
    }
}

/// Per-round values of one target, `None` where a round did not produce the figure.
pub type Rounds = Vec<Option<f64>>;

pub fn spread(r: &[Option<f64>]) -> Option<Spread> {
    Spread::of(r.iter().flatten().copied())
}

/// Round-by-round `a - b` (both measured in the same round).
pub fn paired_diff(a: &[Option<f64>], b: &[Option<f64>]) -> Rounds {
    a.iter().zip(b).map(|(x, y)| Some((*x)? - (*y)?)).collect()
}

/// `a / b` of the medians, only when it means something: `b` clear of zero in every round and
/// `a` not below zero on its median. Otherwise why not, in words.
pub fn ratio(a: Option<Spread>, b: Option<Spread>) -> String {
    match (a, b) {
        (Some(_), Some(b)) if !b.excludes_zero() => "- (theirs is within noise of 0)".into(),
        (Some(a), Some(_)) if a.median <= 0.0 => "- (ours is 0 or below)".into(),
        (Some(a), Some(b)) => format!("{:.2}x", a.median / b.median),
        _ => "-".into(),
    }
}

/// Which way a goal points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// Ours at most theirs (latency, CPU).
    AtMost,
    /// Ours at least theirs (throughput).
    AtLeast,
}

/// In how many rounds `ours` met the goal against `theirs` of the same round.
pub fn verdict(ours: &[Option<f64>], theirs: &[Option<f64>], goal: Goal) -> String {
    let pairs: Vec<(f64, f64)> = ours.iter().zip(theirs).filter_map(|(a, b)| Some(((*a)?, (*b)?))).collect();
    if pairs.is_empty() {
        return "-".into();
    }
    let met = pairs
        .iter()
        .filter(|(a, b)| match goal {
            Goal::AtMost => a <= b,
            Goal::AtLeast => a >= b,
        })
        .count();
    let word = match met {
        m if m == pairs.len() => "MET",
        0 => "NOT MET",
        m if 2 * m == pairs.len() => "split",
        m if 2 * m > pairs.len() => "mostly met",
        _ => "mostly not met",
    };
    format!("{word} ({met}/{} rounds)", pairs.len())
}

/// A table with a label column and one column per target (figures down, targets across).
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<String>)>,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Self { title: title.into(), columns: columns.iter().map(|c| (*c).to_owned()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, label: impl Into<String>, cells: Vec<String>) {
        self.rows.push((label.into(), cells));
    }

    pub fn render(&self) -> String {
        let label_w = self.rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0).max(6);
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.chars().count()).collect();
        for (_, cells) in &self.rows {
            for (i, c) in cells.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
        let mut out = format!("\n{}\n", self.title);
        let mut header = pad("", label_w);
        for (c, w) in self.columns.iter().zip(&widths) {
            header.push_str("  ");
            header.push_str(&pad(c, *w));
        }
        out.push_str(header.trim_end());
        out.push('\n');
        for (label, cells) in &self.rows {
            let mut line = pad(label, label_w);
            for (c, w) in cells.iter().zip(&widths) {
                line.push_str("  ");
                line.push_str(&pad(c, *w));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// How to read one figure off a round's record, and how many decimals to print.
pub type Figure<'a, T> = (&'a str, usize, &'a dyn Fn(&T) -> Option<f64>);

/// The figure `f` of every round of `target` (none when the target has no rounds).
pub fn rounds<T>(runs: &BTreeMap<&str, Vec<T>>, target: &str, f: &dyn Fn(&T) -> Option<f64>) -> Rounds {
    runs.get(target).map(|v| v.iter().map(f).collect()).unwrap_or_default()
}

/// `f` of `target` minus `f` of `direct`, round by round: what the proxy adds.
pub fn added<T>(runs: &BTreeMap<&str, Vec<T>>, target: &str, f: &dyn Fn(&T) -> Option<f64>) -> Rounds {
    paired_diff(&rounds(runs, target, f), &rounds(runs, "direct", f))
}

impl Table {
    /// One row per figure, a median [min–max] cell per target.
    pub fn figure_rows<T>(&mut self, runs: &BTreeMap<&str, Vec<T>>, targets: &[&str], figures: &[Figure<'_, T>]) {
        for (label, precision, f) in figures {
            self.row(*label, targets.iter().map(|n| cell(spread(&rounds(runs, n, *f)), *precision)).collect());
        }
    }

    /// One row per figure of what each target adds to `direct` (2 decimals; `-` for direct).
    pub fn added_rows<T>(&mut self, runs: &BTreeMap<&str, Vec<T>>, targets: &[&str], figures: &[Figure<'_, T>]) {
        for (label, precision, f) in figures {
            let cells = targets
                .iter()
                .map(|n| if *n == "direct" { "-".into() } else { cell(spread(&added(runs, n, *f)), *precision) });
            self.row(*label, cells.collect());
        }
    }

    /// A goal row: ours, theirs, the round-by-round difference, the ratio of medians and in how
    /// many rounds ours met the goal.
    pub fn goal_row(
        &mut self,
        label: &str,
        ours: &[Option<f64>],
        theirs: &[Option<f64>],
        precision: usize,
        goal: Goal,
    ) {
        let diff = paired_diff(ours, theirs);
        self.row(
            label,
            vec![
                cell(spread(ours), precision),
                cell(spread(theirs), precision),
                cell(spread(&diff), precision),
                ratio(spread(ours), spread(theirs)),
                verdict(ours, theirs, goal),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = Spread::of([3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of([1.0, 2.0, 3.0, 4.0]).unwrap().median, 2.5);
        assert_eq!(cell(Spread::of([1.0, 2.0, 3.0]), 1), "2.0 [1.0–3.0]");
        assert_eq!(cell(None, 1), "-");
    }

    #[test]
    fn no_ratio_against_a_figure_that_is_noise() {
        let theirs = Spread::of([-0.2, 0.1, 0.3]);
        assert!(ratio(Spread::of([1.0, 2.0]), theirs).starts_with('-'), "never a ratio against ~0");
        assert_eq!(ratio(Spread::of([2.0, 2.0]), Spread::of([1.0, 1.0])), "2.00x");
        assert!(ratio(Spread::of([-1.0, -2.0]), Spread::of([1.0, 1.0])).starts_with('-'));
    }

    #[test]
    fn verdicts_count_rounds() {
        let ours = [Some(1.0), Some(3.0), None];
        let theirs = [Some(2.0), Some(2.0), Some(1.0)];
        assert_eq!(verdict(&ours, &theirs, Goal::AtMost), "split (1/2 rounds)");
        assert_eq!(verdict(&ours[..1], &theirs[..1], Goal::AtMost), "MET (1/1 rounds)");
        assert_eq!(paired_diff(&ours, &theirs), vec![Some(-1.0), Some(1.0), None]);
    }

    #[test]
    fn rows_read_each_target_and_subtract_direct_round_by_round() {
        let runs: BTreeMap<&str, Vec<f64>> =
            BTreeMap::from([("direct", vec![1.0, 2.0]), ("proxy", vec![1.5, 3.0]), ("other", vec![1.2, 2.2])]);
        let value = |x: &f64| Some(*x);
        let mut t = Table::new("t", &["direct", "proxy"]);
        t.figure_rows(&runs, &["direct", "proxy"], &[("value", 1, &value)]);
        t.added_rows(&runs, &["direct", "proxy"], &[("added", 1, &value)]);
        t.goal_row("goal", &added(&runs, "proxy", &value), &added(&runs, "other", &value), 1, Goal::AtMost);
        assert_eq!(t.rows[0].1, ["1.5 [1.0–2.0]", "2.2 [1.5–3.0]"]);
        assert_eq!(t.rows[1].1, ["-", "0.8 [0.5–1.0]"]);
        assert_eq!(t.rows[2].1[4], "NOT MET (0/2 rounds)");
    }
}
