//! Remote model sources (`https://`, `hf://`) into the agent's model cache: every file of the
//! model (all shards of a split GGUF) sized up first and checked against free disk space, then
//! fetched with resume, verified, and shared: two models naming one file fetch it once, and a
//! file a model uses is never removed by the cache limit.

pub mod cache;
mod error;
pub mod metrics;
pub mod progress;
pub mod remote;
pub mod transfer;

pub use error::DownloadError;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalkube_api::{HubFile, SourceRef, split_name, with_file_name};
use metalkube_runtime::sync::lock;
use progress::ProgressCell;
use remote::{Ask, DownloadClient, ask};
use transfer::{FileJob, Retry, TransferStats, digest_path, partial_path, transfer};

use crate::model::Token;

/// How the agent downloads models.
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    /// Extra CA (PEM) trusted for downloads, besides the system's roots.
    pub ca_pem: Option<String>,
    /// The hub `hf://` sources are fetched from (`HF_ENDPOINT`).
    pub hub_endpoint: String,
    /// The agent's own hub token (`HF_TOKEN`, `--hf-token-file`); a model's
    /// `spec.model.tokenSecretRef` takes precedence.
    pub hub_token: Option<Token>,
    /// Remove files no model uses, least recently used first, beyond this size.
    pub cache_max_bytes: Option<u64>,
    pub retry: Retry,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            ca_pem: None,
            hub_endpoint: "https://huggingface.co".into(),
            hub_token: None,
            cache_max_bytes: None,
            retry: Retry { attempts: 8, first_delay: Duration::from_secs(1) },
        }
    }
}

pub struct Downloader {
    client: DownloadClient,
    cache_dir: PathBuf,
    config: DownloadConfig,
    /// One transfer per file set at a time, keyed by its first file; others wait and share
    /// its progress.
    transfers: Mutex<HashMap<PathBuf, Arc<SharedTransfer>>>,
    leases: Arc<Mutex<Leases>>,
    /// (URL, wanted digest) → (digest, size) of a download that did not match.
    mismatches: Mutex<HashMap<(String, String), (String, u64)>>,
}

#[derive(Default)]
struct SharedTransfer {
    running: tokio::sync::Mutex<()>,
    progress: Arc<ProgressCell>,
}

#[derive(Default)]
struct Leases {
    next: u64,
    held: HashMap<u64, Vec<PathBuf>>,
}

/// Keeps a model's files out of cache eviction while the model is on this agent.
pub struct CacheLease {
    id: u64,
    leases: Arc<Mutex<Leases>>,
}

impl Drop for CacheLease {
    fn drop(&mut self) {
        // Last used now: a model that served for weeks is not the first to go when it stops.
        if let Some(files) = lock(&self.leases).held.remove(&self.id) {
            for f in files {
                cache::touch(&f);
            }
        }
    }
}

/// A remote model's files, ready to be fetched.
pub struct Fetch<'a> {
    downloader: &'a Downloader,
    /// Every file, the one the engine loads first.
    files: Vec<RemoteFile>,
    token: Option<Token>,
    shared: Arc<SharedTransfer>,
    /// `spec.model.sha256`, for the file the source names.
    want_sha256: Option<String>,
}

struct RemoteFile {
    url: String,
    target: PathBuf,
    /// Whether this is the file the source names (spec.model.sha256 is about it).
    named: bool,
}

/// A fetched model.
pub struct Fetched {
    /// The file the engine loads (the first shard of a split model).
    pub path: PathBuf,
    /// SHA-256 of the named file, as computed when it landed.
    pub sha256: Option<String>,
    pub lease: CacheLease,
    /// Bytes of the shards after the first: their tensors are not in the first shard's header,
    /// so the memory estimate adds them.
    pub other_shard_bytes: u64,
    /// Per file downloaded now (empty when everything was cached).
    pub transfers: Vec<TransferStats>,
}

impl Downloader {
    pub fn new(cache_dir: PathBuf, config: DownloadConfig) -> Result<Self, DownloadError> {
        Ok(Self {
            client: remote::download_client(config.ca_pem.as_deref())?,
            cache_dir,
            config,
            transfers: Mutex::new(HashMap::new()),
            leases: Arc::default(),
            mismatches: Mutex::new(HashMap::new()),
        })
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The files of a remote source and where they go; None for `file:` sources.
    pub fn plan(
        &self,
        source: &SourceRef,
        want_sha256: Option<&str>,
        token: Option<&Token>,
    ) -> Result<Option<Fetch<'_>>, DownloadError> {
        let (files, token) = match source {
            SourceRef::File(_) => return Ok(None),
            SourceRef::Https(url) => {
                let name = url.rsplit('/').next().unwrap_or_default().split(['?', '#']).next().unwrap_or_default();
                let files = match split_name(name) {
                    Some(split) => {
                        let names = split.shard_names();
                        let first_url = with_file_name(url, &names[0]);
                        names
                            .iter()
                            .map(|n| {
                                Ok(RemoteFile {
                                    url: with_file_name(url, n),
                                    target: cache::https_path(&self.cache_dir, &first_url, n, None)?,
                                    named: n == name,
                                })
                            })
                            .collect::<Result<Vec<_>, DownloadError>>()?
                    }
                    None => vec![RemoteFile {
                        url: url.clone(),
                        target: cache::https_path(&self.cache_dir, url, name, want_sha256)?,
                        named: true,
                    }],
                };
                // A hub token is for the hub only.
                (files, None)
            }
            SourceRef::Hub(file) => {
                let name = file.path.rsplit('/').next().unwrap_or_default();
                let hub_file = |f: &HubFile, named| {
                    Ok(RemoteFile {
                        url: f.resolve_url(&self.config.hub_endpoint),
                        target: cache::hub_path(&self.cache_dir, f)?,
                        named,
                    })
                };
                let files = match split_name(name) {
                    Some(split) => split
                        .shard_names()
                        .iter()
                        .map(|n| hub_file(&file.with_path(with_file_name(&file.path, n)), n == name))
                        .collect::<Result<Vec<_>, DownloadError>>()?,
                    None => vec![hub_file(file, true)?],
                };
                (files, token.or(self.config.hub_token.as_ref()).cloned())
            }
        };
        let key = files.first().map(|f| f.target.clone()).unwrap_or_default();
        let shared = lock(&self.transfers).entry(key).or_default().clone();
        Ok(Some(Fetch { downloader: self, files, token, shared, want_sha256: want_sha256.map(str::to_owned) }))
    }

    fn lease(&self, files: Vec<PathBuf>) -> CacheLease {
        let mut leases = lock(&self.leases);
        leases.next += 1;
        let id = leases.next;
        leases.held.insert(id, files);
        CacheLease { id, leases: self.leases.clone() }
    }

    /// Removes unused files beyond `--model-cache-max-bytes` (less `room` for a download about
    /// to start), least recently used first.
    pub fn enforce_cache_limit(&self, room: u64) {
        let Some(max) = self.config.cache_max_bytes else { return };
        let in_use: HashSet<PathBuf> = lock(&self.leases).held.values().flatten().cloned().collect();
        let files = cache::list(&self.cache_dir);
        for path in cache::eviction_plan(&files, &in_use, max.saturating_sub(room)) {
            match cache::remove(&self.cache_dir, &path) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), max_bytes = max, "removed an unused model file (--model-cache-max-bytes)")
                }
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "could not remove an unused model file"),
            }
        }
    }
}

impl Fetch<'_> {
    /// Byte counts shared by every model waiting on these files.
    pub fn progress(&self) -> Arc<ProgressCell> {
        self.shared.progress.clone()
    }

    /// Whether every file is already in the cache (nothing to download).
    pub fn cached(&self) -> bool {
        self.files.iter().all(|f| f.target.is_file())
    }

    pub async fn run(self) -> Result<Fetched, DownloadError> {
        let d = self.downloader;
        // Leased before anything else: no eviction (by another model's fetch) may take a shard
        // this one already has while it fetches the rest.
        let lease = d.lease(self.files.iter().map(|f| f.target.clone()).collect());
        if let Some(known) = self.known_mismatch() {
            return Err(known);
        }
        // Another model fetching the same files: wait for it, then find them cached.
        let _running = self.shared.running.lock().await;
        self.drop_cached_copy_with_another_digest()?;
        let mut transfers = Vec::new();
        let missing: Vec<&RemoteFile> = self.files.iter().filter(|f| !f.target.is_file()).collect();
        if !missing.is_empty() {
            transfers = self.download(&missing).await.inspect_err(|e| self.remember_mismatch(e))?;
        }
        for f in &self.files {
            cache::touch(&f.target);
        }
        let named = self.files.iter().find(|f| f.named).or(self.files.first());
        let sha256 =
            named.and_then(|f| std::fs::read_to_string(digest_path(&f.target)).ok()).map(|s| s.trim().to_owned());
        if !transfers.is_empty() {
            // Only a download makes the cache grow; a start from cached files leaves it as is.
            d.enforce_cache_limit(0);
        }
        let path = self.files.first().map(|f| f.target.clone()).unwrap_or_default();
        let other_shard_bytes =
            self.files.iter().skip(1).filter_map(|f| f.target.metadata().ok()).map(|m| m.len()).sum();
        Ok(Fetched { path, sha256, lease, other_shard_bytes, transfers })
    }

    /// A download that ended with a digest other than the spec's is not fetched again for the
    /// same spec: a wrong `spec.model.sha256` must not cost a full download every recheck.
    fn known_mismatch(&self) -> Option<DownloadError> {
        let want = self.want_sha256.as_ref()?;
        let named = self.files.iter().find(|f| f.named)?;
        let got = lock(&self.downloader.mismatches).get(&(named.url.clone(), want.clone())).cloned()?;
        Some(DownloadError::DigestMismatch {
            what: format!(
                "{} (downloaded earlier; change spec.model.sha256 or restart the agent to try again)",
                named.url
            ),
            size: got.1,
            got: got.0,
            want: want.clone(),
            want_from: "spec.model.sha256",
        })
    }

    fn remember_mismatch(&self, e: &DownloadError) {
        if let DownloadError::DigestMismatch { what, size, got, want, want_from: "spec.model.sha256" } = e {
            lock(&self.downloader.mismatches).insert((what.clone(), want.clone()), (got.clone(), *size));
        }
    }

    /// A cached file whose recorded digest is not the one the spec now wants (a hub revision
    /// such as `main` moved, and the spec was updated to the new file): fetched again, unless
    /// another model still uses the cached copy.
    fn drop_cached_copy_with_another_digest(&self) -> Result<(), DownloadError> {
        let Some(want) = &self.want_sha256 else { return Ok(()) };
        let Some(named) = self.files.iter().find(|f| f.named && f.target.is_file()) else { return Ok(()) };
        let Ok(got) = std::fs::read_to_string(digest_path(&named.target)) else { return Ok(()) };
        let got = got.trim();
        if got == want {
            return Ok(());
        }
        let holders = lock(&self.downloader.leases).held.values().filter(|files| files.contains(&named.target)).count();
        if holders > 1 {
            return Err(DownloadError::DigestMismatch {
                what: format!("{} (cached, and in use by another model)", named.url),
                size: named.target.metadata().map_or(0, |m| m.len()),
                got: got.to_owned(),
                want: want.clone(),
                want_from: "spec.model.sha256",
            });
        }
        tracing::info!(file = %named.target.display(), cached = got, wanted = %want, "cached file has another digest; fetching it again");
        cache::remove(&self.downloader.cache_dir, &named.target)
            .map_err(|e| DownloadError::Cache { path: named.target.clone(), source: e })
    }

    async fn download(&self, missing: &[&RemoteFile]) -> Result<Vec<TransferStats>, DownloadError> {
        let d = self.downloader;
        let progress = &self.shared.progress;
        // Size every file first: the disk is checked for all of them before any byte moves,
        // and the hub's own digests are learnt.
        let mut sized = Vec::new();
        for f in missing {
            let answer =
                ask(&d.client, &Ask { url: &f.url, token: self.token.as_ref(), resume: None, probe: true }).await?;
            match answer.status.as_u16() {
                200 | 206 => {}
                401 | 403 => {
                    return Err(DownloadError::Denied { url: f.url.clone(), status: answer.status.as_u16() });
                }
                _ => {
                    return Err(DownloadError::Failed {
                        url: f.url.clone(),
                        problem: format!("HTTP {}", answer.status),
                    });
                }
            }
            let size = answer
                .linked_size
                .or_else(|| answer.content_range().and_then(|(_, total)| total))
                .or_else(|| (answer.status == http::StatusCode::OK).then(|| answer.content_length()).flatten());
            // Dropping the body of a 200 closes that connection; a probe needs no more of it.
            drop(answer.body);
            sized.push((f, size, answer.linked_sha256));
        }
        // Sizes come from the network: summed without overflow (a wrapped sum would pass the
        // disk check).
        let have = |f: &RemoteFile| std::fs::metadata(partial_path(&f.target)).map_or(0, |m| m.len());
        let complete: u64 = self
            .files
            .iter()
            .filter(|f| f.target.is_file())
            .filter_map(|f| f.target.metadata().ok())
            .fold(0, |a, m| a.saturating_add(m.len()));
        let done = missing.iter().fold(complete, |a, f| a.saturating_add(have(f)));
        let total = sized.iter().try_fold(complete, |a, (_, s, _)| s.and_then(|s| a.checked_add(s)));
        progress.set_total(total, done);
        let need: u64 = sized.iter().fold(0, |a, (f, s, _)| a.saturating_add(s.unwrap_or(0).saturating_sub(have(f))));
        let cache_dir = &d.cache_dir;
        std::fs::create_dir_all(cache_dir).map_err(|e| DownloadError::Cache { path: cache_dir.clone(), source: e })?;
        if let Some(free) = free_bytes(cache_dir)
            && need > free
        {
            return Err(DownloadError::NoSpace { dir: cache_dir.clone(), need, free });
        }
        let mut stats = Vec::new();
        for (f, size, linked) in sized {
            if let Some(dir) = f.target.parent() {
                std::fs::create_dir_all(dir).map_err(|e| DownloadError::Cache { path: dir.to_owned(), source: e })?;
            }
            let mut want = Vec::new();
            if let Some(sha) = self.want_sha256.as_ref().filter(|_| f.named) {
                want.push((sha.clone(), "spec.model.sha256"));
            }
            if let Some(sha) = linked {
                if let Some((spec, _)) = want.first().filter(|(spec, _)| *spec != sha) {
                    // Known wrong before a byte is fetched.
                    return Err(DownloadError::DigestConflict { url: f.url.clone(), hub: sha, spec: spec.clone() });
                }
                want.push((sha, "the hub's X-Linked-ETag"));
            }
            tracing::info!(url = %f.url, file = %f.target.display(), "downloading model file");
            let job = FileJob { url: &f.url, token: self.token.as_ref(), target: &f.target, want, size };
            stats.push(transfer(&d.client, &job, d.config.retry, progress).await?);
        }
        Ok(stats)
    }
}

/// Space the agent may still write on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    #[allow(clippy::useless_conversion)] // the field types differ between Linux and macOS
    Some(u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())))
}
