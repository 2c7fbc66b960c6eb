//! What `spec.model.source` names, parsed once: a local file, an `https://` URL, or a file in a
//! Hugging Face hub repository (`hf://org/repo/path/file.gguf[@revision]`). Pure, so the
//! validation of a MetalModel and the agent's download agree on every source.

use std::fmt;

/// The revision a hub source means when it names none.
pub const DEFAULT_HUB_REVISION: &str = "main";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    /// `file:` followed by an absolute or relative path, as written.
    File(String),
    /// An `https://` URL, as written.
    Https(String),
    Hub(HubFile),
}

/// One file of a hub repository at a revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubFile {
    /// `org/repo`.
    pub repo: String,
    /// Path inside the repository, `/`-separated, no empty, `.` or `..` component.
    pub path: String,
    /// Branch, tag or commit.
    pub revision: String,
}

/// Why a source cannot be used, in words for `spec.model.source`'s error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}")]
pub struct SourceError {
    pub problem: String,
}

/// The sources `parse_source` accepts, for error messages.
pub const SUPPORTED_SOURCES: &str = "file:///abs/path.gguf, file:relative/path.gguf (standalone mode), \
     https://host/path.gguf, hf://org/repo/path/file.gguf[@revision]";

pub fn parse_source(source: &str) -> Result<SourceRef, SourceError> {
    let fail = |problem: String| Err(SourceError { problem });
    if let Some(rest) = source.strip_prefix("file:") {
        if rest.trim_start_matches('/').is_empty() {
            return fail("file: source names no file".into());
        }
        return Ok(SourceRef::File(source.to_owned()));
    }
    if let Some(rest) = source.strip_prefix("https://") {
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() || rest.len() <= host.len() + 1 {
            return fail(format!("{source:?} names no host and file"));
        }
        return Ok(SourceRef::Https(source.to_owned()));
    }
    if let Some(rest) = source.strip_prefix("hf://") {
        return parse_hub(rest).map(SourceRef::Hub).or_else(|e| fail(format!("{source:?}: {}", e.problem)));
    }
    let scheme = source.split_once(':').map_or(source, |(s, _)| s);
    fail(format!("unsupported source scheme {scheme:?} in {source:?}"))
}

fn parse_hub(rest: &str) -> Result<HubFile, SourceError> {
    let fail = |problem: &str| Err(SourceError { problem: problem.to_owned() });
    // The revision is after the last '@' of the path's last component, so an '@' inside a
    // directory name stays part of the path.
    let (path_part, revision) = match rest.rsplit_once('@') {
        Some((p, r)) if !r.contains('/') => (p, r),
        _ => (rest, DEFAULT_HUB_REVISION),
    };
    if revision.is_empty() {
        return fail("an '@' with no revision after it; write @main, a tag, or a commit");
    }
    let name_ok = |s: &str| {
        !s.is_empty() && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    // The revision is a directory of the cache: '.' and '..' would alias other revisions.
    if !name_ok(revision) {
        return fail("the revision may hold letters, digits, '-', '_' and '.', and is not '.' or '..'");
    }
    let mut parts = path_part.splitn(3, '/');
    let (Some(org), Some(repo), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return fail("write hf://org/repo/path/file.gguf");
    };
    if !name_ok(org) || !name_ok(repo) {
        return fail("org and repo may hold letters, digits, '-', '_' and '.'");
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == ".." || c.contains(['?', '#', '%', '\\'])) {
        return fail("the file path has an empty, '.' or '..' component, or '?', '#', '%' or '\\'");
    }
    if !path.ends_with(".gguf") {
        return fail("the file must be a .gguf file");
    }
    Ok(HubFile { repo: format!("{org}/{repo}"), path: path.to_owned(), revision: revision.to_owned() })
}

impl HubFile {
    /// The hub's download URL for this file under `endpoint` (e.g. `https://huggingface.co`).
    pub fn resolve_url(&self, endpoint: &str) -> String {
        format!("{}/{}/resolve/{}/{}", endpoint.trim_end_matches('/'), self.repo, self.revision, self.path)
    }

    /// The same file name in another shard of a split model.
    pub fn with_path(&self, path: String) -> HubFile {
        HubFile { path, ..self.clone() }
    }
}

impl fmt::Display for HubFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hf://{}/{}@{}", self.repo, self.path, self.revision)
    }
}

/// A split GGUF shard name, `<stem>-00001-of-00003.gguf`: llama.cpp loads the first shard and
/// finds the others next to it by this naming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitName {
    /// Everything before `-NNNNN-of-NNNNN.gguf`.
    pub stem: String,
    pub index: u32,
    pub count: u32,
}

/// The split model a file name belongs to, if it is a shard (`None` for an ordinary file).
pub fn split_name(file_name: &str) -> Option<SplitName> {
    let base = file_name.strip_suffix(".gguf")?;
    let (rest, count) = base.rsplit_once("-of-")?;
    let (stem, index) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index) || !digits(count) || stem.is_empty() {
        return None;
    }
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (1..=count).contains(&index).then(|| SplitName { stem: stem.to_owned(), index, count })
}

impl SplitName {
    /// The file names of every shard, first to last.
    pub fn shard_names(&self) -> Vec<String> {
        (1..=self.count).map(|i| format!("{}-{i:05}-of-{:05}.gguf", self.stem, self.count)).collect()
    }
}

/// Replaces the last `/`-component of `path_or_url` with `name`.
pub fn with_file_name(path_or_url: &str, name: &str) -> String {
    match path_or_url.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hub(repo: &str, path: &str, revision: &str) -> SourceRef {
        SourceRef::Hub(HubFile { repo: repo.into(), path: path.into(), revision: revision.into() })
    }

    #[test]
    fn hub_sources_name_repo_path_and_revision() {
        assert_eq!(
            parse_source("hf://Qwen/Qwen3-0.6B-GGUF/q8.gguf").unwrap(),
            hub("Qwen/Qwen3-0.6B-GGUF", "q8.gguf", "main")
        );
        assert_eq!(parse_source("hf://o/r/sub/dir/m.gguf@v1.2").unwrap(), hub("o/r", "sub/dir/m.gguf", "v1.2"));
        assert_eq!(
            parse_source("hf://o/r/a@b/m.gguf").unwrap(),
            hub("o/r", "a@b/m.gguf", "main"),
            "an @ in a directory"
        );
        let file = HubFile { repo: "o/r".into(), path: "sub/m.gguf".into(), revision: "abc123".into() };
        assert_eq!(file.resolve_url("https://hub.example/"), "https://hub.example/o/r/resolve/abc123/sub/m.gguf");
        assert_eq!(file.to_string(), "hf://o/r/sub/m.gguf@abc123");
    }

    #[test]
    fn bad_sources_say_what_is_wrong() {
        for (source, says) in [
            ("hf://o/m.gguf", "hf://org/repo/path"),
            ("hf://o/r/m.gguf@", "no revision"),
            ("hf://o/r/../m.gguf", "'..'"),
            ("hf://o/r//m.gguf", "empty"),
            ("hf://o/r/m.bin", ".gguf"),
            ("hf://o/r/m.gguf@ref?x", "revision may hold"),
            ("hf://o/r/a/m.gguf@..", "not '.' or '..'"),
            ("hf://o%2f/r/m.gguf", "org and repo"),
            ("s3://b/m.gguf", "unsupported source scheme \"s3\""),
            ("https://", "no host"),
            ("file:///", "names no file"),
        ] {
            let e = parse_source(source).unwrap_err();
            assert!(e.problem.contains(says), "{source}: {e}");
        }
    }

    #[test]
    fn split_shards_are_recognised_and_listed() {
        let s = split_name("Llama-3-Q4_K_M-00002-of-00003.gguf").unwrap();
        assert_eq!((s.stem.as_str(), s.index, s.count), ("Llama-3-Q4_K_M", 2, 3));
        assert_eq!(
            s.shard_names(),
            [
                "Llama-3-Q4_K_M-00001-of-00003.gguf",
                "Llama-3-Q4_K_M-00002-of-00003.gguf",
                "Llama-3-Q4_K_M-00003-of-00003.gguf"
            ]
        );
        for plain in
            ["m.gguf", "m-1-of-3.gguf", "m-00004-of-00003.gguf", "-00001-of-00002.gguf", "m-00001-of-00002.bin"]
        {
            assert_eq!(split_name(plain), None, "{plain}");
        }
        assert_eq!(with_file_name("https://h/a/b-00001-of-00002.gguf", "x.gguf"), "https://h/a/x.gguf");
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panic(s in "\\PC{0,80}") {
            let _ = parse_source(&s);
            let _ = split_name(&s);
        }

        #[test]
        fn hub_paths_never_escape_the_repository(path in "[a-z./@-]{1,30}") {
            if let Ok(SourceRef::Hub(f)) = parse_source(&format!("hf://o/r/{path}")) {
                prop_assert!(f.path.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
            }
        }

        #[test]
        fn every_listed_shard_parses_back(stem in "[A-Za-z0-9_.]{1,12}", count in 1u32..40) {
            let names = SplitName { stem: stem.clone(), index: 1, count }.shard_names();
            for (i, n) in names.iter().enumerate() {
                let s = split_name(n).unwrap();
                prop_assert_eq!((s.stem.as_str(), s.index, s.count), (stem.as_str(), i as u32 + 1, count));
            }
        }
    }
}
