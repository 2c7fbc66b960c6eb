//! The repository's Markdown stands alone: every relative link resolves to a file inside the
//! repository (and a `#fragment` to a heading of that file), and nothing points outside it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use common::repo_root;
use pulldown_cmark::{Event, Parser, Tag, TagEnd};

/// Directories that hold no documentation of ours (build output, tools, vendored sources).
fn skipped(name: &str) -> bool {
    name.starts_with('.') || matches!(name, "target" | "node_modules")
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().unwrap().is_dir() {
            if !skipped(&name) {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens,
/// `-1`, `-2`, … for repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut heading: Option<String> = None;
    for event in Parser::new(text) {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let Some(h) = heading.take() else { continue };
                let slug: String = h
                    .to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                    .map(|c| if c == ' ' { '-' } else { c })
                    .collect();
                let n = seen.entry(slug.clone()).or_insert(0);
                out.insert(if *n == 0 { slug.clone() } else { format!("{slug}-{n}") });
                *n += 1;
            }
            _ => {}
        }
    }
    out
}

fn links(text: &str) -> Vec<String> {
    Parser::new(text)
        .filter_map(|event| match event {
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => Some(dest_url.into_string()),
            _ => None,
        })
        .collect()
}

/// `path` with `.` and `..` taken out, without touching the file system.
fn normalized(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// What is wrong with `link` in `file`, if anything.
fn broken(root: &Path, file: &Path, link: &str) -> Option<String> {
    let is_external = link.contains("://") || link.starts_with("mailto:");
    if is_external {
        return None;
    }
    let (path, fragment) = link.split_once('#').map_or((link, None), |(p, f)| (p, Some(f)));
    if path.starts_with('/') {
        return Some("an absolute path: it points outside the repository in every clone".into());
    }
    let target = if path.is_empty() { file.to_path_buf() } else { normalized(&file.parent().unwrap().join(path)) };
    if !target.starts_with(root) {
        return Some(format!("{} is outside the repository", target.display()));
    }
    if !target.exists() {
        return Some(format!("{} does not exist", target.display()));
    }
    let fragment = fragment.filter(|f| !f.is_empty())?;
    if target.extension().is_some_and(|e| e == "md") {
        let known = anchors(&std::fs::read_to_string(&target).unwrap());
        if !known.contains(fragment) {
            return Some(format!("{} has no heading #{fragment}", target.display()));
        }
    }
    None
}

#[test]
fn every_relative_link_in_markdown_resolves_inside_the_repository() {
    let root = repo_root();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    assert!(files.len() > 10, "found only {} Markdown files under {}", files.len(), root.display());
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for link in links(&text) {
            checked += 1;
            if let Some(problem) = broken(&root, file, &link) {
                problems.push(format!("{}: ({link}) {problem}", file.strip_prefix(&root).unwrap().display()));
            }
        }
    }
    assert!(checked > 50, "only {checked} links found: is the parser reading the files?");
    assert!(problems.is_empty(), "{} broken link(s):\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn the_link_checker_catches_what_it_should() {
    let root = repo_root();
    let readme = root.join("README.md");
    assert_eq!(broken(&root, &readme, "docs/architecture.md"), None);
    assert_eq!(broken(&root, &readme, "https://example.com/x"), None);
    assert!(broken(&root, &readme, "docs/nope.md").unwrap().contains("does not exist"));
    assert!(broken(&root, &readme, "../elsewhere/DESIGN.md").unwrap().contains("outside the repository"));
    assert!(broken(&root, &readme, "/etc/passwd").unwrap().contains("absolute path"));
    assert!(broken(&root, &readme, "docs/architecture.md#no-such-heading").unwrap().contains("no heading"));
    let a = anchors("# Pulse and phases\n## `--grace-period` (the flag)\n# Pulse and phases\n");
    assert_eq!(
        a,
        BTreeSet::from(["pulse-and-phases".into(), "--grace-period-the-flag".into(), "pulse-and-phases-1".into()])
    );
}
