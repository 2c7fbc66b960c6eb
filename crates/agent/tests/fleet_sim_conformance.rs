//! The fleet benchmark's simulated agent (crates/fleet-bench) against this agent on the real
//! engine: the same requests, over the same gRPC API with mTLS, must give the controller the same
//! answers and the same Watch stream (phases, grades, readiness, what is known when), or what the
//! benchmark measures of the controller would not be what a real fleet makes it do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metalkube_agent::control::desired_store::DesiredStore;
use metalkube_agent::control::grpc::{AgentService, serve_grpc};
use metalkube_agent::tls::TlsPem;
use metalkube_fleetbench::agent_server::{AgentPort, ServerPem, tls_config};
use metalkube_fleetbench::agent_sim::{SimAgent, SimTiming};
use metalkube_proto::agent_client::AgentClient;
use metalkube_proto::{self as pb, watch_event::Event};
use metalkube_testkit::pki::TestCa;
use support::{GUARD, Harness};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// What the controller reads of one Watch message.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Snapshot(usize),
    Changed {
        phase: Option<metalkube_api::Phase>,
        grade: i32,
        ready: bool,
        generation: i64,
        sized: bool,
        port: bool,
        waiting: bool,
    },
    Removed,
}

fn seen(event: Event) -> Seen {
    match event {
        Event::Snapshot(s) => Seen::Snapshot(s.models.len()),
        Event::Changed(s) => Seen::Changed {
            phase: s.model_phase(),
            grade: s.grade,
            ready: s.ready,
            generation: s.generation,
            // While Pending, the serving port and the size come as the agent binds the port and
            // reads the file's header, each in a message of its own or folded into the next, as
            // timing has it: only from Starting on must both be known.
            sized: s.memory_bytes > 0 || s.model_phase() == Some(metalkube_api::Phase::Pending),
            port: s.serving_port > 0 || s.model_phase() == Some(metalkube_api::Phase::Pending),
            waiting: !s.last_error.is_empty(),
        },
        Event::Removed(_) => Seen::Removed,
    }
}

async fn connect(addr: SocketAddr, ca: &TestCa, controllers: &TestCa) -> AgentClient<Channel> {
    let id = controllers.client("metalkube-controller");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.cert_pem))
        .identity(Identity::from_pem(&id.cert, &id.key))
        .domain_name("127.0.0.1");
    let channel =
        Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    AgentClient::new(channel)
}

fn ensure(spec: &metalkube_api::MetalModelSpec, generation: i64) -> pb::EnsureModelRequest {
    pb::EnsureModelRequest {
        model: Some(pb::ModelRef { namespace: "default".into(), name: "conformance".into() }),
        uid: "uid-1".into(),
        generation,
        spec_json: serde_json::to_string(spec).unwrap(),
        api_key_sha256: vec![],
        hub_token: String::new(),
    }
}

/// Watch messages until `done` holds for one, consecutive repeats folded (a real engine's
/// timing may send a state twice, or Pending once per field it learns: the controller reads a
/// repeat as nothing new).
async fn until(watch: &mut tonic::Streaming<pb::WatchEvent>, done: impl Fn(&Seen) -> bool) -> Vec<Seen> {
    let mut out: Vec<Seen> = Vec::new();
    loop {
        let msg = tokio::time::timeout(GUARD, watch.message()).await.expect("an event within the guard");
        let s = seen(msg.unwrap().expect("stream open").event.expect("an event"));
        let finished = done(&s);
        // Within one phase, keep the state it settled in.
        let same_phase = |a: &Seen, b: &Seen| match (a, b) {
            (Seen::Changed { phase: p, generation: g, .. }, Seen::Changed { phase: q, generation: h, .. }) => {
                p == q && g == h
            }
            _ => a == b,
        };
        match out.last_mut() {
            Some(last) if same_phase(last, &s) => *last = s,
            _ => out.push(s),
        }
        if finished {
            return out;
        }
    }
}

fn serving_at(generation: i64) -> impl Fn(&Seen) -> bool {
    move |s| matches!(s, Seen::Changed { ready: true, generation: g, .. } if *g == generation)
}

/// One run of the script against an agent's API: everything the controller would read.
async fn script(mut client: AgentClient<Channel>, spec: &metalkube_api::MetalModelSpec) -> Vec<String> {
    let mut log = Vec::new();
    let mut watch = client.watch(pb::WatchRequest { include_load: false }).await.unwrap().into_inner();
    log.push(format!("{:?}", until(&mut watch, |_| true).await));

    let first = client.ensure_model(ensure(spec, 1)).await.unwrap().into_inner();
    log.push(format!("ensure 1 changed={}", first.changed));
    log.push(format!("{:?}", until(&mut watch, serving_at(1)).await));
    let again = client.ensure_model(ensure(spec, 1)).await.unwrap().into_inner();
    log.push(format!("ensure 1 again changed={}", again.changed));
    let older = client.ensure_model(ensure(spec, 0)).await.unwrap().into_inner();
    log.push(format!("ensure 0 changed={}", older.changed));

    // A change the engine does not need to restart for, then one it does.
    let mut pulse_changed = spec.clone();
    pulse_changed.pulse.interval = metalkube_api::Duration::from_secs(4);
    let second = client.ensure_model(ensure(&pulse_changed, 2)).await.unwrap().into_inner();
    log.push(format!("ensure 2 (pulse) changed={}", second.changed));
    log.push(format!("{:?}", until(&mut watch, serving_at(2)).await));
    let mut engine_changed = pulse_changed.clone();
    engine_changed.engine.context_size += 64;
    let third = client.ensure_model(ensure(&engine_changed, 3)).await.unwrap().into_inner();
    log.push(format!("ensure 3 (engine) changed={}", third.changed));
    log.push(format!("{:?}", until(&mut watch, serving_at(3)).await));

    let bad_spec = pb::EnsureModelRequest { spec_json: "{\"replicas\": \"two\"}".into(), ..ensure(spec, 4) };
    log.push(format!("bad spec: {:?}", client.ensure_model(bad_spec).await.unwrap_err().code()));
    let bad_digest = pb::EnsureModelRequest { api_key_sha256: vec![vec![1, 2, 3]], ..ensure(spec, 4) };
    log.push(format!("bad digest: {:?}", client.ensure_model(bad_digest).await.unwrap_err().code()));
    let nameless = pb::EnsureModelRequest { model: None, ..ensure(spec, 4) };
    assert_eq!(client.ensure_model(nameless).await.unwrap_err().code(), Code::InvalidArgument);

    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    log.push(format!("info: models={} budget>0={}", info.models.len(), info.memory_budget_bytes > 0));
    let model = Some(pb::ModelRef { namespace: "default".into(), name: "conformance".into() });
    let stopped = client.stop_model(pb::StopModelRequest { model: model.clone() }).await.unwrap().into_inner();
    log.push(format!("stop stopped={}", stopped.stopped));
    log.push(format!("{:?}", until(&mut watch, |s| *s == Seen::Removed).await));
    let again = client.stop_model(pb::StopModelRequest { model }).await.unwrap().into_inner();
    log.push(format!("stop again stopped={}", again.stopped));
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn the_simulated_agent_answers_and_streams_as_the_real_one_does() {
    let ca = TestCa::new("agents");
    let controllers = TestCa::new("controllers");
    let server = ca.server(&["127.0.0.1"]);

    // The real agent, on the real engine.
    let h = Harness::new(metalkube_testkit::real_engine()).await;
    let spec = h.desired("conformance", None).spec;
    let store = Arc::new(DesiredStore::open(&h.dir.path().join("state/desired")).unwrap());
    let service = AgentService::start(h.agent.clone(), store, 1 << 30).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let real_addr = listener.local_addr().unwrap();
    let tls = TlsPem {
        cert_pem: server.cert.clone(),
        key_pem: server.key.clone(),
        client_ca_pem: controllers.cert_pem.clone(),
    };
    tokio::spawn(serve_grpc(service, listener, Some(tls), std::future::pending()));
    let real = script(connect(real_addr, &ca, &controllers).await, &spec).await;

    // The simulated one: its timings need not match, its answers must.
    let size = std::fs::metadata(&h.model).unwrap().len();
    let timing = SimTiming {
        prepare: Duration::from_millis(50),
        start: Duration::from_millis(200),
        pulse_every: Duration::from_millis(100),
    };
    let sim = SimAgent::new("m3-max", 1 << 30, 9090, Arc::new(move |_| size), timing);
    let pem = ServerPem { cert: server.cert, key: server.key, client_ca: controllers.cert_pem.clone() };
    let port = AgentPort::start(sim, tls_config(&pem).unwrap()).await.unwrap();
    let simulated = script(connect(port.addr, &ca, &controllers).await, &spec).await;

    for (i, (r, s)) in real.iter().zip(&simulated).enumerate() {
        assert_eq!(r, s, "step {i} differs\nreal:      {real:#?}\nsimulated: {simulated:#?}");
    }
    assert_eq!(real.len(), simulated.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_simulated_agent_taken_down_cuts_its_streams_and_comes_back_on_the_same_address() {
    let ca = TestCa::new("agents");
    let controllers = TestCa::new("controllers");
    let server = ca.server(&["127.0.0.1"]);
    let sim = SimAgent::new("m3-max", 1 << 30, 9090, Arc::new(|_| 1 << 20), SimTiming::default());
    let pem = ServerPem { cert: server.cert, key: server.key, client_ca: controllers.cert_pem.clone() };
    let mut port = AgentPort::start(sim, tls_config(&pem).unwrap()).await.unwrap();
    let mut client = connect(port.addr, &ca, &controllers).await;
    let mut watch = client.watch(pb::WatchRequest { include_load: false }).await.unwrap().into_inner();
    assert_eq!(until(&mut watch, |_| true).await, vec![Seen::Snapshot(0)]);
    assert_eq!(port.agent().watchers(), 1);

    port.take_down();
    let ended = tokio::time::timeout(GUARD, watch.message()).await.expect("the stream ends at once");
    assert!(!matches!(ended, Ok(Some(_))), "no message after the cut: {ended:?}");
    assert!(tokio::net::TcpStream::connect(port.addr).await.is_err(), "the port refuses connections");
    let deadline = tokio::time::Instant::now() + GUARD;
    while port.agent().watchers() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the cut stream still counts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    port.bring_up().await.unwrap();
    let mut client = connect(port.addr, &ca, &controllers).await;
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.http_port, 9090);
}
