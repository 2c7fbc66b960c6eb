//! The controller-facing gRPC API over real mTLS: who may call it, what EnsureModel and Watch
//! do, and that desired state survives an agent restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use metalkube_api::ModelKey;
use std::sync::Arc;

use metalkube_agent::control::desired_store::DesiredStore;
use metalkube_agent::control::grpc::{AgentService, serve_grpc};
use metalkube_agent::tls::TlsPem;
use metalkube_proto::agent_client::AgentClient;
use metalkube_proto::{self as pb, watch_event::Event};
use metalkube_testkit::pki::{Pem, TestCa};
use support::{GUARD, Harness, is_running};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Served {
    addr: std::net::SocketAddr,
    ca: TestCa,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn serve(h: &Harness) -> Served {
    let ca = TestCa::new("metalkube test CA");
    let server = ca.server(&["localhost", "127.0.0.1"]);
    let store = Arc::new(DesiredStore::open(&h.dir.path().join("state/desired")).unwrap());
    let service = AgentService::start(h.agent.clone(), store, 1 << 30).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = TlsPem { cert_pem: server.cert, key_pem: server.key, client_ca_pem: ca.cert_pem.clone() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_grpc(service, listener, Some(tls), async move {
        let _ = stopped.await;
    }));
    Served { addr, ca, stop }
}

async fn connect(
    addr: std::net::SocketAddr,
    trust: &str,
    identity: Option<&Pem>,
) -> anyhow::Result<AgentClient<Channel>> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(trust)).domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect().await?;
    Ok(AgentClient::new(channel))
}

fn ensure(h: &Harness, name: &str, uid: &str, generation: i64) -> pb::EnsureModelRequest {
    let spec = h.desired(name, None).spec;
    pb::EnsureModelRequest {
        model: Some(pb::ModelRef { namespace: "default".into(), name: name.into() }),
        uid: uid.into(),
        generation,
        spec_json: serde_json::to_string(&spec).unwrap(),
        api_key_sha256: vec![],
        hub_token: String::new(),
    }
}

async fn next_event(stream: &mut tonic::Streaming<pb::WatchEvent>) -> Event {
    let msg = tokio::time::timeout(GUARD, stream.message()).await.expect("an event within the guard");
    msg.unwrap().expect("stream open").event.expect("an event")
}

#[tokio::test(flavor = "multi_thread")]
async fn ensure_watch_and_stop_over_mtls_on_the_real_engine() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let s = serve(&h).await;
    let controller = s.ca.client("metalkube-controller");
    let mut client = connect(s.addr, &s.ca.cert_pem, Some(&controller)).await.unwrap();

    let mut watch = client.watch(pb::WatchRequest { include_load: false }).await.unwrap().into_inner();
    assert_eq!(next_event(&mut watch).await, Event::Snapshot(pb::Snapshot { models: vec![] }));

    let first = client.ensure_model(ensure(&h, "grpc", "uid-1", 1)).await.unwrap().into_inner();
    assert!(first.changed);
    let serving = loop {
        if let Event::Changed(state) = next_event(&mut watch).await
            && state.ready
        {
            break state;
        }
    };
    assert_eq!(serving.model_phase(), Some(metalkube_api::Phase::Serving));
    assert_eq!((serving.uid.as_str(), serving.generation), ("uid-1", 1));
    assert!(serving.serving_port > 0);

    let again = client.ensure_model(ensure(&h, "grpc", "uid-1", 1)).await.unwrap().into_inner();
    assert!(!again.changed, "the same uid and generation change nothing");
    let older = client.ensure_model(ensure(&h, "grpc", "uid-1", 0)).await.unwrap().into_inner();
    assert!(!older.changed, "an older generation does not roll back");
    // A hub token whose Secret was made after the model: the same generation, and still news.
    let with_token = pb::EnsureModelRequest { hub_token: "hf_late".into(), ..ensure(&h, "grpc", "uid-1", 1) };
    let late = client.ensure_model(with_token.clone()).await.unwrap().into_inner();
    assert!(late.changed, "a token given late is taken");
    let state = late.state.unwrap();
    assert!(!state.hub_token_fingerprint.is_empty() && !format!("{state:?}").contains("hf_late"));
    assert_eq!(state.hub_token_fingerprint, metalkube_api::keys::token_fingerprint(Some("hf_late")));
    assert!(!client.ensure_model(with_token).await.unwrap().into_inner().changed, "the same token is no news");

    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(info.unified_memory_bytes > 0, "{info:?}");
    assert_eq!(info.models.len(), 1);
    let list = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    assert_eq!(list.models.len(), 1);

    let pid = h.agent.reports().await[0].health.pid.unwrap();
    assert!(
        client.stop_model(pb::StopModelRequest { model: serving.model.clone() }).await.unwrap().into_inner().stopped
    );
    loop {
        if let Event::Removed(m) = next_event(&mut watch).await {
            assert_eq!(Some(m), serving.model);
            break;
        }
    }
    assert!(!is_running(pid), "the engine is stopped");
    let _ = s.stop.send(());
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_certificate_or_from_another_ca_are_refused() {
    let h = Harness::new(metalkube_testkit::sim_engine()).await;
    let s = serve(&h).await;
    let no_cert = async {
        connect(s.addr, &s.ca.cert_pem, None).await?.info(pb::InfoRequest {}).await.map_err(anyhow::Error::from)
    };
    assert!(no_cert.await.is_err(), "no client certificate");

    let stranger_ca = TestCa::new("someone else");
    let stranger = stranger_ca.client("metalkube-controller");
    let wrong_ca = async {
        connect(s.addr, &s.ca.cert_pem, Some(&stranger))
            .await?
            .info(pb::InfoRequest {})
            .await
            .map_err(anyhow::Error::from)
    };
    assert!(wrong_ca.await.is_err(), "a client certificate from another CA");

    let good = s.ca.client("metalkube-controller");
    let mut client = connect(s.addr, &s.ca.cert_pem, Some(&good)).await.unwrap();
    assert!(client.info(pb::InfoRequest {}).await.is_ok(), "the right CA is accepted");
    let _ = s.stop.send(());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_routers_certificate_may_watch_and_read_but_not_change_models() {
    let h = Harness::new(metalkube_testkit::sim_engine()).await;
    let s = serve(&h).await;
    let router = s.ca.client(metalkube_api::ROUTER_IDENTITY);
    let mut client = connect(s.addr, &s.ca.cert_pem, Some(&router)).await.unwrap();
    assert!(client.info(pb::InfoRequest {}).await.is_ok());
    assert!(client.list_models(pb::ListModelsRequest {}).await.is_ok());
    let mut stream = client.watch(pb::WatchRequest { include_load: true }).await.unwrap().into_inner();
    assert!(matches!(next_event(&mut stream).await, Event::Snapshot(_)), "the router gets the Watch stream");
    let refused = client.ensure_model(ensure(&h, "r", "uid-r", 1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("metalkube-router"), "{}", refused.message());
    let stop = pb::StopModelRequest { model: Some(pb::ModelRef { namespace: "default".into(), name: "r".into() }) };
    assert_eq!(client.stop_model(stop).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    assert!(h.agent.reports().await.is_empty(), "nothing was started");

    let controller = s.ca.client("metalkube-controller");
    let mut client = connect(s.addr, &s.ca.cert_pem, Some(&controller)).await.unwrap();
    assert!(client.ensure_model(ensure(&h, "r", "uid-r", 1)).await.is_ok(), "the controller's certificate may");
    let _ = s.stop.send(());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_requests_say_which_field() {
    let h = Harness::new(metalkube_testkit::sim_engine()).await;
    let s = serve(&h).await;
    let mut client = connect(s.addr, &s.ca.cert_pem, Some(&s.ca.client("c"))).await.unwrap();
    let mut bad = ensure(&h, "bad", "u", 1);
    let mut spec = h.desired("bad", None).spec;
    spec.engine.extra_args = vec!["--port".into(), "1".into()];
    bad.spec_json = serde_json::to_string(&spec).unwrap();
    let err = client.ensure_model(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("spec.engine.extraArgs[0]"), "{}", err.message());

    let mut bad_name = ensure(&h, "x", "u", 1);
    bad_name.model = Some(pb::ModelRef { namespace: "default".into(), name: "Bad_Name".into() });
    let err = client.ensure_model(bad_name).await.unwrap_err();
    assert!(err.message().contains("model.name"), "{}", err.message());
    assert!(h.agent.reports().await.is_empty(), "nothing was started");
    let _ = s.stop.send(());
}

/// Keys travel as digests; a rotation with the same generation still reaches the serving port.
#[tokio::test(flavor = "multi_thread")]
async fn api_key_digests_guard_the_serving_port_and_rotate_without_a_new_generation() {
    let h = Harness::new(metalkube_testkit::sim_engine()).await;
    let s = serve(&h).await;
    let mut client = connect(s.addr, &s.ca.cert_pem, Some(&s.ca.client("c"))).await.unwrap();
    let keyed = |keys: &[&str]| {
        let mut req = ensure(&h, "keyed", "uid-k", 1);
        let mut spec = h.desired("keyed", None).spec;
        spec.auth = serde_json::from_value(serde_json::json!({"apiKeySecretRef": {"name": "s", "key": "k"}})).unwrap();
        req.spec_json = serde_json::to_string(&spec).unwrap();
        req.api_key_sha256 = keys.iter().map(|k| metalkube_api::keys::digest(k.as_bytes()).to_vec()).collect();
        req
    };
    client.ensure_model(keyed(&["one"])).await.unwrap();
    let r =
        h.wait_for(&ModelKey::new("default", "keyed"), "serving", |r| r.is_ready() && r.serving_port.is_some()).await;
    let url = format!("http://127.0.0.1:{}/completion", r.serving_port.unwrap());
    let http = reqwest::Client::new();
    let status = |key: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(&url)
                .bearer_auth(key)
                .json(&serde_json::json!({"prompt": "hi"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!((status("one").await, status("two").await), (200, 401));
    let fingerprint = |models: Vec<pb::ModelState>| models[0].api_keys_fingerprint.clone();
    let before = fingerprint(client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models);

    let rotated = client.ensure_model(keyed(&["two"])).await.unwrap().into_inner();
    assert!(rotated.changed, "new keys apply with the same uid and generation");
    assert_eq!((status("one").await, status("two").await), (401, 200));
    let after = fingerprint(client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models);
    assert_ne!(before, after);
    assert_eq!(after, metalkube_api::keys::fingerprint(&[metalkube_api::keys::digest(b"two")]));
    let stored = std::fs::read_to_string(h.dir.path().join("state/desired/default_keyed.json")).unwrap_or_default();
    assert!(!stored.contains("\"two\"") && stored.contains("api_key_sha256"), "digests only: {stored}");

    let mut bad = keyed(&["x"]);
    bad.api_key_sha256 = vec![vec![1, 2, 3]];
    let err = client.ensure_model(bad).await.unwrap_err();
    assert!(err.message().contains("32-byte SHA-256"), "{}", err.message());
    let _ = s.stop.send(());
}

#[tokio::test(flavor = "multi_thread")]
async fn desired_state_survives_an_agent_restart() {
    let h = Harness::new(metalkube_testkit::sim_engine()).await;
    let s = serve(&h).await;
    let mut client = connect(s.addr, &s.ca.cert_pem, Some(&s.ca.client("c"))).await.unwrap();
    client.ensure_model(ensure(&h, "kept", "uid-k", 3)).await.unwrap();
    h.wait_for(&ModelKey::new("default", "kept"), "serving", |r| r.is_ready()).await;
    let _ = s.stop.send(());
    h.agent.shutdown().await;

    // A new agent on the same state dir, and no controller: it serves what it was told before.
    let agent = metalkube_agent::Agent::start(h.agent.context().config.clone()).await.unwrap();
    let store = Arc::new(DesiredStore::open(&h.dir.path().join("state/desired")).unwrap());
    let _service = AgentService::start(agent.clone(), store, 0).await;
    let mut rx = agent.watch(&ModelKey::new("default", "kept")).await.expect("restored from the store");
    tokio::time::timeout(GUARD, rx.wait_for(|r| r.is_ready())).await.unwrap().unwrap();
    agent.shutdown().await;
}

/// A router asks for load: it gets each model's serving load (with its admission limit) at least
/// every half second, moving or not; a stream that did not ask (the controller's) hears nothing
/// while nothing but load could change.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_that_asks_for_load_gets_it_as_a_heartbeat_and_one_that_does_not_stays_quiet() {
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let s = serve(&h).await;
    let controller = s.ca.client("metalkube-controller");
    let mut client = connect(s.addr, &s.ca.cert_pem, Some(&controller)).await.unwrap();
    client.ensure_model(ensure(&h, "loaded", "uid-1", 1)).await.unwrap();
    let mut quiet = client.watch(pb::WatchRequest { include_load: false }).await.unwrap().into_inner();
    while !matches!(next_event(&mut quiet).await, Event::Changed(state) if state.ready) {}

    let mut loaded = client.watch(pb::WatchRequest { include_load: true }).await.unwrap().into_inner();
    assert!(matches!(next_event(&mut loaded).await, Event::Snapshot(_)));
    let started = std::time::Instant::now();
    let mut beats = 0;
    while started.elapsed() < std::time::Duration::from_secs(2) {
        if let Event::Changed(state) = next_event(&mut loaded).await {
            assert!(state.max_concurrent > 0, "the admission limit rides along: {state:?}");
            beats += 1;
        }
    }
    assert!(beats >= 3, "{beats} load events in 2 s: at least one every 500 ms");
    // The controller's stream hears only report changes: at most the one a pulse round may bring
    // (pulses come every 5 s), never the heartbeat.
    let mut spoken = 0;
    let quiet_until = tokio::time::Instant::now() + std::time::Duration::from_millis(1500);
    while let Ok(Ok(Some(_))) = tokio::time::timeout_at(quiet_until, quiet.message()).await {
        spoken += 1;
    }
    assert!(spoken <= 1, "{spoken} events in 1.5 s on the stream without load");
    let _ = s.stop.send(());
}
