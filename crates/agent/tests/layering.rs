//! The agent's floors, held against its imports: a module may name only modules on floors below
//! its own (and itself). A newcomer can then tell which stage owns what from the floor plan
//! alone, and a decision made on a lower floor never reaches up for a higher one's state.
//!
//! Read from the source text: every `crate::<module>` path (also inside `use crate::{…}` groups),
//! in production code and in unit tests alike. `cargo test -p metalkube-agent --test layering`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top to bottom. The ground floor (`model`) is the words every stage shares; `observe` is
/// what the agent tells people and Prometheus; the stages above it each own one job.
const FLOORS: &[(&str, &[&str])] = &[
    ("the binary: parsing and dispatch", &["main"]),
    ("the binary's subcommands: each one's flags and start-up", &["cli"]),
    ("the other command: joining a fleet", &["install"]),
    ("the agent's ports: the controller's gRPC API and models directory, the HTTP port", &["control", "http_port"]),
    ("the agent: every model's supervisor, by key", &["agent"]),
    ("one model's supervisor", &["supervisor"]),
    ("what supervisors and ports share: settings, pools, the certificate", &["context", "tls"]),
    ("the stages", &["engine", "health", "serving"]),
    ("telling people and Prometheus", &["observe"]),
    ("the shared words and tools", &["model", "ewma", "confined_path"]),
];

/// The crate root only declares modules and re-exports; it is no floor.
const ROOT: &str = "lib";

fn floor_of(module: &str) -> Option<usize> {
    FLOORS.iter().position(|(_, modules)| modules.contains(&module))
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())).flatten() {
        let path = entry.path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `serving/proxy/mod.rs` → `serving`, `agent.rs` → `agent`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let first = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules named after `crate::`, with the line of each.
fn named_modules(text: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        // `metalkube_agent::` in the binary is the same crate seen from outside: counted below.
        if text[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let line = text[..at].matches('\n').count() + 1;
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            for name in top_level_names(group) {
                found.push((name, line));
            }
        } else {
            found.push((ident(rest), line));
        }
    }
    for (at, _) in text.match_indices("metalkube_agent::") {
        let line = text[..at].matches('\n').count() + 1;
        let rest = &text[at + "metalkube_agent::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            found.extend(top_level_names(group).into_iter().map(|n| (n, line)));
        } else {
            found.push((ident(rest), line));
        }
    }
    found.retain(|(name, _)| !name.is_empty());
    found
}

fn ident(text: &str) -> String {
    text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// The first name of each item of a `{…}` group, at the group's own depth.
fn top_level_names(group: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut depth = 0;
    let mut at_item_start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_item_start = true,
            c if c.is_whitespace() => {}
            _ if at_item_start && depth == 0 => {
                names.push(ident(&group[i..]));
                at_item_start = false;
            }
            _ => {}
        }
    }
    names
}

#[test]
fn every_import_points_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    files.sort();

    let reexports = crate_root_reexports(&src);
    let mut unplaced = Vec::new();
    let mut upward: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == ROOT {
            continue;
        }
        let Some(own_floor) = floor_of(&module) else {
            unplaced.push(module);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for (named, line) in named_modules(&text) {
            // A crate-root re-export (`crate::Agent` is `agent::Agent`) is judged by its module.
            let named = reexports.get(&named).cloned().unwrap_or(named);
            if named == module {
                continue;
            }
            let Some(floor) = floor_of(&named) else { continue };
            // FLOORS runs top to bottom: a lower floor has a larger index.
            if floor <= own_floor {
                let rel = file.strip_prefix(&src).unwrap_or(file).display();
                upward
                    .entry(format!(
                        "{module} (floor {}) → {named} (floor {})",
                        FLOORS.len() - own_floor,
                        FLOORS.len() - floor
                    ))
                    .or_default()
                    .push(format!("src/{rel}:{line}"));
            }
        }
    }
    unplaced.sort();
    unplaced.dedup();
    assert!(unplaced.is_empty(), "modules on no floor (add them to FLOORS in this test): {unplaced:?}");
    let report: Vec<String> = upward.iter().map(|(arrow, at)| format!("{arrow}: {}", at.join(", "))).collect();
    assert!(report.is_empty(), "imports that do not point down:\n{}", report.join("\n"));
}

/// `pub use module::Name;` lines of the crate root: the module each re-exported name comes from.
fn crate_root_reexports(src: &Path) -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap_or_else(|e| panic!("reading lib.rs: {e}"));
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub use ")?.strip_suffix(';'))
        .filter_map(|path| {
            let (module, name) = path.rsplit_once("::")?;
            Some((name.to_owned(), ident(module)))
        })
        .collect()
}

/// Names in the crate root's re-exports are judged by the module they come from.
#[test]
fn crate_root_reexports_name_their_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let reexports = crate_root_reexports(&src);
    assert!(reexports.get("Agent").is_some_and(|m| m == "agent"), "{reexports:?}");
    for (name, module) in &reexports {
        assert!(floor_of(module).is_some(), "`{name}` is re-exported from `{module}`, a module on no floor");
    }
}

#[test]
fn the_reader_finds_groups_and_paths() {
    let text = "use crate::{serving::x, model::{A, B}, Agent};\nlet y = crate::engine::z();\nmetalkube_crate::no;";
    let names: Vec<String> = named_modules(text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["serving", "model", "Agent", "engine"]);
}
