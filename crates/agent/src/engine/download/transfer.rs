//! One file from a model host into the cache: resumed from the partial file left by a cut
//! (`Range`, guarded by `If-Range` so a changed file is never spliced onto an old start),
//! hashed as it lands, checked, and renamed into place only when whole.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::DownloadError;
use super::progress::ProgressCell;
use super::remote::{Ask, DownloadClient, ask};
use crate::model::Token;

/// One file to fetch.
pub struct FileJob<'a> {
    pub url: &'a str,
    pub token: Option<&'a Token>,
    pub target: &'a Path,
    /// Expected digests, each with where it came from (`spec.model.sha256`, the hub).
    pub want: Vec<(String, &'static str)>,
    /// The size the server gave when the file was sized up, if it did.
    pub size: Option<u64>,
}

/// A transfer that has sent nothing for this long is cut and resumed: a silently dead
/// connection must not leave a model in `Downloading` for ever.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a cut transfer is taken up again, and after how long.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub first_delay: Duration,
}

/// What a transfer did, for logs, metrics and tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TransferStats {
    /// Where each resumed request started.
    pub resumed_at: Vec<u64>,
    pub received_bytes: u64,
    /// Partial files thrown away because the server's copy changed or could not be resumed.
    pub discarded_bytes: u64,
    pub sha256: String,
    pub size: u64,
}

pub fn partial_path(target: &Path) -> PathBuf {
    suffixed(target, ".partial")
}

/// The `If-Range` validator of a partial file's server copy, kept next to it.
pub fn validator_path(target: &Path) -> PathBuf {
    suffixed(target, ".partial.validator")
}

/// The SHA-256 of a complete cached file, written when it landed.
pub fn digest_path(target: &Path) -> PathBuf {
    suffixed(target, ".sha256")
}

fn suffixed(target: &Path, suffix: &str) -> PathBuf {
    let mut name = target.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    target.with_file_name(name)
}

enum Failure {
    /// Worth another attempt from where the file now stands.
    Transient(DownloadError),
    Fatal(DownloadError),
}

pub async fn transfer(
    client: &DownloadClient,
    job: &FileJob<'_>,
    retry: Retry,
    progress: &ProgressCell,
) -> Result<TransferStats, DownloadError> {
    let mut stats = TransferStats::default();
    // The hash of the partial file's first `.1` bytes, carried across attempts so a resume
    // does not read back what was just written.
    let mut hashed: (Sha256, u64) = (Sha256::new(), 0);
    let mut delay = retry.first_delay;
    let mut last = None;
    for attempt in 0..retry.attempts.max(1) {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(60));
        }
        match attempt_once(client, job, progress, &mut hashed, &mut stats).await {
            Ok(()) => return finish(job, hashed.0, stats).await,
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Transient(e)) => {
                tracing::warn!(url = job.url, attempt = attempt + 1, of = retry.attempts, error = %metalkube_runtime::errors::chain(&e), "download cut; resuming");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| DownloadError::Failed { url: job.url.to_owned(), problem: "no attempt made".into() }))
}

async fn attempt_once(
    client: &DownloadClient,
    job: &FileJob<'_>,
    progress: &ProgressCell,
    hashed: &mut (Sha256, u64),
    stats: &mut TransferStats,
) -> Result<(), Failure> {
    let partial = partial_path(job.target);
    let validator_file = validator_path(job.target);
    let io = |path: &Path, e: std::io::Error| Failure::Fatal(DownloadError::Cache { path: path.to_owned(), source: e });
    let mut have = tokio::fs::metadata(&partial).await.map_or(0, |m| m.len());
    let validator = tokio::fs::read_to_string(&validator_file).await.ok().filter(|v| !v.trim().is_empty());
    if have > 0 && validator.is_none() {
        // Nothing says which copy those bytes came from: they cannot be continued safely.
        discard(&partial, have, progress, stats).await.map_err(|e| io(&partial, e))?;
        have = 0;
    }
    let answer = ask(
        client,
        &Ask {
            url: job.url,
            token: job.token,
            resume: validator.as_deref().filter(|_| have > 0).map(|v| (have, v.trim())),
            probe: false,
        },
    )
    .await
    .map_err(Failure::Transient)?;
    let status = answer.status.as_u16();
    match status {
        206 => {
            let start = answer.content_range().map(|(s, _)| s);
            if start != Some(have) {
                discard(&partial, have, progress, stats).await.map_err(|e| io(&partial, e))?;
                return Err(Failure::Transient(DownloadError::Failed {
                    url: job.url.to_owned(),
                    problem: format!("asked for bytes from {have}, the server sent a range from {start:?}"),
                }));
            }
            if have > 0 {
                stats.resumed_at.push(have);
                tracing::info!(url = job.url, from_byte = have, "download resumed");
            }
        }
        200 => {
            if have > 0 {
                // If-Range did not match: the server's file changed since the partial began.
                tracing::info!(url = job.url, discarded = have, "server copy changed; downloading from the start");
                discard(&partial, have, progress, stats).await.map_err(|e| io(&partial, e))?;
                have = 0;
            }
        }
        416 if have > 0 => {
            let total = answer.content_range().and_then(|(_, total)| total).or(job.size);
            if total == Some(have) {
                // The whole file was already here (cut between its last byte and the rename).
                if hashed.1 != have {
                    *hashed = hash_prefix(&partial, have).await.map_err(|e| io(&partial, e))?;
                }
                stats.size = have;
                return Ok(());
            }
            discard(&partial, have, progress, stats).await.map_err(|e| io(&partial, e))?;
            return Err(Failure::Transient(DownloadError::Failed {
                url: job.url.to_owned(),
                problem: format!("the partial file ({have} bytes) is longer than the server's ({total:?})"),
            }));
        }
        401 | 403 => return Err(Failure::Fatal(DownloadError::Denied { url: job.url.to_owned(), status })),
        408 | 429 | 500..=599 => {
            return Err(Failure::Transient(DownloadError::Failed {
                url: job.url.to_owned(),
                problem: format!("HTTP {}", answer.status),
            }));
        }
        _ => {
            return Err(Failure::Fatal(DownloadError::Failed {
                url: job.url.to_owned(),
                problem: format!("HTTP {}", answer.status),
            }));
        }
    }
    if have == 0 {
        *hashed = (Sha256::new(), 0);
        match answer.validator() {
            Some(v) => tokio::fs::write(&validator_file, v).await.map_err(|e| io(&validator_file, e))?,
            None => {
                let _ = tokio::fs::remove_file(&validator_file).await;
            }
        }
    } else if hashed.1 != have {
        *hashed = hash_prefix(&partial, have).await.map_err(|e| io(&partial, e))?;
    }
    let size = answer.content_length().and_then(|n| n.checked_add(have)).or(job.size);
    let mut file =
        tokio::fs::OpenOptions::new().create(true).append(true).open(&partial).await.map_err(|e| io(&partial, e))?;
    if have == 0 {
        file.set_len(0).await.map_err(|e| io(&partial, e))?;
    }
    let mut body = answer.body;
    let mut written = have;
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                let _ = file.flush().await;
                return Err(Failure::Transient(DownloadError::Failed {
                    url: job.url.to_owned(),
                    problem: format!("nothing received for {}s after {written} bytes", IDLE_TIMEOUT.as_secs()),
                }));
            }
        };
        let chunk = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(chunk) => chunk,
                Err(_) => continue,
            },
            Err(e) => {
                // What reached the file stays; the next attempt continues after it.
                let _ = file.flush().await;
                return Err(Failure::Transient(DownloadError::Interrupted {
                    url: job.url.to_owned(),
                    after_bytes: written,
                    source: e,
                }));
            }
        };
        if let Err(e) = file.write_all(&chunk).await {
            return Err(Failure::Fatal(write_failed(job.target, on_disk(&partial, written).await, size, e)));
        }
        hashed.0.update(&chunk);
        hashed.1 += chunk.len() as u64;
        written += chunk.len() as u64;
        stats.received_bytes += chunk.len() as u64;
        progress.received(chunk.len() as u64, Instant::now());
    }
    if let Err(e) = file.sync_all().await {
        return Err(Failure::Fatal(write_failed(job.target, on_disk(&partial, written).await, size, e)));
    }
    if let Some(expected) = size.filter(|s| *s != written) {
        // A body that ended early without an error (a close-delimited answer cut short): what
        // arrived stays and is continued; one that ran long is not this file.
        if written > expected {
            discard(&partial, written, progress, stats).await.map_err(|e| io(&partial, e))?;
        }
        return Err(Failure::Transient(DownloadError::Failed {
            url: job.url.to_owned(),
            problem: format!("the transfer ended at {written} bytes of {expected}"),
        }));
    }
    stats.size = written;
    Ok(())
}

async fn discard(partial: &Path, have: u64, progress: &ProgressCell, stats: &mut TransferStats) -> std::io::Result<()> {
    progress.discarded(have);
    stats.discarded_bytes += have;
    match tokio::fs::remove_file(partial).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

async fn hash_prefix(path: &Path, len: u64) -> std::io::Result<(Sha256, u64)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut hasher = Sha256::new();
        let file = std::fs::File::open(&path)?;
        std::io::copy(&mut file.take(len), &mut hasher)?;
        Ok((hasher, len))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Checks the digests, then moves the file into place.
async fn finish(job: &FileJob<'_>, hasher: Sha256, mut stats: TransferStats) -> Result<TransferStats, DownloadError> {
    let partial = partial_path(job.target);
    let got = format!("{:x}", hasher.finalize());
    if let Some((want, from)) = job.want.iter().find(|(want, _)| *want != got) {
        // A wrong file is never kept: resuming it would only make it longer and still wrong.
        let _ = tokio::fs::remove_file(&partial).await;
        let _ = tokio::fs::remove_file(validator_path(job.target)).await;
        return Err(DownloadError::DigestMismatch {
            what: job.url.to_owned(),
            size: stats.size,
            got,
            want: want.clone(),
            want_from: from,
        });
    }
    let cache_err = |path: &Path, e| DownloadError::Cache { path: path.to_owned(), source: e };
    let digest_file = digest_path(job.target);
    tokio::fs::write(&digest_file, &got).await.map_err(|e| cache_err(&digest_file, e))?;
    tokio::fs::rename(&partial, job.target).await.map_err(|e| cache_err(job.target, e))?;
    if let Some(dir) = job.target.parent() {
        // The rename is only durable once the directory is written.
        if let Ok(d) = tokio::fs::File::open(dir).await {
            let _ = d.sync_all().await;
        }
    }
    let _ = tokio::fs::remove_file(validator_path(job.target)).await;
    tracing::info!(url = job.url, bytes = stats.size, sha256 = %got, resumed = stats.resumed_at.len(), "model file downloaded");
    stats.sha256 = got;
    Ok(stats)
}

/// How much of a download is on disk: writes are buffered, so what was handed to the file is
/// not what landed.
async fn on_disk(path: &Path, handed_over: u64) -> u64 {
    tokio::fs::metadata(path).await.map_or(handed_over, |m| m.len())
}

fn write_failed(target: &Path, written: u64, size: Option<u64>, e: std::io::Error) -> DownloadError {
    let dir = target.parent().unwrap_or(target).to_owned();
    if e.kind() == std::io::ErrorKind::StorageFull {
        DownloadError::CacheDiskFull { dir, written, size, source: e }
    } else {
        DownloadError::CacheWrite { path: partial_path(target), written, size, source: e }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_files_sit_next_to_the_target() {
        let t = Path::new("/c/hf/o/r/main/m.gguf");
        assert_eq!(partial_path(t), Path::new("/c/hf/o/r/main/m.gguf.partial"));
        assert_eq!(validator_path(t), Path::new("/c/hf/o/r/main/m.gguf.partial.validator"));
        assert_eq!(digest_path(t), Path::new("/c/hf/o/r/main/m.gguf.sha256"));
    }

    #[test]
    fn a_full_disk_is_named_with_how_far_the_download_got() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let m = write_failed(Path::new("/state/models/x.gguf"), 2048, Some(4096), full).to_string();
        assert!(m.contains("/state/models is full") && m.contains("after 2048 of 4096 bytes"), "{m}");
        let m = write_failed(Path::new("/state/models/x.gguf"), 0, None, std::io::Error::other("boom")).to_string();
        assert!(m.contains("writing /state/models/x.gguf.partial failed after 0 bytes"), "{m}");
    }
}
