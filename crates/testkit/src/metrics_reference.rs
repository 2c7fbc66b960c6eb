//! The metrics' reference (`docs/reference/metrics-<binary>.md`), made from what a binary's
//! registries encode: each stage registers its families into a registry of its own, a test gives
//! every family a series, and the OpenMetrics text says each family's name, type, help and
//! labels. The test compares the committed file with what it makes (`cargo xtask docs` sets
//! `METALKUBE_WRITE_DOCS=1` to write it instead), and checks that every family the crate's source
//! registers is in it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

/// One family as the OpenMetrics text describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// The name clients query: counters with `_total`.
    pub name: String,
    pub kind: String,
    pub help: String,
    /// Label names in the order the series carry them (`le` of histogram buckets left out).
    pub labels: Vec<String>,
}

/// The families in one registry's OpenMetrics text, in the order it lists them.
pub fn families(encoded: &str) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    let mut helps: Vec<(String, String)> = Vec::new();
    for line in encoded.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            helps.push((name.to_owned(), help.replace("\\n", " ")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let help = helps.iter().rev().find(|(n, _)| n == name).map(|(_, h)| h.clone()).unwrap_or_default();
            let shown = if kind == "counter" { format!("{name}_total") } else { name.to_owned() };
            out.push(Family { name: shown, kind: kind.to_owned(), help, labels: Vec::new() });
        } else if !line.starts_with('#') && !line.is_empty() {
            let Some(family) = out.last_mut() else { continue };
            // The series' own labels: a `{` before the first space (an exemplar's come after
            // the value), up to the `}` outside quotes.
            let series = line.split(' ').next().unwrap_or_default();
            let Some(at) = series.find('{') else { continue };
            let labels = &line[at + 1..];
            for pair in split_labels(labels) {
                let name = pair.split('=').next().unwrap_or_default().trim().to_owned();
                if !name.is_empty() && name != "le" && !family.labels.contains(&name) {
                    family.labels.push(name);
                }
            }
        }
    }
    out
}

/// `a="x",b="y,z"}…` into its pairs, up to the closing `}`; commas and braces inside quoted
/// values kept.
fn split_labels(text: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            '}' if !quoted => {
                out.push(&text[start..i]);
                return out.into_iter().filter(|p| !p.is_empty()).collect();
            }
            _ => {}
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// The reference page: a table per stage.
pub fn reference(title: &str, intro: &str, stages: &[(&str, String)]) -> String {
    let mut out = format!("# {title}\n\n{intro}\n");
    for (stage, encoded) in stages {
        let _ = write!(out, "\n## {stage}\n\n| metric | type | labels | help |\n|---|---|---|---|\n");
        for f in families(encoded) {
            let labels = f.labels.iter().map(|l| format!("`{l}`")).collect::<Vec<_>>().join(", ");
            let _ = writeln!(out, "| `{}` | {} | {labels} | {} |", f.name, f.kind, f.help.replace('|', "\\|"));
        }
    }
    out
}

/// The family names (without the registry's prefix, with the unit's suffix a unit adds) that
/// `.rs` files under `src` register outside their test modules: the first string literal after
/// `register(`, `register_with_unit(` or `gauge_on_first_use(`, and for the last two the
/// `Unit::` that follows.
pub fn registered_in_source(src: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut files = Vec::new();
    collect_rs(src, &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        // Test modules sit at the end of a file; what they register is theirs.
        let text = text.split("#[cfg(test)]\nmod").next().unwrap_or_default();
        for (call, has_unit) in [("register(", false), ("register_with_unit(", true), ("gauge_on_first_use(", true)] {
            for (at, _) in text.match_indices(call) {
                let rest = text[at + call.len()..].trim_start();
                let Some(literal) = rest.strip_prefix('"') else { continue };
                let Some(end) = literal.find('"') else { continue };
                let name = &literal[..end];
                let unit = if has_unit { unit_after(&literal[end..]) } else { None };
                names.insert(match unit {
                    Some(u) if !name.ends_with(&format!("_{u}")) => format!("{name}_{u}"),
                    _ => name.to_owned(),
                });
            }
        }
    }
    names
}

/// The unit suffix of the first `Unit::` in `call` (the rest of a registration call).
fn unit_after(call: &str) -> Option<String> {
    let at = call.find("Unit::")?;
    let unit = &call[at + "Unit::".len()..];
    if let Some(other) = unit.strip_prefix("Other(\"") {
        return other.split('"').next().map(str::to_owned);
    }
    let word: String = unit.chars().take_while(char::is_ascii_alphanumeric).collect();
    Some(word.to_lowercase())
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Families the source registers that the reference lacks (`prefix`: the registry's, e.g.
/// `metalkube_agent_`). A family whose series a test did not create is missing from the
/// encoding, so it must be given one.
pub fn missing(reference: &str, prefix: &str, registered: &BTreeSet<String>) -> Vec<String> {
    registered
        .iter()
        .filter(|short| {
            let full = format!("{prefix}{short}");
            !reference.contains(&format!("| `{full}` |")) && !reference.contains(&format!("| `{full}_total` |"))
        })
        .cloned()
        .collect()
}

/// The end of every binary's reference test: every family its source (`crate_dir/src`)
/// registers must be on `page`, and `docs/reference/<file>` must be `page` (or is written, under
/// `METALKUBE_WRITE_DOCS`).
pub fn hold_page_to_the_code(page: &str, prefix: &str, crate_dir: &Path, file: &str) {
    let absent = missing(page, prefix, &registered_in_source(&crate_dir.join("src")));
    assert!(absent.is_empty(), "families with no series on the reference page: {absent:?}");
    write_or_compare(&crate_dir.join("../../docs/reference").join(file), page);
}

/// Writes `text` to `path` when `METALKUBE_WRITE_DOCS` is set; otherwise fails when they differ.
pub fn write_or_compare(path: &Path, text: &str) {
    if std::env::var_os("METALKUBE_WRITE_DOCS").is_some() {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == text,
        "{} differs from what the registration code makes: run `cargo xtask docs` and commit it",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_carry_type_help_and_label_names() {
        let text = "# HELP x_requests Requests by code.\n# TYPE x_requests counter\nx_requests_total{model=\"a,}b\",code=\"200\"} 1 # {trace=\"t\"} 1\n\
                    # HELP x_seconds Time.\n# TYPE x_seconds histogram\n# UNIT x_seconds seconds\nx_seconds_bucket{le=\"0.1\"} 0\nx_seconds_count 0\n# EOF\n";
        let f = families(text);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].name, "x_requests_total");
        assert_eq!(f[0].labels, vec!["model".to_owned(), "code".to_owned()]);
        assert_eq!((f[1].kind.as_str(), f[1].help.as_str()), ("histogram", "Time."));
        assert!(f[1].labels.is_empty(), "le is the histogram's own");
        let page = reference("M", "intro", &[("stage", text.to_owned())]);
        assert!(page.contains("| `x_requests_total` | counter | `model`, `code` | Requests by code. |"), "{page}");
        let registered = BTreeSet::from(["requests".to_owned(), "seconds".to_owned(), "gone".to_owned()]);
        assert_eq!(missing(&page, "x_", &registered), vec!["gone".to_owned()]);
    }
}
