//! The agent's certificate, for the gRPC API's mutual TLS and the HTTP port's TLS. Served with
//! rustls directly rather than tonic's ServerTlsConfig, which is fixed when the server starts:
//! here each new connection takes the configuration in force, and a watcher rebuilds it when the certificate, key or client CA files change. A
//! renewed certificate (a second `join`, or any tool rewriting the files) is served without a
//! restart, and the certificate's expiry is exported as a metric.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::observe::metrics::{AgentRegistry, certificate_expiry};

/// Why TLS material cannot be served: a file that cannot be read, or PEM that makes no usable
/// configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot be built from the material, or its files cannot be followed.
    #[error("TLS: {what}")]
    Setup {
        what: String,
        #[source]
        source: Option<rustls::Error>,
    },
}

/// PEM text for mutual TLS: the agent's identity and the CA its clients must be signed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPem {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

/// A change is acted on after the files have been quiet this long: a renewal rewrites three
/// files one after the other.
const SETTLE: Duration = Duration::from_millis(200);
/// Files are also compared this often, in case a change event was missed.
const RECHECK: Duration = Duration::from_secs(60);

/// The files `serve` reads its TLS material from (`--tls-cert`, `--tls-key`, `--client-ca`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TlsFiles {
    fn read(&self) -> Result<TlsPem, TlsError> {
        let read = |path: &Path, what: &'static str| {
            std::fs::read_to_string(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
        };
        Ok(TlsPem {
            cert_pem: read(&self.cert, "reading the TLS certificate (--tls-cert)")?,
            key_pem: read(&self.key, "reading the TLS key (--tls-key)")?,
            client_ca_pem: read(&self.client_ca, "reading the client CA (--client-ca)")?,
        })
    }
}

/// What a TLS configuration serves: both present the agent's certificate and know the
/// controller's CA (`--client-ca`), but ask different things of clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPurpose {
    /// The gRPC API: a client certificate from `--client-ca` is required; HTTP/2.
    Grpc,
    /// The agent's HTTP port (`--http-tls`): a client certificate is optional (one from
    /// `--client-ca` lets a scraper in when `--http-client-certificates` says so; any other
    /// fails the handshake); HTTP/1.1.
    AgentHttp,
}

/// The server configuration in force; every accepted connection uses the latest one.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Fixed material: what was given is what is served.
    pub fn from_pem(pem: &TlsPem) -> Result<Self, TlsError> {
        Self::from_pem_for(pem, TlsPurpose::Grpc)
    }

    fn from_pem_for(pem: &TlsPem, purpose: TlsPurpose) -> Result<Self, TlsError> {
        Ok(Self { current: Arc::new(RwLock::new(Arc::new(server_config_for(pem, purpose)?))) })
    }

    /// Serves the files' material and follows them: a change that makes a valid configuration
    /// replaces it (and the expiry metric); one that does not (a key that does not match the
    /// certificate yet, half a renewal) keeps the current one, with a warning.
    pub fn follow_files(files: TlsFiles, registry: Arc<AgentRegistry>) -> Result<Self, TlsError> {
        Self::follow_files_for(files, registry, TlsPurpose::Grpc)
    }

    /// As `follow_files`, for `purpose`.
    pub fn follow_files_for(
        files: TlsFiles,
        registry: Arc<AgentRegistry>,
        purpose: TlsPurpose,
    ) -> Result<Self, TlsError> {
        let pem = files.read()?;
        let tls = Self::from_pem_for(&pem, purpose)?;
        export_expiry(&registry, certificate_expiry_unix(&pem.cert_pem)?);
        let (wake, woken) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading the files is an event too (inotify reports opens): only changes count.
            if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                let _ = wake.try_send(());
            }
        })
        .map_err(|e| TlsError::Setup { what: format!("watching the TLS files: {e}"), source: None })?;
        // The directories, not the files: a renewal replaces a file (rename, or a Secret
        // volume's symlink swap), which a watch on the old file would not see.
        let mut dirs: Vec<PathBuf> = [&files.cert, &files.key, &files.client_ca]
            .iter()
            .map(|p| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned())
            .collect();
        dirs.sort();
        dirs.dedup();
        for dir in &dirs {
            watcher.watch(dir, RecursiveMode::NonRecursive).map_err(|e| TlsError::Setup {
                what: format!("watching {} for renewed TLS files: {e}", dir.display()),
                source: None,
            })?;
        }
        tokio::spawn(follow(files, purpose, pem, tls.clone(), registry, watcher, woken));
        Ok(tls)
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(metalkube_runtime::sync::read(&self.current).clone())
    }

    fn replace(&self, config: ServerConfig) {
        *metalkube_runtime::sync::write(&self.current) = Arc::new(config);
    }
}

async fn follow(
    files: TlsFiles,
    purpose: TlsPurpose,
    mut loaded: TlsPem,
    tls: ServerTls,
    registry: Arc<AgentRegistry>,
    // Kept alive as long as the files are followed.
    _watcher: notify::RecommendedWatcher,
    mut woken: tokio::sync::mpsc::Receiver<()>,
) {
    loop {
        tokio::select! {
            event = woken.recv() => if event.is_none() { return },
            () = tokio::time::sleep(RECHECK) => {}
        }
        // Let the rest of a renewal land, and fold its events into this one check.
        tokio::time::sleep(SETTLE).await;
        while woken.try_recv().is_ok() {}
        let pem = match files.read() {
            Ok(pem) if pem == loaded => continue,
            Ok(pem) => pem,
            Err(e) => {
                tracing::warn!("{}; keeping the TLS material in use", metalkube_runtime::errors::chain(&e));
                continue;
            }
        };
        let built =
            server_config_for(&pem, purpose).and_then(|config| Ok((config, certificate_expiry_unix(&pem.cert_pem)?)));
        match built {
            Ok((config, expiry)) => {
                tls.replace(config);
                export_expiry(&registry, expiry);
                tracing::info!("TLS files changed: new connections use the new certificate (expires at {expiry})");
                loaded = pem;
            }
            // Not remembered as loaded: the next event (the rest of the renewal) tries again.
            Err(e) => tracing::warn!("{}; keeping the TLS material in use", metalkube_runtime::errors::chain(&e)),
        }
    }
}

/// A rustls server configuration that presents `cert_pem` and accepts only clients with a
/// certificate signed by `client_ca_pem`, speaking HTTP/2 (which tonic's clients require).
pub fn server_config(pem: &TlsPem) -> Result<ServerConfig, TlsError> {
    server_config_for(pem, TlsPurpose::Grpc)
}

/// The rustls server configuration for `purpose`.
fn server_config_for(pem: &TlsPem, purpose: TlsPurpose) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&pem.cert_pem, "--tls-cert")?;
    let key = PrivateKeyDer::from_pem_slice(pem.key_pem.as_bytes())
        .map_err(|e| TlsError::Setup { what: format!("--tls-key holds no PEM private key: {e}"), source: None })?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(&pem.client_ca_pem, "--client-ca")? {
        roots.add(ca).map_err(|e| tls_error("--client-ca is not a usable CA certificate", e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier = match purpose {
        TlsPurpose::Grpc => verifier,
        TlsPurpose::AgentHttp => verifier.allow_unauthenticated(),
    };
    let verifier = verifier.build().map_err(|e| TlsError::Setup { what: format!("--client-ca: {e}"), source: None })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("TLS protocol versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls_error("--tls-cert and --tls-key do not make a usable identity", e))?;
    config.alpn_protocols = match purpose {
        TlsPurpose::Grpc => vec![b"h2".to_vec()],
        TlsPurpose::AgentHttp => vec![b"http/1.1".to_vec()],
    };
    Ok(config)
}

fn certificates(pem: &str, flag: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Setup { what: format!("{flag}: not PEM certificates: {e}"), source: None })?;
    if certs.is_empty() {
        return Err(TlsError::Setup { what: format!("{flag} holds no PEM certificate"), source: None });
    }
    Ok(certs)
}

fn tls_error(what: &str, source: rustls::Error) -> TlsError {
    TlsError::Setup { what: what.to_owned(), source: Some(source) }
}

/// Exports when the served certificate expires (Unix seconds): renewals show as a jump, and an
/// alert can fire well before the controller is locked out. The gRPC API and the HTTP port serve
/// the same files, and set the same gauge.
fn export_expiry(registry: &AgentRegistry, unix_seconds: i64) {
    certificate_expiry(registry).set(unix_seconds);
}

/// When the first certificate in `pem` expires, in seconds since the Unix epoch.
pub fn certificate_expiry_unix(pem: &str) -> Result<i64, TlsError> {
    let der = certificates(pem, "--tls-cert")?.swap_remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| TlsError::Setup { what: format!("--tls-cert: not an X.509 certificate: {e}"), source: None })?;
    Ok(cert.validity().not_after.timestamp())
}

/// The DNS names the first certificate in `pem` is issued for (its subjectAltName DNS
/// entries): names clients may use for this agent.
pub fn certificate_dns_names(pem: &str) -> Result<Vec<String>, TlsError> {
    let der = certificates(pem, "--tls-cert")?.swap_remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| TlsError::Setup { what: format!("--tls-cert: not an X.509 certificate: {e}"), source: None })?;
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(name) => Some((*name).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(TlsError::Setup { what: format!("--tls-cert: unreadable subjectAltName: {e}"), source: None });
        }
    };
    Ok(names)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_expiry_is_the_certificates_not_after() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["mac-01".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let cert = params.self_signed(&key).unwrap();
        // 2031-05-17T00:00:00Z
        assert_eq!(certificate_expiry_unix(&cert.pem()).unwrap(), 1_936_742_400);
    }

    #[test]
    fn the_expiry_series_appears_when_first_set_and_stays_one() {
        let registry = AgentRegistry::default();
        assert!(!registry.encode().contains("tls_certificate_expiry"), "{}", registry.encode());
        export_expiry(&registry, 1_936_742_400);
        export_expiry(&registry, 1_936_742_401);
        let text = registry.encode();
        assert!(text.contains("metalkube_agent_tls_certificate_expiry_timestamp_seconds 1936742401"), "{text}");
        assert_eq!(text.matches("# TYPE metalkube_agent_tls_certificate_expiry_timestamp_seconds").count(), 1);
    }

    #[test]
    fn the_dns_names_are_the_certificates_subject_alt_names() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["mac-01.lan".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::IpAddress("10.0.0.21".parse().unwrap()));
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(certificate_dns_names(&cert.pem()).unwrap(), ["mac-01.lan"]);
    }

    #[test]
    fn what_is_not_a_certificate_is_named() {
        let err = certificate_expiry_unix("").unwrap_err().to_string();
        assert_eq!(err, "TLS: --tls-cert holds no PEM certificate");
        let err = certificate_expiry_unix("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("TLS: --tls-cert: not an X.509 certificate"), "{err}");
    }
}
