//! Why a remote model file could not be fetched into the model cache: the download client, the
//! host's answers, the digests, and the cache's disk.

use std::path::PathBuf;

use crate::confined_path::PathOutside;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// `--download-ca` (or the TLS setup around it) is unusable.
    #[error("--download-ca: {0}")]
    CaCertificates(String),
    /// The host's answer, or the lack of one, says the file cannot be had now.
    #[error("downloading {url}: {problem}")]
    Failed { url: String, problem: String },
    #[error("downloading {url}")]
    Request {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("downloading {url}: interrupted after {after_bytes} bytes")]
    Interrupted {
        url: String,
        after_bytes: u64,
        #[source]
        source: hyper::Error,
    },
    #[error(
        "downloading {url}: HTTP {status}: the host wants a valid token; give one with HF_TOKEN or --hf-token-file \
         (in a cluster: spec.model.tokenSecretRef), and for a gated repository accept its terms on the hub first"
    )]
    Denied { url: String, status: u16 },
    #[error("downloaded {what} ({size} bytes) has sha256 {got}, {want_from} wants {want}")]
    DigestMismatch { what: String, size: u64, got: String, want: String, want_from: &'static str },
    #[error(
        "spec.model.sha256 wants {spec}, but the hub says {url} has sha256 {hub}; check the revision and the digest"
    )]
    DigestConflict { url: String, hub: String, spec: String },
    #[error("model cache {}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the disk holding the model cache {} is full after {written}{} bytes; free space there or give the agent another --state-dir",
        dir.display(), of_size(*size)
    )]
    CacheDiskFull {
        dir: PathBuf,
        written: u64,
        size: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {} failed after {written}{} bytes", path.display(), of_size(*size))]
    CacheWrite {
        path: PathBuf,
        written: u64,
        size: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "model cache {}: the download needs {need} more bytes, only {free} are free; free space there, \
         set --model-cache-max-bytes so unused models are removed, or give the agent another --state-dir",
        dir.display()
    )]
    NoSpace { dir: PathBuf, need: u64, free: u64 },
    /// A repository, revision or file name that would put the file outside the cache.
    #[error(transparent)]
    CachePath(#[from] PathOutside),
}

/// " of SIZE" when the size is known, for "after N of SIZE bytes".
fn of_size(size: Option<u64>) -> String {
    size.map_or_else(String::new, |s| format!(" of {s}"))
}
