//! A simulated agent's gRPC port, over mutual TLS as a real agent's: the controller must present
//! a certificate from the CA the agent trusts, and checks the agent's against its own CA. The
//! port can go away and come back on the same address, with every open connection cut at once:
//! what the controller sees when a Mac loses its network or its agent dies.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use metalkube_proto::agent_server::AgentServer;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::FleetError;
use crate::agent_sim::SimAgent;

/// The agent's certificate and key, and the CA its clients' certificates must be signed by.
#[derive(Clone, Debug)]
pub struct ServerPem {
    pub cert: String,
    pub key: String,
    pub client_ca: String,
}

/// Builds the TLS configuration once; every simulated agent shares it (one certificate for
/// 127.0.0.1, as every agent listens there).
pub fn tls_config(pem: &ServerPem) -> Result<Arc<ServerConfig>, FleetError> {
    let tls = |what: &'static str| move |source: rustls::Error| FleetError::Tls { what, source };
    let pem_err =
        |what: &'static str| move |e: rustls::pki_types::pem::Error| FleetError::Pem { what, detail: e.to_string() };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(pem_err("certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(pem_err("key"))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pem.client_ca.as_bytes()) {
        roots.add(ca.map_err(pem_err("client CA"))?).map_err(tls("client CA"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| FleetError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(tls("protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(tls("certificate and key"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A connection that fails its next read or write once its port is taken down.
struct Severable {
    io: TlsStream<TcpStream>,
    cut: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
    /// The cut has come (its future is done and must not be polled again).
    severed: bool,
}

impl Severable {
    fn severed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.severed && self.cut.as_mut().poll(cx).is_ready() {
            self.severed = true;
        }
        self.severed
    }
}

fn reset() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "the simulated agent went away")
}

impl AsyncRead for Severable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.severed(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Severable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.severed(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.severed(cx) {
            return Poll::Ready(Err(reset()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Severable {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

/// One simulated agent's port while it is up.
struct Up {
    cut: tokio::sync::watch::Sender<bool>,
    accepting: tokio::task::JoinHandle<()>,
    serving: tokio::task::JoinHandle<()>,
}

/// A simulated agent reachable over mTLS on a fixed address, which can be taken down and
/// brought back.
pub struct AgentPort {
    pub addr: SocketAddr,
    agent: SimAgent,
    tls: Arc<ServerConfig>,
    up: Option<Up>,
}

impl AgentPort {
    /// Serves `agent` on a new loopback port. Call inside the runtime that should carry it.
    pub async fn start(agent: SimAgent, tls: Arc<ServerConfig>) -> Result<Self, FleetError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(FleetError::Bind)?;
        let addr = listener.local_addr().map_err(FleetError::Bind)?;
        let mut port = Self { addr, agent, tls, up: None };
        port.serve(listener);
        Ok(port)
    }

    pub fn agent(&self) -> &SimAgent {
        &self.agent
    }

    pub fn is_up(&self) -> bool {
        self.up.is_some()
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let (ready, incoming) = tokio::sync::mpsc::channel::<std::io::Result<Severable>>(64);
        let acceptor = TlsAcceptor::from(self.tls.clone());
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (acceptor, ready, mut cut_rx) = (acceptor.clone(), ready.clone(), cut_rx.clone());
                tokio::spawn(async move {
                    let Ok(Ok(io)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await else {
                        return;
                    };
                    let cut = Box::pin(async move {
                        let _ = cut_rx.wait_for(|cut| *cut).await;
                    });
                    let _ = ready.send(Ok(Severable { io, cut, severed: false })).await;
                });
            }
        });
        let service = AgentServer::new(self.agent.clone());
        let serving = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_service(service)
                .serve_with_incoming(ReceiverStream::new(incoming))
                .await;
        });
        self.up = Some(Up { cut, accepting, serving });
    }

    /// Closes the port and cuts every open connection: the controller's calls and streams fail
    /// at once, and new connections are refused until `bring_up`.
    pub fn take_down(&mut self) {
        if let Some(up) = self.up.take() {
            up.accepting.abort();
            up.serving.abort();
            let _ = up.cut.send(true);
        }
    }

    /// Listens again on the same address.
    pub async fn bring_up(&mut self) -> Result<(), FleetError> {
        if self.up.is_some() {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind(self.addr).await.map_err(FleetError::Bind)?;
        self.serve(listener);
        Ok(())
    }
}

impl Drop for AgentPort {
    fn drop(&mut self) {
        self.take_down();
    }
}
