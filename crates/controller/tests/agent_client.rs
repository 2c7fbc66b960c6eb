//! The controller's agent client against a real agent gRPC server: mTLS in both directions, and
//! the circuit breaker in front of an agent that does not answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use metalkube_agent::control::desired_store::DesiredStore;
use metalkube_agent::control::grpc::{AgentService, serve_grpc};
use metalkube_agent::engine::restart_backoff::BackoffConfig;
use metalkube_agent::serving::ClientTimeouts;
use metalkube_agent::tls::TlsPem;
use metalkube_agent::{Agent, AgentConfig};
use metalkube_controller::ControllerError;
use metalkube_controller::fleet::agent_client::{AgentClient, ClientSettings, ClientTls};
use metalkube_controller::metrics::Metrics;
use metalkube_testkit::pki::TestCa;

struct Pki {
    agents: TestCa,
    controllers: TestCa,
}

/// An agent with no models, serving its gRPC API with mTLS; returns its https:// endpoint.
async fn agent(dir: &std::path::Path, pki: &Pki) -> String {
    let agent = Agent::start(AgentConfig {
        engine_binary: Some("/nonexistent/llama-server".into()),
        state_dir: dir.join("state"),
        engine_ports: 24000..=24009,
        serving_ports: 24010..=24019,
        serving_host: std::net::Ipv4Addr::LOCALHOST.into(),
        drain_grace: Duration::from_secs(1),
        client_timeouts: ClientTimeouts {
            header: Duration::from_secs(2),
            body: Duration::from_secs(2),
            max_connections: 64,
            ..ClientTimeouts::default()
        },
        stop_grace: Duration::from_secs(1),
        backoff: BackoffConfig {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
            stable_after: Duration::from_secs(10),
        },
        memory_budget_bytes: Some(1 << 30),
        downloads: Default::default(),
    })
    .await
    .unwrap();
    let store = Arc::new(DesiredStore::open(&dir.join("state/desired")).unwrap());
    let service = AgentService::start(agent, store, 1 << 30).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = pki.agents.server(&["127.0.0.1"]);
    let tls = TlsPem { cert_pem: server.cert, key_pem: server.key, client_ca_pem: pki.controllers.cert_pem.clone() };
    tokio::spawn(serve_grpc(service, listener, Some(tls), std::future::pending()));
    format!("https://{addr}")
}

fn settings(ca: &TestCa, client: &TestCa) -> ClientSettings {
    let id = client.client("metalkube-controller");
    ClientSettings {
        tls: Some(ClientTls { ca_pem: ca.cert_pem.clone(), cert_pem: id.cert, key_pem: id.key }),
        call_timeout: Duration::from_secs(2),
        retries: 0,
        ..ClientSettings::default()
    }
}

#[tokio::test]
async fn mutual_tls_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki { agents: TestCa::new("agents"), controllers: TestCa::new("controllers") };
    let endpoint = agent(dir.path(), &pki).await;
    let metrics = Metrics::new();

    let good = AgentClient::new("mac", &endpoint, &settings(&pki.agents, &pki.controllers), metrics.clone()).unwrap();
    let info = good.info().await.unwrap();
    assert_eq!(info.capacity.memory_budget_bytes, 1 << 30);

    let stranger = TestCa::new("someone else");
    let untrusted_agent = AgentClient::new("mac", &endpoint, &settings(&stranger, &pki.controllers), metrics.clone());
    let err = untrusted_agent.unwrap().info().await.unwrap_err();
    assert!(matches!(err, ControllerError::AgentCall { .. }), "an agent certificate from another CA is refused: {err}");

    let foreign_client = AgentClient::new("mac", &endpoint, &settings(&pki.agents, &stranger), metrics.clone());
    let err = foreign_client.unwrap().info().await.unwrap_err();
    assert!(matches!(err, ControllerError::AgentCall { .. }), "the agent refuses a client from another CA: {err}");

    let plaintext =
        AgentClient::new("mac", &endpoint.replace("https", "http"), &settings(&pki.agents, &pki.controllers), metrics);
    assert!(matches!(plaintext, Err(ControllerError::EndpointScheme { .. })), "mTLS on means https:// only");
}

#[tokio::test]
async fn the_circuit_opens_after_consecutive_failures_and_probes_after_the_cooldown() {
    let pki = Pki { agents: TestCa::new("agents"), controllers: TestCa::new("controllers") };
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let settings = ClientSettings {
        breaker_threshold: 2,
        breaker_cooldown: Duration::from_millis(300),
        ..settings(&pki.agents, &pki.controllers)
    };
    let metrics = Metrics::new();
    let client = AgentClient::new("gone", &format!("https://127.0.0.1:{port}"), &settings, metrics.clone()).unwrap();
    for _ in 0..2 {
        assert!(matches!(client.info().await, Err(ControllerError::AgentCall { .. })));
    }
    let calls = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(r#"metalkube_controller_agent_calls_total{node="gone""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = calls(&metrics.encode());
    assert_eq!(before, 2);
    let refused = client.info().await.unwrap_err();
    assert!(matches!(refused, ControllerError::CircuitOpen { .. }), "{refused}");
    let text = metrics.encode();
    assert_eq!(calls(&text), before, "an open circuit refuses without calling the agent");
    assert!(text.contains(r#"metalkube_controller_agent_circuit_state{node="gone"} 2"#), "{text}");

    tokio::time::sleep(Duration::from_millis(350)).await;
    let probe = client.info().await.unwrap_err();
    assert!(matches!(probe, ControllerError::AgentCall { .. }), "after the cooldown one probe goes out: {probe}");
    assert!(matches!(client.info().await, Err(ControllerError::CircuitOpen { .. })), "a failed probe reopens it");
}
