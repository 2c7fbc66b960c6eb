//! The agent's HTTP port over a real socket: readiness, model JSON, and metrics that pass
//! promtool; its connection limits and time limits against idle and slow clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use metalkube_agent::http_port::guard::{AllowedHosts, ScrapeAuth};
use metalkube_agent::http_port::{HttpGuard, HttpPortOptions};
use metalkube_agent::model::api_keys::{ApiKeys, digests_of_key_lines};
use metalkube_agent::tls::{ServerTls, TlsFiles, TlsPurpose};
use metalkube_api::{ModelKey, Phase};
use metalkube_runtime::connections::ConnectionLimits;
use metalkube_runtime::http_port::PortSettings;
use metalkube_testkit::pki::{Pem, TestCa};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::{GUARD, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Serves the agent's HTTP port with `options` on a loopback port; its address.
async fn serve_http_with(h: &Harness, options: HttpPortOptions) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(metalkube_agent::http_port::serve_with(h.agent.clone(), listener, options, std::future::pending()));
    addr
}

fn limited(max: usize, max_per_client: usize, header_timeout: Duration) -> HttpPortOptions {
    HttpPortOptions {
        port: PortSettings { limits: ConnectionLimits { max, max_per_client }, header_timeout },
        ..HttpPortOptions::default()
    }
}

/// One request as raw bytes on a fresh connection: the whole response as text.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_until_closed(&mut s).await
}

/// A connection to `server` from the loopback address 127.0.0.`from` (Linux routes all of
/// 127/8 to the loopback interface, so each is a different client address).
async fn connect_from(from: u8, server: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, from)), 0)).unwrap();
    socket.connect(server).await.unwrap()
}

/// Sends one GET and reads until the server closes: the whole response as text.
async fn get_closing(mut s: TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until_closed(&mut s).await
}

/// Reads until the server closes the connection (a reset counts as closed too); what came.
async fn read_until_closed(s: &mut TcpStream) -> String {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(GUARD, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {GUARD:?}; got so far: {}",
        String::from_utf8_lossy(&raw)
    );
    String::from_utf8_lossy(&raw).into_owned()
}

async fn serve_http(h: &Harness) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(metalkube_agent::http_port::serve(h.agent.clone(), listener, std::future::pending()));
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_models_and_metrics_over_http() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let base = serve_http(&h).await;
    let missing = format!("file://{}/absent.gguf", h.dir.path().display());
    h.agent.apply(vec![h.desired("good", None), h.desired("bad", Some(&missing))]).await;
    h.wait_for(&ModelKey::new("default", "good"), "serving", |r| r.phase == Phase::Serving && r.last_pulse.is_some())
        .await;
    h.wait_for(&ModelKey::new("default", "bad"), "failed", |r| r.phase == Phase::Failed).await;

    assert_eq!(reqwest::get(format!("{base}/healthz")).await.unwrap().status(), 200);

    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503, "one model is failed");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["models"]["default/good"]["ready"], true, "{body}");
    assert_eq!(body["models"]["default/bad"]["phase"], "Failed", "{body}");
    assert!(body["models"]["default/bad"]["message"].as_str().unwrap().contains("absent.gguf"), "{body}");

    let models: serde_json::Value = reqwest::get(format!("{base}/api/v1/models")).await.unwrap().json().await.unwrap();
    let good = models["models"].as_array().unwrap().iter().find(|m| m["name"] == "good").unwrap();
    for field in ["phase", "grade", "lastPulse", "restarts", "internalPort"] {
        assert!(!good[field].is_null(), "{field} missing: {good}");
    }
    assert!(good["lastPulse"]["computeSeconds"].as_f64().unwrap() > 0.0, "{good}");

    // One model's readiness, for a load balancer in front of it alone.
    let good = reqwest::get(format!("{base}/readyz/default/good")).await.unwrap();
    assert_eq!(good.status(), 200);
    let good: serde_json::Value = good.json().await.unwrap();
    // The same JSON as its entry in /readyz (read a moment earlier: the grade may move).
    let entry = &body["models"]["default/good"];
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&good), keys(entry), "{good} vs {entry}");
    assert_eq!((&good["ready"], &good["phase"]), (&entry["ready"], &entry["phase"]), "{good}");
    let bad = reqwest::get(format!("{base}/readyz/default/bad")).await.unwrap();
    assert_eq!(bad.status(), 503);
    let bad: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(bad["phase"], "Failed", "{bad}");
    assert!(bad["message"].as_str().unwrap().contains("absent.gguf"), "{bad}");
    let unknown = reqwest::get(format!("{base}/readyz/default/nope")).await.unwrap();
    assert_eq!(unknown.status(), 404);
    let unknown: serde_json::Value = unknown.json().await.unwrap();
    assert!(unknown["error"].as_str().unwrap().contains("no model default/nope"), "{unknown}");

    h.agent.apply(vec![h.desired("good", None)]).await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200, "the failed model is gone");
    assert_eq!(reqwest::get(format!("{base}/readyz/default/bad")).await.unwrap().status(), 404, "gone");

    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert!(metrics.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = metrics.text().await.unwrap();
    for name in [
        "metalkube_agent_pulse_duration_seconds_bucket",
        "metalkube_agent_pulse_grade",
        "metalkube_agent_engine_up",
        "metalkube_agent_engine_phase",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(!text.contains(r#"model="default/bad""#), "series of removed models are dropped:\n{text}");
    metalkube_testkit::promtool::check_metrics(&text);
    h.agent.shutdown().await;
}

/// Idle connections beyond the limits: the address holding them is refused at once (a short
/// 503, never accepted and held) and other addresses keep getting in, until the port as a whole
/// is full. (A header timeout far longer than the test keeps every idle connection open.)
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_beyond_the_limits_are_refused_at_once_and_other_clients_get_in() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let addr = serve_http_with(&h, limited(6, 3, Duration::from_secs(600))).await;

    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect_from(1, addr).await);
    }
    let refused = get_closing(connect_from(1, addr).await, "/healthz").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "over the per-client limit: {refused}");
    assert!(refused.contains("--http-max-connections-per-client"), "{refused}");

    let other = get_closing(connect_from(2, addr).await, "/healthz").await;
    assert!(other.starts_with("HTTP/1.1 200") && other.ends_with("ok\n"), "another address gets in: {other}");

    for _ in 0..3 {
        idle.push(connect_from(3, addr).await);
    }
    let refused = get_closing(connect_from(4, addr).await, "/healthz").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "over the port's limit: {refused}");
    assert!(refused.contains("(--http-max-connections)"), "{refused}");
    let metrics = h.metrics().await;
    for line in [
        r#"metalkube_agent_http_connections_refused_total{reason="client_full"} 1"#,
        r#"metalkube_agent_http_connections_refused_total{reason="port_full"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    h.agent.shutdown().await;
}

/// A connection that never sends a byte, a kept-alive connection that sends no next request,
/// and a client that never finishes its request head are all cut after the header timeout;
/// their address, held at its limit meanwhile, is served again once they are gone.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_and_unfinished_heads_are_cut_after_the_header_timeout() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let addr = serve_http_with(&h, limited(64, 3, Duration::from_secs(1))).await;

    let mut silent = connect_from(1, addr).await;
    let mut kept = connect_from(1, addr).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut slow = connect_from(1, addr).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").await.unwrap();
    // The three hold their address's limit until the server cuts them.
    assert_eq!(read_until_closed(&mut silent).await, "", "closed without an answer");
    let answered = read_until_closed(&mut kept).await;
    assert!(
        answered.starts_with("HTTP/1.1 200") && answered.ends_with("ok\n"),
        "answered, then closed when idle: {answered}"
    );
    let cut = read_until_closed(&mut slow).await;
    assert!(!cut.contains(" 200 "), "an unfinished head is never served: {cut}");

    let served = get_closing(connect_from(1, addr).await, "/healthz").await;
    assert!(served.starts_with("HTTP/1.1 200"), "its places are free again: {served}");
    h.agent.shutdown().await;
}

/// DNS rebinding: a request naming a host that is not the agent's (not an IP address,
/// localhost or a name given with --http-allowed-host) gets 421 naming the flag, whether the
/// name is in `Host` or in an absolute request URI.
#[tokio::test(flavor = "multi_thread")]
async fn requests_naming_another_host_get_421_naming_the_flag() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let options = HttpPortOptions {
        guard: HttpGuard { hosts: AllowedHosts::new(["mac-01.lan".to_owned()]), ..HttpGuard::default() },
        ..HttpPortOptions::default()
    };
    let addr = serve_http_with(&h, options).await;
    let get = |target: &str, host: &str| format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");

    for host in ["evil.example", "evil.example:9090", "127.0.0.1.evil.example"] {
        for path in ["/api/v1/models", "/metrics", "/"] {
            let answer = exchange(addr, &get(path, host)).await;
            assert!(answer.starts_with("HTTP/1.1 421"), "{host} {path}: {answer}");
            assert!(answer.contains("--http-allowed-host"), "{answer}");
            assert!(!answer.contains("metalkube_agent_"), "nothing of the page: {answer}");
        }
    }
    let absolute = exchange(addr, &get("http://evil.example/api/v1/models", &addr.to_string())).await;
    assert!(absolute.starts_with("HTTP/1.1 421"), "{absolute}");

    let port = addr.port();
    for host in [addr.to_string(), format!("localhost:{port}"), format!("MAC-01.lan.:{port}"), "mac-01.lan".to_owned()]
    {
        let answer = exchange(addr, &get("/api/v1/models", &host)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
    h.agent.shutdown().await;
}

/// A TLS client of the agent's HTTP port trusting `ca`, presenting `identity` if any: one
/// request, the whole response (Err: the handshake failed), and the certificate served.
async fn tls_exchange(
    addr: SocketAddr,
    ca: &TestCa,
    identity: Option<&Pem>,
    request: &str,
) -> std::io::Result<(String, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap()).unwrap();
    let builder =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await?;
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    // A server that refuses the client's certificate says so at the first read (TLS 1.3).
    tokio::time::timeout(GUARD, tls.read_to_end(&mut raw)).await.unwrap()?;
    Ok((String::from_utf8_lossy(&raw).into_owned(), served))
}

/// Cluster mode: the port speaks TLS with the agent's certificate; /healthz answers anyone,
/// everything else needs the bearer token or a client certificate from the CA; a certificate
/// from another CA fails the handshake, and plain HTTP is not served.
#[tokio::test(flavor = "multi_thread")]
async fn the_tls_port_serves_the_agent_certificate_and_lets_in_scrapers_with_a_token_or_a_certificate() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let ca = TestCa::new("metalkube");
    let agent_cert = ca.server(&["127.0.0.1", "mac-01.lan"]);
    let tls_dir = h.dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let files =
        TlsFiles { cert: tls_dir.join("agent.crt"), key: tls_dir.join("agent.key"), client_ca: tls_dir.join("ca.crt") };
    std::fs::write(&files.cert, &agent_cert.cert).unwrap();
    std::fs::write(&files.key, &agent_cert.key).unwrap();
    std::fs::write(&files.client_ca, &ca.cert_pem).unwrap();
    let tls =
        ServerTls::follow_files_for(files, h.agent.context().metrics.registry.clone(), TlsPurpose::AgentHttp).unwrap();
    let options = HttpPortOptions {
        guard: HttpGuard {
            auth: ScrapeAuth {
                tokens: ApiKeys::Digests(digests_of_key_lines(b"scrape-token\n")),
                client_certificates: true,
            },
            ..HttpGuard::default()
        },
        tls: Some(tls),
        ..HttpPortOptions::default()
    };
    let addr = serve_http_with(&h, options).await;
    let get = |path: &str, token: Option<&str>| {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
    };

    let (healthz, served) = tls_exchange(addr, &ca, None, &get("/healthz", None)).await.unwrap();
    assert!(healthz.starts_with("HTTP/1.1 200") && healthz.ends_with("ok\n"), "{healthz}");
    assert_eq!(served, CertificateDer::from_pem_slice(agent_cert.cert.as_bytes()).unwrap().to_vec());

    for path in ["/metrics", "/api/v1/models", "/readyz", "/"] {
        let (denied, _) = tls_exchange(addr, &ca, None, &get(path, None)).await.unwrap();
        assert!(denied.starts_with("HTTP/1.1 401"), "{path}: {denied}");
        assert!(denied.to_ascii_lowercase().contains("www-authenticate: bearer"), "{denied}");
        assert!(denied.contains("--http-bearer-token-file") && denied.contains("--client-ca"), "{denied}");
        let (wrong, _) = tls_exchange(addr, &ca, None, &get(path, Some("guess"))).await.unwrap();
        assert!(wrong.starts_with("HTTP/1.1 401"), "{path}: {wrong}");
    }
    let (metrics, _) = tls_exchange(addr, &ca, None, &get("/metrics", Some("scrape-token"))).await.unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("metalkube_agent_build_info"), "{metrics}");

    let prometheus = ca.client("prometheus");
    let (models, _) = tls_exchange(addr, &ca, Some(&prometheus), &get("/api/v1/models", None)).await.unwrap();
    assert!(models.starts_with("HTTP/1.1 200"), "{models}");

    let stranger = TestCa::new("elsewhere").client("prometheus");
    let refused = tls_exchange(addr, &ca, Some(&stranger), &get("/api/v1/models", None)).await;
    assert!(refused.is_err(), "a certificate from another CA fails the handshake: {refused:?}");

    let plain = exchange(addr, &get("/metrics", Some("scrape-token"))).await;
    assert!(!plain.contains("200 OK") && !plain.contains("metalkube_agent_"), "plain HTTP is not served: {plain}");
    h.agent.shutdown().await;
}
