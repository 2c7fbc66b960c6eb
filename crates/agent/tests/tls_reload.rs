//! A renewed certificate is served without a restart: the agent's gRPC API follows its TLS
//! files, new connections get the new certificate, half a renewal keeps the old one, and the
//! certificate's expiry is a metric.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use metalkube_agent::control::desired_store::DesiredStore;
use metalkube_agent::control::grpc::{AgentService, serve_grpc_tls};
use metalkube_agent::install::enrollment::EnrollmentFiles;
use metalkube_agent::tls::{ServerTls, TlsFiles};
use metalkube_api::bundle::{AgentBundle, AgentSettings, AgentTls};
use metalkube_proto::agent_client::AgentClient;
use metalkube_proto::{self as pb};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{GUARD, Harness};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA that issues leaves with a chosen expiry, so each certificate is told apart by it.
struct Ca {
    cert: String,
    issuer: Issuer<'static, KeyPair>,
}

struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "metalkube");
        let cert = params.self_signed(&key).unwrap().pem();
        Self { cert, issuer: Issuer::new(params, key) }
    }

    fn leaf(&self, name: &str, usage: ExtendedKeyUsagePurpose, expires_year: i32) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.not_after = rcgen::date_time_ymd(expires_year, 1, 1);
        Leaf { cert: params.signed_by(&key, &self.issuer).unwrap().pem(), key: key.serialize_pem() }
    }

    fn server(&self, expires_year: i32) -> Leaf {
        self.leaf("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth, expires_year)
    }
}

fn bundle(ca: &Ca, leaf: &Leaf) -> AgentBundle {
    AgentBundle {
        agent: AgentSettings {
            node_name: "mac-01".into(),
            grpc_listen: "127.0.0.1:9443".parse().unwrap(),
            serving_host: "127.0.0.1".parse().unwrap(),
            serving_address: "127.0.0.1".into(),
            memory_budget_bytes: None,
        },
        tls: AgentTls { certificate: leaf.cert.clone(), private_key: leaf.key.clone(), client_ca: ca.cert.clone() },
    }
}

/// The certificate the agent presents to a client with `client`'s identity, from a fresh TLS
/// handshake.
async fn served_certificate(addr: std::net::SocketAddr, ca: &Ca, client: &Leaf) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert.as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(client.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(client.key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

fn expiry_line(metrics: &str) -> Option<&str> {
    metrics.lines().find(|l| l.starts_with("metalkube_agent_tls_certificate_expiry_timestamp_seconds "))
}

async fn info(addr: std::net::SocketAddr, ca: &Ca, client: &Leaf) -> pb::InfoResponse {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.cert))
        .identity(Identity::from_pem(&client.cert, &client.key))
        .domain_name("127.0.0.1");
    let channel =
        Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    AgentClient::new(channel).info(pb::InfoRequest {}).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let h = Harness::new("/nonexistent/llama-server".into()).await;
    let ca = Ca::new();
    let controller = ca.leaf("metalkube-controller", ExtendedKeyUsagePurpose::ClientAuth, 2040);
    let (first, second, third) = (ca.server(2035), ca.server(2036), ca.server(2037));
    // The files as `join` writes them.
    let files = EnrollmentFiles::new(h.dir.path().join("enrolled"));
    files.install(&bundle(&ca, &first)).unwrap();
    let tls_files = TlsFiles { cert: files.certificate(), key: files.private_key(), client_ca: files.client_ca() };
    assert!(expiry_line(&h.metrics().await).is_none(), "no series before a certificate is served");
    let tls = ServerTls::follow_files(tls_files, h.agent.context().metrics.registry.clone()).unwrap();

    let store = Arc::new(DesiredStore::open(&h.dir.path().join("state/desired")).unwrap());
    let service = AgentService::start(h.agent.clone(), store, 1 << 30).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_grpc_tls(service, listener, tls, std::future::pending()));

    assert_eq!(served_certificate(addr, &ca, &controller).await, der(&first.cert));
    assert_eq!(info(addr, &ca, &controller).await.agent_version, env!("CARGO_PKG_VERSION"));
    // 2035-01-01T00:00:00Z
    assert_eq!(
        expiry_line(&h.metrics().await),
        Some("metalkube_agent_tls_certificate_expiry_timestamp_seconds 2051222400")
    );

    // The renewal: a second join writes new files while the agent runs.
    files.install(&bundle(&ca, &second)).unwrap();
    let deadline = Instant::now() + GUARD;
    while served_certificate(addr, &ca, &controller).await != der(&second.cert) {
        assert!(Instant::now() < deadline, "the renewed certificate was not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(info(addr, &ca, &controller).await.agent_version, env!("CARGO_PKG_VERSION"), "and gRPC works over it");
    // 2036-01-01T00:00:00Z
    assert_eq!(
        expiry_line(&h.metrics().await),
        Some("metalkube_agent_tls_certificate_expiry_timestamp_seconds 2082758400")
    );

    // Half a renewal (the certificate without its key) keeps the working pair...
    std::fs::write(files.certificate(), &third.cert).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(served_certificate(addr, &ca, &controller).await, der(&second.cert));
    // ...until the key arrives.
    std::fs::write(files.private_key(), &third.key).unwrap();
    while served_certificate(addr, &ca, &controller).await != der(&third.cert) {
        assert!(Instant::now() < deadline, "the completed renewal was not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Clients from another CA are still refused.
    let stranger = Ca::new();
    let intruder = stranger.leaf("intruder", ExtendedKeyUsagePurpose::ClientAuth, 2040);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.cert))
        .identity(Identity::from_pem(&intruder.cert, &intruder.key))
        .domain_name("127.0.0.1");
    let refused = async {
        let channel =
            Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap().connect().await?;
        AgentClient::new(channel).info(pb::InfoRequest {}).await.map_err(anyhow::Error::from)?;
        anyhow::Ok(())
    };
    assert!(refused.await.is_err(), "a client certificate from another CA is refused");
}
