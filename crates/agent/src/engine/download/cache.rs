//! Where remote model files live in the agent's model cache, and which of them go when the
//! cache outgrows `--model-cache-max-bytes`: files no model uses, least recently used first.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use metalkube_api::HubFile;
use sha2::{Digest, Sha256};

use super::transfer::{digest_path, partial_path, validator_path};
use crate::confined_path::{PathOutside, inside};

/// A hub file's place: by repository, revision and path, so the shards of a split model sit
/// side by side under their own names, as llama.cpp needs to find them.
pub fn hub_path(cache_dir: &Path, file: &HubFile) -> Result<PathBuf, PathOutside> {
    // Components were checked when the source was parsed (no '.', '..' or empty ones); checked
    // again here, where they become a path.
    let mut names = vec!["hf"];
    names.extend(file.repo.split('/'));
    names.push(&file.revision);
    names.extend(file.path.split('/'));
    inside(cache_dir, &names)
}

/// An https file's place: by content when its SHA-256 is known and it stands alone (two URLs
/// of one file share it), else in a directory named after the URL of its first shard.
pub fn https_path(
    cache_dir: &Path,
    first_shard_url: &str,
    file_name: &str,
    sha256: Option<&str>,
) -> Result<PathBuf, PathOutside> {
    if let Some(hash) = sha256 {
        return inside(cache_dir, &[&format!("sha256-{hash}.gguf")]);
    }
    let digest = Sha256::digest(first_shard_url.as_bytes());
    let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let name: String = file_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' })
        .take(120)
        .collect();
    // A URL ending in `/.` or `/..` names no file of its own.
    let name = if name.is_empty() || name == "." || name == ".." { "model.gguf".to_owned() } else { name };
    inside(cache_dir, &[&format!("url-{short}"), &name])
}

/// A complete file in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub last_used: SystemTime,
}

/// Which files to remove so the cache holds at most `max_bytes`: never one in use, the least
/// recently used first, and no more than needed.
pub fn eviction_plan(files: &[CachedFile], in_use: &HashSet<PathBuf>, max_bytes: u64) -> Vec<PathBuf> {
    let mut total: u64 = files.iter().map(|f| f.bytes).sum();
    let mut candidates: Vec<&CachedFile> = files.iter().filter(|f| !in_use.contains(&f.path)).collect();
    candidates.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.path.cmp(&b.path)));
    let mut plan = Vec::new();
    for f in candidates {
        if total <= max_bytes {
            break;
        }
        total -= f.bytes;
        plan.push(f.path.clone());
    }
    plan
}

/// Whether a cache entry is a model file (not a side file of one).
fn is_model_file(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    !(name.ends_with(".partial") || name.ends_with(".partial.validator") || name.ends_with(".sha256"))
}

/// Every complete model file under `dir`.
pub fn list(dir: &Path) -> Vec<CachedFile> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && is_model_file(&path) {
                let last_used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(CachedFile { path, bytes: meta.len(), last_used });
            }
        }
    }
    out
}

/// Removes a model file with its side files, and directories left empty up to `root`.
pub fn remove(root: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    for side in [digest_path(path), partial_path(path), validator_path(path)] {
        let _ = std::fs::remove_file(side);
    }
    let mut dir = path.parent();
    while let Some(d) = dir.filter(|d| d.starts_with(root) && *d != root) {
        if std::fs::remove_dir(d).is_err() {
            break; // not empty
        }
        dir = d.parent();
    }
    Ok(())
}

/// Marks a file used now, so the least recently *used* go first, not the least recently
/// downloaded.
pub fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn file(name: &str, bytes: u64, age_s: u64) -> CachedFile {
        CachedFile {
            path: PathBuf::from(name),
            bytes,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
        }
    }

    #[test]
    fn places_keep_hub_layout_and_share_content() {
        let c = Path::new("/c");
        let f = HubFile { repo: "o/r".into(), path: "q/m-00001-of-00002.gguf".into(), revision: "v1".into() };
        assert_eq!(hub_path(c, &f).unwrap(), Path::new("/c/hf/o/r/v1/q/m-00001-of-00002.gguf"));
        let hash = "ab".repeat(32);
        assert_eq!(
            https_path(c, "https://a/x.gguf", "x.gguf", Some(&hash)).unwrap(),
            c.join(format!("sha256-{hash}.gguf"))
        );
        let a = https_path(c, "https://a/we ird.gguf", "we ird.gguf", None).unwrap();
        assert!(a.starts_with("/c") && a.ends_with("we_ird.gguf"), "{a:?}");
        assert_ne!(a, https_path(c, "https://b/we ird.gguf", "we ird.gguf", None).unwrap());
    }

    /// Whatever a source names, its place is inside the cache: a URL ending in `..` gets a
    /// name of its own, and a hub file that slipped past the source parser is refused.
    #[test]
    fn places_never_leave_the_cache() {
        let c = Path::new("/c");
        for name in ["..", ".", ""] {
            let p = https_path(c, &format!("https://a/{name}"), name, None).unwrap();
            assert!(p.to_string_lossy().starts_with("/c/url-") && p.ends_with("model.gguf"), "{name:?}: {p:?}");
        }
        let f = HubFile { repo: "o/r".into(), path: "../../../etc/m.gguf".into(), revision: "v1".into() };
        assert!(hub_path(c, &f).is_err());
        let f = HubFile { repo: "o/r".into(), path: "m.gguf".into(), revision: "..".into() };
        assert!(hub_path(c, &f).is_err());
    }

    #[test]
    fn least_recently_used_unused_files_go_first() {
        let files = [file("old", 40, 300), file("in-use-oldest", 50, 900), file("newer", 30, 100), file("new", 10, 1)];
        let in_use = HashSet::from([PathBuf::from("in-use-oldest")]);
        assert_eq!(eviction_plan(&files, &in_use, 60), [PathBuf::from("old"), PathBuf::from("newer")]);
        assert!(eviction_plan(&files, &in_use, 1_000).is_empty(), "under the limit nothing goes");
        assert_eq!(eviction_plan(&files, &in_use, 0).len(), 3, "in use stays even over the limit");
    }

    proptest! {
        #[test]
        fn eviction_frees_enough_and_never_touches_used_files(
            sizes in prop::collection::vec((1u64..1_000, 0u64..10_000, any::<bool>()), 0..30),
            max in 0u64..20_000,
        ) {
            let files: Vec<CachedFile> =
                sizes.iter().enumerate().map(|(i, (b, age, _))| file(&format!("f{i}"), *b, *age)).collect();
            let in_use: HashSet<PathBuf> = sizes.iter().enumerate().filter(|(_, s)| s.2).map(|(i, _)| PathBuf::from(format!("f{i}"))).collect();
            let plan = eviction_plan(&files, &in_use, max);
            prop_assert!(plan.iter().all(|p| !in_use.contains(p)));
            let left: u64 = files.iter().filter(|f| !plan.contains(&f.path)).map(|f| f.bytes).sum();
            let used: u64 = files.iter().filter(|f| in_use.contains(&f.path)).map(|f| f.bytes).sum();
            prop_assert!(left <= max.max(used), "left {} max {} used {}", left, max, used);
            // Minimal: keeping the last one removed would break the limit.
            if let Some(last) = plan.last() {
                let b = files.iter().find(|f| &f.path == last).map(|f| f.bytes).unwrap_or(0);
                prop_assert!(left + b > max);
            }
            // Oldest first: nothing kept (and unused) is older than something removed.
            let newest_removed = plan.iter().filter_map(|p| files.iter().find(|f| &f.path == p)).map(|f| f.last_used).max();
            if let Some(t) = newest_removed {
                prop_assert!(files.iter().filter(|f| !plan.contains(&f.path) && !in_use.contains(&f.path)).all(|f| f.last_used >= t));
            }
        }
    }
}
