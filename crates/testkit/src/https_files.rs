//! A tiny HTTPS file server for download tests: a certificate from a test CA, fixed files by
//! path, 404 otherwise, and a count of the requests it answered.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::pki::TestCa;

/// TLS for a loopback test server, with a certificate for 127.0.0.1 from `ca`.
pub fn tls_acceptor(ca: &TestCa) -> tokio_rustls::TlsAcceptor {
    let pem = ca.server(&["127.0.0.1"]);
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem.cert.as_bytes()).collect::<Result<_, _>>().unwrap_or_default();
    let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).unwrap_or_else(|e| panic!("test key: {e}"));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .unwrap_or_else(|e| panic!("test TLS config: {e}"));
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

pub struct HttpsFiles {
    /// `https://127.0.0.1:<port>`
    pub url: String,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsFiles {
    pub async fn serve(ca: &TestCa, files: HashMap<String, Vec<u8>>) -> Self {
        let acceptor = tls_acceptor(ca);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("binding: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let requests = Arc::new(AtomicUsize::new(0));
        let files = Arc::new(files);
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, files, counter) = (acceptor.clone(), files.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else { return };
                    let mut stream = BufReader::new(stream);
                    let mut request_line = String::new();
                    if stream.read_line(&mut request_line).await.is_err() {
                        return;
                    }
                    // Headers are read and ignored.
                    loop {
                        let mut line = String::new();
                        match stream.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let (status, body) = match files.get(&path) {
                        Some(bytes) => ("200 OK", bytes.clone()),
                        None => ("404 Not Found", b"not found\n".to_vec()),
                    };
                    let head =
                        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let stream = stream.get_mut();
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(&body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { url: format!("https://127.0.0.1:{port}"), requests, task }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HttpsFiles {
    fn drop(&mut self) {
        self.task.abort();
    }
}
