//! From `spec.model.source` to a GGUF file on disk, checked before an engine is started so that
//! a wrong path or a wrong file is a clear `Failed`, not a crash loop.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::context::DesiredModel;
use crate::model_download::fetch_model;

/// A model file checked and ready to load.
pub struct ResolvedModel {
    pub path: PathBuf,
    /// What serving it will cost (weights + KV cache for `contextSize` + overhead), when the
    /// header says enough to estimate it.
    pub memory_bytes: Option<u64>,
}

/// Where downloaded models are kept, and the client that fetches them.
pub struct Downloads {
    pub client: crate::model_download::DownloadClient,
    pub cache_dir: PathBuf,
}

pub async fn resolve_model_file(desired: &DesiredModel, downloads: &Downloads) -> Result<ResolvedModel, String> {
    let source = &desired.spec.model.source;
    let want_hash = desired.spec.model.sha256.as_deref();
    // A download is verified as it lands and named by its hash; hashing it again on every start
    // would cost a read of the whole file.
    let (path, verified) = if source.starts_with("https://") {
        (fetch_model(&downloads.client, &downloads.cache_dir, source, want_hash).await?, want_hash.is_some())
    } else {
        (local_path(desired)?, false)
    };
    check_model(desired, path, verified).await
}

fn local_path(desired: &DesiredModel) -> Result<PathBuf, String> {
    let source = &desired.spec.model.source;
    let Some(rest) = source.strip_prefix("file:") else {
        let scheme = source.split(':').next().unwrap_or(source);
        return Err(format!(
            "spec.model.source {source:?}: this agent cannot fetch {scheme}: sources; supported: file:, https://"
        ));
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
                return Err(format!(
                    "spec.model.source {source:?} is a relative path; write file:///absolute/path.gguf"
                ));
            }
        }
    };
    Ok(path)
}

async fn check_model(desired: &DesiredModel, path: PathBuf, verified: bool) -> Result<ResolvedModel, String> {
    let source = &desired.spec.model.source;
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("model file {} does not exist (spec.model.source {source:?})", path.display()));
        }
        Err(e) => return Err(format!("model file {} cannot be read: {e}", path.display())),
    };
    if !meta.is_file() {
        return Err(format!("model source {} is not a file", path.display()));
    }
    let header_path = path.clone();
    let header = tokio::task::spawn_blocking(move || metalkube_gguf::read_header(&header_path))
        .await
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    let header = match header {
        Ok(h) => h,
        Err(e) => return Err(format!("{} is not a usable GGUF model: {e}", path.display())),
    };
    let memory_bytes =
        metalkube_gguf::estimate_memory(&header, u64::from(desired.spec.engine.context_size)).map(|e| e.total());
    if let Some(want) = desired.spec.model.sha256.as_ref().filter(|_| !verified) {
        let hash_path = path.clone();
        let got = tokio::task::spawn_blocking(move || sha256_file(&hash_path))
            .await
            .map_err(|e| format!("hashing {}: {e}", path.display()))?
            .map_err(|e| format!("hashing {}: {e}", path.display()))?;
        if &got != want {
            return Err(format!("{} has sha256 {got}, spec.model.sha256 wants {want}", path.display()));
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
