//! `https://` model sources: downloaded once into the agent's model cache through a temporary
//! file, hashed while they stream, checked against `spec.model.sha256` when it is given, and
//! renamed into place only when complete, so a crash or a bad download never leaves a file that
//! looks usable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Model hosts hand out redirects to their CDNs; more than this many is a loop.
const MAX_REDIRECTS: usize = 10;

pub type DownloadClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A client for model downloads (https only): system roots plus `extra_ca_pem`, e.g. a private
/// mirror's CA.
pub fn download_client(extra_ca_pem: Option<&str>) -> Result<DownloadClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A single unusable system certificate must not disable downloads.
        let _ = roots.add(cert);
    }
    if let Some(pem) = extra_ca_pem {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("--download-ca: not a PEM certificate: {e}"))?;
            roots.add(cert).map_err(|e| format!("--download-ca: {e}"))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(30)));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// Where a source lands in the cache: by content when the hash is known (two URLs of one file
/// share it), else by URL.
pub fn cache_path(cache_dir: &Path, url: &str, sha256: Option<&str>) -> PathBuf {
    let name = match sha256 {
        Some(hash) => format!("sha256-{hash}.gguf"),
        None => {
            let digest = Sha256::digest(url.as_bytes());
            let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            let tail: String = url
                .rsplit('/')
                .next()
                .unwrap_or("model")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' })
                .take(80)
                .collect();
            format!("url-{short}-{tail}")
        }
    };
    cache_dir.join(name)
}

/// The cached file for `url`, downloading it first if it is not there yet.
pub async fn fetch_model(
    client: &DownloadClient,
    cache_dir: &Path,
    url: &str,
    sha256: Option<&str>,
) -> Result<PathBuf, String> {
    let target = cache_path(cache_dir, url, sha256);
    if target.is_file() {
        return Ok(target);
    }
    tokio::fs::create_dir_all(cache_dir)
        .await
        .map_err(|e| format!("creating the model cache {}: {e}", cache_dir.display()))?;
    // Unique per attempt: two models may fetch the same URL at once.
    let partial = target.with_extension(format!("partial-{}-{:08x}", std::process::id(), rand::random::<u32>()));
    match download(client, url, &partial, sha256).await {
        Ok(()) => tokio::fs::rename(&partial, &target)
            .await
            .map(|()| target)
            .map_err(|e| format!("moving the download into {}: {e}", cache_dir.display())),
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(e)
        }
    }
}

/// GET `url`, following redirects.
async fn get(client: &DownloadClient, url: &str) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut current: hyper::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    for _ in 0..=MAX_REDIRECTS {
        let response = client.get(current.clone()).await.map_err(|e| {
            // The root cause (TLS, DNS, refused) is at the bottom of the chain.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            format!("downloading {url}: {text}")
        })?;
        if !response.status().is_redirection() {
            return Ok(response);
        }
        let location = response
            .headers()
            .get(hyper::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| format!("downloading {url}: HTTP {} without a Location", response.status()))?;
        current = resolve(&current, location).ok_or_else(|| format!("downloading {url}: bad redirect {location:?}"))?;
    }
    Err(format!("downloading {url}: more than {MAX_REDIRECTS} redirects"))
}

/// A redirect target, absolute or relative to `base`.
fn resolve(base: &hyper::Uri, location: &str) -> Option<hyper::Uri> {
    if location.contains("://") {
        return location.parse().ok();
    }
    let authority = base.authority()?;
    let scheme = base.scheme_str().unwrap_or("https");
    let path = if location.starts_with('/') {
        location.to_owned()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}").parse().ok()
}

async fn download(client: &DownloadClient, url: &str, to: &Path, sha256: Option<&str>) -> Result<(), String> {
    tracing::info!(url, "downloading model");
    let response = get(client, url).await?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("downloading {url}: HTTP {status}"));
    }
    let size = response.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut file = tokio::fs::File::create(to).await.map_err(|e| format!("creating {}: {e}", to.display()))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("downloading {url}: interrupted after {bytes} bytes: {e}"))?;
        let Ok(chunk) = frame.into_data() else { continue };
        hasher.update(&chunk);
        if let Err(e) = file.write_all(&chunk).await {
            return Err(write_failed(url, to, on_disk(to, bytes).await, size, &e));
        }
        bytes += chunk.len() as u64;
    }
    if let Err(e) = file.sync_all().await {
        return Err(write_failed(url, to, on_disk(to, bytes).await, size, &e));
    }
    let got = format!("{:x}", hasher.finalize());
    if let Some(want) = sha256
        && got != want
    {
        return Err(format!("downloaded {url} ({bytes} bytes) has sha256 {got}, spec.model.sha256 wants {want}"));
    }
    tracing::info!(url, bytes, sha256 = %got, "model downloaded");
    Ok(())
}

/// How much of a download is on disk: writes are buffered, so what was handed to the file is
/// not what landed.
async fn on_disk(path: &Path, handed_over: u64) -> u64 {
    tokio::fs::metadata(path).await.map_or(handed_over, |m| m.len())
}

/// Why a download could not be written, saying what filled up and how far it got.
fn write_failed(url: &str, to: &Path, written: u64, size: Option<u64>, e: &std::io::Error) -> String {
    let of = size.map_or_else(String::new, |s| format!(" of {s}"));
    if e.kind() == std::io::ErrorKind::StorageFull {
        let dir = to.parent().unwrap_or(to);
        format!(
            "downloading {url}: the disk holding the model cache {} is full ({e}) after {written}{of} bytes; \
             free space there or give the agent another --state-dir",
            dir.display()
        )
    } else {
        format!("downloading {url}: writing {} failed after {written}{of} bytes: {e}", to.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_are_by_content_when_known_else_by_url() {
        let dir = Path::new("/cache");
        let hash = "ab".repeat(32);
        assert_eq!(cache_path(dir, "https://a/x.gguf", Some(&hash)), dir.join(format!("sha256-{hash}.gguf")));
        let by_url = cache_path(dir, "https://a/we ird?.gguf", None);
        let name = by_url.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("url-") && name.ends_with("we_ird_.gguf"), "{name}");
        assert_ne!(by_url, cache_path(dir, "https://b/we ird?.gguf", None), "different URLs, different files");
    }

    #[test]
    fn a_full_disk_is_named_with_how_far_the_download_got() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let m = write_failed("https://m/x.gguf", Path::new("/state/models/x.partial"), 2048, Some(4096), &full);
        assert!(m.contains("/state/models is full") && m.contains("after 2048 of 4096 bytes"), "{m}");
        let other = std::io::Error::other("boom");
        let m = write_failed("https://m/x.gguf", Path::new("/state/models/x.partial"), 0, None, &other);
        assert!(m.contains("writing /state/models/x.partial failed after 0 bytes: boom"), "{m}");
    }

    #[test]
    fn redirects_resolve_absolute_and_relative() {
        let base: hyper::Uri = "https://hub.example/org/repo/model.gguf".parse().unwrap();
        assert_eq!(resolve(&base, "https://cdn.example/x").unwrap().to_string(), "https://cdn.example/x");
        assert_eq!(resolve(&base, "/blob/1").unwrap().to_string(), "https://hub.example/blob/1");
        assert_eq!(resolve(&base, "v2.gguf").unwrap().to_string(), "https://hub.example/org/repo/v2.gguf");
    }
}
