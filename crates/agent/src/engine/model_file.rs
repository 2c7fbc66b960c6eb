//! From `spec.model.source` to a GGUF file on disk, checked before an engine is started so that
//! a wrong path or a wrong file is a clear `Failed`, not a crash loop.

use std::path::{Path, PathBuf};

use metalkube_api::parse_source;
use sha2::{Digest, Sha256};

use crate::engine::download::{DownloadError, Downloader, Fetch};
use crate::model::DesiredModel;

/// Why a model's file cannot be served: its source, its presence, its format, its digest.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("spec.model.source: {problem} (supported: {})", metalkube_api::SUPPORTED_SOURCES)]
    Source { problem: String },
    #[error("model file {} does not exist (spec.model.source {source_text:?})", path.display())]
    Missing { path: PathBuf, source_text: String },
    #[error("model source {} is not a file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{} is not a usable GGUF model", path.display())]
    NotGguf {
        path: PathBuf,
        #[source]
        source: metalkube_gguf::GgufError,
    },
    #[error("{} has sha256 {got}, spec.model.sha256 wants {want}", path.display())]
    Digest { path: PathBuf, got: String, want: String },
    /// The file is there but could not be read (`what` says for what).
    #[error("{what} {}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A remote source that cannot be planned into the cache.
    #[error(transparent)]
    Download(#[from] DownloadError),
}

/// A model file checked and ready to load.
pub struct ResolvedModel {
    pub path: PathBuf,
    /// What serving it will cost (weights + KV cache for `contextSize` + overhead), when the
    /// header says enough to estimate it.
    pub memory_bytes: Option<u64>,
}

/// Where a model's file is: on this machine already, or to be fetched into the cache.
pub enum ModelLocation<'a> {
    Local(PathBuf),
    Remote(Fetch<'a>),
}

pub fn locate<'a>(desired: &DesiredModel, downloads: &'a Downloader) -> Result<ModelLocation<'a>, ModelFileError> {
    let source = &desired.spec.model.source;
    let parsed = parse_source(source).map_err(|e| ModelFileError::Source { problem: e.problem })?;
    match downloads.plan(&parsed, desired.spec.model.sha256.as_deref(), desired.hub_token.as_ref())? {
        Some(fetch) => Ok(ModelLocation::Remote(fetch)),
        None => local_path(desired).map(ModelLocation::Local),
    }
}

fn local_path(desired: &DesiredModel) -> Result<PathBuf, ModelFileError> {
    let source = &desired.spec.model.source;
    let Some(rest) = source.strip_prefix("file:") else {
        return Err(ModelFileError::Source { problem: format!("{source:?} is not a file: source") });
    };
    // file:///abs, file:/abs and file:relative all name a path.
    let raw = rest.strip_prefix("//").unwrap_or(rest);
    let path = Path::new(raw);
    let path = if path.is_absolute() {
        path.to_owned()
    } else {
        match &desired.base_dir {
            Some(base) => base.join(path),
            None => {
                return Err(ModelFileError::Source {
                    problem: format!("{source:?} is a relative path; write file:///absolute/path.gguf"),
                });
            }
        }
    };
    Ok(path)
}

/// Reads the header (and checks `spec.model.sha256` unless `known_sha256`, the digest computed
/// when a download landed, already answers it).
pub async fn check_model(
    desired: &DesiredModel,
    path: PathBuf,
    known_sha256: Option<String>,
) -> Result<ResolvedModel, ModelFileError> {
    let source = &desired.spec.model.source;
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelFileError::Missing { path, source_text: source.clone() });
        }
        Err(e) => return Err(ModelFileError::Unreadable { what: "reading the model file", path, source: e }),
    };
    if !meta.is_file() {
        return Err(ModelFileError::NotAFile { path });
    }
    let header_path = path.clone();
    let header = tokio::task::spawn_blocking(move || metalkube_gguf::read_header(&header_path)).await.map_err(|e| {
        ModelFileError::Unreadable { what: "reading the model header", path: path.clone(), source: e.into() }
    })?;
    let header = match header {
        Ok(h) => h,
        Err(e) => return Err(ModelFileError::NotGguf { path, source: e }),
    };
    let memory_bytes =
        metalkube_gguf::estimate_memory(&header, u64::from(desired.spec.engine.context_size)).map(|e| e.total());
    if let Some(want) = desired.spec.model.sha256.as_ref() {
        let got = match known_sha256 {
            Some(known) => known,
            None => {
                let hash_path = path.clone();
                let hashing =
                    |e| ModelFileError::Unreadable { what: "hashing the model file", path: path.clone(), source: e };
                tokio::task::spawn_blocking(move || sha256_file(&hash_path))
                    .await
                    .map_err(|e| hashing(e.into()))?
                    .map_err(hashing)?
            }
        };
        if &got != want {
            return Err(ModelFileError::Digest { path, got, want: want.clone() });
        }
    }
    Ok(ResolvedModel { path, memory_bytes })
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}
