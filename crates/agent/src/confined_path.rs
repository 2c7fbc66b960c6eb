//! Paths the agent makes from names it was given (a model's namespace and name, a Secret's name
//! and key, a hub repository and file): every name must be one plain entry of the directory it
//! is meant for. The names are validated where they come in (the MetalModel checks, the source
//! parser); this is the last check before a file is written, read or removed, so a name that
//! slipped past them can never reach a file outside the agent's directories. Pure: it looks at
//! the names, not at the filesystem (a mounted Secret's files are symlinks, and that is fine).

use std::path::{Component, Path, PathBuf};

/// Why `name` cannot be one entry of a directory, if it cannot.
pub fn entry_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name == "." || name == ".." {
        return Some("it is '.' or '..'");
    }
    if name.contains(['/', '\\']) {
        return Some("it holds a path separator");
    }
    if name.contains('\0') {
        return Some("it holds a NUL character");
    }
    // What the platform itself makes of it: exactly one ordinary component.
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) => None,
        _ => Some("it is not a plain file name"),
    }
}

/// A name that cannot be one plain entry of `dir`: the path made of it would leave the
/// directory, or name none of its files. Each caller's error enum holds it as is.
#[derive(Debug, thiserror::Error)]
#[error("{name:?} cannot be a file name inside {}: {problem}", dir.display())]
pub struct PathOutside {
    pub dir: PathBuf,
    pub name: String,
    pub problem: &'static str,
}

/// `dir` joined with `names`, each of which must be one plain entry (no separator, not `.` or
/// `..`, not empty): the result is always inside `dir`.
pub fn inside(dir: &Path, names: &[&str]) -> Result<PathBuf, PathOutside> {
    let mut path = dir.to_owned();
    for name in names {
        if let Some(problem) = entry_problem(name) {
            return Err(PathOutside { dir: dir.to_owned(), name: (*name).to_owned(), problem });
        }
        path.push(name);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_names_join_and_anything_else_is_refused_by_name() {
        let dir = Path::new("/var/lib/metalkube/logs");
        assert_eq!(inside(dir, &["default_tiny.log"]).unwrap(), dir.join("default_tiny.log"));
        assert_eq!(inside(dir, &["keys", "..data"]).unwrap(), dir.join("keys/..data"));
        for (bad, says) in [
            ("../../x_tiny.log", "path separator"),
            ("/etc", "path separator"),
            ("a\\b", "path separator"),
            ("..", "'.' or '..'"),
            (".", "'.' or '..'"),
            ("", "empty"),
            ("a\0b", "NUL"),
        ] {
            let err = inside(dir, &["ok", bad]).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains(&format!("{bad:?}")) && err.contains("logs"), "{bad:?}: {err}");
        }
    }

    proptest! {
        /// Whatever the names, a path that is made stays inside the directory: it starts with
        /// it, has one more component per name, and none of them climbs.
        #[test]
        fn a_path_made_never_leaves_its_directory(names in prop::collection::vec(prop_oneof![
            ".{0,6}",
            "[./\\\\a]{0,6}",
            Just("..".to_owned()),
            Just("/".to_owned()),
        ], 0..4)) {
            let dir = Path::new("/state/engines");
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            if let Ok(path) = inside(dir, &refs) {
                prop_assert!(path.starts_with(dir));
                prop_assert_eq!(path.components().count(), dir.components().count() + names.len());
                prop_assert!(path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
            } else {
                prop_assert!(refs.iter().any(|n| entry_problem(n).is_some()));
            }
        }

        /// Names as the validated ones look (RFC 1123 names, Secret keys, file stems) pass.
        #[test]
        fn valid_names_pass(name in "[-_a-zA-Z0-9][-._a-zA-Z0-9]{0,30}") {
            prop_assert_eq!(entry_problem(&name), None);
        }
    }
}
