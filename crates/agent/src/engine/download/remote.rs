//! Talking to model hosts: one https client, redirects followed by hand (the hub answers with a
//! redirect to its CDN, whose headers and ours differ), a token sent only to the host it was
//! meant for, and ranged requests for resuming.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_RANGE, ETAG, HeaderMap, HeaderName, LAST_MODIFIED, LOCATION, RANGE};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::DownloadError;
use crate::model::Token;

/// Model hosts hand out redirects to their CDNs; more than this many is a loop.
const MAX_REDIRECTS: usize = 10;
/// Time a host gets to answer with its headers (connecting has its own 30 s).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The hub's SHA-256 of an LFS file (quoted hex), and its size, on the resolve answer.
pub const X_LINKED_ETAG: HeaderName = HeaderName::from_static("x-linked-etag");
pub const X_LINKED_SIZE: HeaderName = HeaderName::from_static("x-linked-size");

pub type DownloadClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A client for model downloads (https only): system roots plus `extra_ca_pem`, e.g. a private
/// mirror's CA.
pub fn download_client(extra_ca_pem: Option<&str>) -> Result<DownloadClient, DownloadError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A single unusable system certificate must not disable downloads.
        let _ = roots.add(cert);
    }
    if let Some(pem) = extra_ca_pem {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| DownloadError::CaCertificates(e.to_string()))?;
            roots.add(cert).map_err(|e| DownloadError::CaCertificates(e.to_string()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| DownloadError::CaCertificates(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(30)));
    // A peer that vanished without a reset is found by the idle timeout of the transfer, and
    // sooner by the kernel with keep-alive probes.
    http.set_keepalive(Some(Duration::from_secs(30)));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// What to ask for.
pub struct Ask<'a> {
    pub url: &'a str,
    /// Sent only to the host of `url`: a redirect to a CDN must not carry the hub token.
    pub token: Option<&'a Token>,
    /// `Range: bytes=N-`, guarded by `If-Range` with this validator (an ETag or a date).
    pub resume: Option<(u64, &'a str)>,
    /// `Range: bytes=0-0`: headers and size, without the body.
    pub probe: bool,
}

/// The answer after redirects, with the hub's own headers kept from the hop that had them.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    /// `X-Linked-ETag` / `X-Linked-Size` from any hop (the hub puts them on its redirect).
    pub linked_sha256: Option<String>,
    pub linked_size: Option<u64>,
    pub body: hyper::body::Incoming,
}

impl Answer {
    /// A validator usable in `If-Range`: a strong ETag, else Last-Modified.
    pub fn validator(&self) -> Option<String> {
        let etag = self.headers.get(ETAG).and_then(|v| v.to_str().ok()).filter(|e| !e.starts_with("W/"));
        etag.or_else(|| self.headers.get(LAST_MODIFIED).and_then(|v| v.to_str().ok())).map(str::to_owned)
    }

    /// `Content-Range: bytes START-END/TOTAL` as (start, total).
    pub fn content_range(&self) -> Option<(u64, Option<u64>)> {
        let v = self.headers.get(CONTENT_RANGE)?.to_str().ok()?;
        parse_content_range(v)
    }

    pub fn content_length(&self) -> Option<u64> {
        self.headers.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
    }
}

pub async fn ask(client: &DownloadClient, ask: &Ask<'_>) -> Result<Answer, DownloadError> {
    let url = ask.url;
    let mut current: hyper::Uri =
        url.parse().map_err(|_| DownloadError::Failed { url: url.to_owned(), problem: "is not a URL".into() })?;
    let origin = current.authority().cloned();
    let (mut linked_sha256, mut linked_size) = (None, None);
    for _ in 0..=MAX_REDIRECTS {
        let mut request = http::Request::get(current.clone());
        if let Some(token) = ask.token.filter(|_| current.authority() == origin.as_ref()) {
            request = request.header(AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        if ask.probe {
            request = request.header(RANGE, "bytes=0-0");
        } else if let Some((from, validator)) = ask.resume {
            request = request.header(RANGE, format!("bytes={from}-")).header(http::header::IF_RANGE, validator);
        }
        let request = request.body(Empty::new()).map_err(|e| DownloadError::Failed {
            url: url.to_owned(),
            problem: format!("cannot build the request: {e}"),
        })?;
        let response = match tokio::time::timeout(ANSWER_TIMEOUT, client.request(request)).await {
            Ok(answer) => answer.map_err(|e| DownloadError::Request { url: url.to_owned(), source: e })?,
            Err(_) => {
                return Err(DownloadError::Failed {
                    url: url.to_owned(),
                    problem: format!("no answer within {}s", ANSWER_TIMEOUT.as_secs()),
                });
            }
        };
        let headers = response.headers();
        if let Some(sha) = headers.get(X_LINKED_ETAG).and_then(|v| v.to_str().ok()).and_then(linked_sha256_of) {
            linked_sha256 = Some(sha);
        }
        if let Some(size) = headers.get(X_LINKED_SIZE).and_then(|v| v.to_str().ok()?.parse().ok()) {
            linked_size = Some(size);
        }
        if !response.status().is_redirection() {
            let (parts, body) = response.into_parts();
            return Ok(Answer { status: parts.status, headers: parts.headers, linked_sha256, linked_size, body });
        }
        let location = headers.get(LOCATION).and_then(|l| l.to_str().ok()).ok_or_else(|| DownloadError::Failed {
            url: url.to_owned(),
            problem: format!("HTTP {} without a Location", response.status()),
        })?;
        current = resolve(&current, location).ok_or_else(|| DownloadError::Failed {
            url: url.to_owned(),
            // Not the Location itself: CDN redirects carry signed query strings.
            problem: format!("a redirect to an unusable location (HTTP {})", response.status()),
        })?;
    }
    Err(DownloadError::Failed { url: url.to_owned(), problem: format!("more than {MAX_REDIRECTS} redirects") })
}

/// The hub's `X-Linked-ETag` is the file's SHA-256 in quotes for LFS files; anything else (a
/// git blob id) is not a SHA-256 and is not used.
fn linked_sha256_of(value: &str) -> Option<String> {
    let v = value.trim().trim_start_matches("W/").trim_matches('"').to_ascii_lowercase();
    (v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then_some(v)
}

fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" { None } else { Some(total.parse().ok()?) };
    Some((start.parse().ok()?, total))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_absolute_and_relative() {
        let base: hyper::Uri = "https://hub.example/org/repo/model.gguf".parse().unwrap();
        assert_eq!(resolve(&base, "https://cdn.example/x").unwrap().to_string(), "https://cdn.example/x");
        assert_eq!(resolve(&base, "/blob/1").unwrap().to_string(), "https://hub.example/blob/1");
        assert_eq!(resolve(&base, "v2.gguf").unwrap().to_string(), "https://hub.example/org/repo/v2.gguf");
    }

    #[test]
    fn only_a_sha256_linked_etag_is_taken() {
        let sha = "AB".repeat(32);
        assert_eq!(linked_sha256_of(&format!("\"{sha}\"")), Some(sha.to_ascii_lowercase()));
        assert_eq!(linked_sha256_of("\"a1b2c3\""), None, "a git blob id is not a SHA-256");
        assert_eq!(linked_sha256_of(""), None);
    }

    #[test]
    fn content_ranges_parse() {
        assert_eq!(parse_content_range("bytes 100-199/1000"), Some((100, Some(1000))));
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn tokens_do_not_show_in_debug() {
        let t = Token::new(" hf_secret \n").unwrap();
        assert_eq!(t.expose(), "hf_secret");
        assert!(!format!("{t:?}").contains("secret"));
        assert_eq!(Token::new("  "), None);
    }
}
