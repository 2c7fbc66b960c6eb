//! Losing the agent (rows 6 and 7): killed mid-stream, it comes back serving from its desired
//! store and reaps the engine it left; stopped, it drains what is in flight first.

use std::time::Instant;

use metalkube_controller::fleet::agent_client::{AgentClient, ClientSettings, ClientTls};
use metalkube_proto as pb;
use metalkube_testkit::pki::TestCa;
use metalkube_testkit::processes::{is_running, signal};
use nix::sys::signal::Signal;

use crate::clients::{Exchange, Load, Outcome, Victim, http_client, kind};
use crate::row::{Pulse, Row, bounded, chat_url, file_source, secs, spec};
use crate::standalone::{AgentOpts, pid_of, serving, serving_tiny, wait_model};
use crate::support::{Mac, free_port};

// --- row 6 ----------------------------------------------------------------------------------

pub async fn agent_sigkill(row: Row) {
    let (agent_ca, controller_ca) = (TestCa::new("fault matrix agents"), TestCa::new("fault matrix controller"));
    let (first, last) = row.engine_ports();
    let mut mac = Mac::new("fm-mac6", "127.0.0.6", &format!("{first}-{last}"), row.path(), &agent_ca, &controller_ca);
    row.show_log(mac.log());
    mac.start();
    let api = format!("http://{}:{}", mac.ip, mac.http_port);
    bounded("the agent up", || async {
        http_client().get(format!("{api}/healthz")).send().await.ok()?.status().is_success().then_some(())
    })
    .await;
    // The controller's own client tells the agent what to serve, once; no controller runs.
    let identity = controller_ca.client("metalkube-controller");
    let settings = ClientSettings {
        tls: Some(ClientTls { ca_pem: agent_ca.cert_pem.clone(), cert_pem: identity.cert, key_pem: identity.key }),
        ..ClientSettings::default()
    };
    let grpc =
        AgentClient::new("fm-mac6", &mac.endpoint(), &settings, metalkube_controller::metrics::Metrics::new()).unwrap();
    let model = row.tiny_model("tiny");
    let port = free_port(&mac.ip);
    grpc.ensure_model(pb::EnsureModelRequest {
        model: Some(pb::ModelRef { namespace: "default".into(), name: "tiny".into() }),
        uid: "fault-matrix-row-6".into(),
        generation: 1,
        spec_json: spec(&file_source(&model), port, Pulse::Calm, "3s").to_string(),
        api_key_sha256: Vec::new(),
        hub_token: String::new(),
    })
    .await
    .unwrap();
    let before = wait_model(&api, "tiny", "serving", serving).await;
    let old = pid_of(&before).unwrap();
    let url = chat_url(&mac.ip, port);
    let load = Load::start(&url, &row.tally, 3);
    row.tally.completions_since(Instant::now(), 5, "five completions before the fault").await;
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    let killed = Instant::now();
    mac.proc.as_mut().unwrap().kill();
    let outcome = victim.outcome().await;
    row.note(format!("the stream in flight: {outcome:?}"));
    assert!(matches!(outcome, Outcome::Definite(_)), "the client of a dead agent knows at once");
    let engine_outlived_agent = is_running(old);
    row.note(format!("engine {old} still running after the agent died: {engine_outlived_agent}"));

    mac.start();
    let after = wait_model(&api, "tiny", "serving again, from its desired store", |m| {
        serving(m) && pid_of(m).is_some_and(|p| p != old)
    })
    .await;
    let back = killed.elapsed();
    assert!(!is_running(old), "the engine the dead agent left was stopped");
    let engines = row.engines();
    assert_eq!(engines, [pid_of(&after).unwrap()], "exactly one engine after the restart");
    if engine_outlived_agent {
        let log = std::fs::read_to_string(mac.log()).unwrap();
        assert!(log.contains("stopped engines left by a previous agent run"), "the orphan was reaped at start");
    }
    row.tally.completions_since(Instant::now(), 5, "completions after the agent restart").await;
    load.stop().await;
    mac.proc.take().unwrap().stop();
    row.summarize(format!(
        "stream: {}; {}; serving again after {} (desired store)",
        kind(&outcome),
        if engine_outlived_agent { "old engine reaped at start" } else { "old engine gone with its pipe" },
        secs(back)
    ));
}

// --- row 7 ----------------------------------------------------------------------------------

pub async fn agent_sigterm(row: Row) {
    let opts = AgentOpts { drain_grace: Some("20s"), ..Default::default() };
    let (mut agent, _, load, url) = serving_tiny(&row, opts, Pulse::Calm, "3s", 3).await;
    let mut victim = Victim::start(&url, &row.tally);
    victim.flowing().await;
    let terminated = Instant::now();
    signal(agent.pid(), Signal::SIGTERM);
    let outcome = victim.outcome().await;
    let drained = terminated.elapsed();
    assert_eq!(outcome, Outcome::Completed, "a stream in flight finishes while the agent drains");
    let status = agent.exited().await;
    let gone = terminated.elapsed();
    assert!(status.success(), "{status}");
    load.stop().await;
    let exchanges = row.tally.exchanges();
    // Whatever had its answer under way when the signal came finished.
    let in_flight: Vec<&Exchange> =
        exchanges.iter().filter(|e| e.head.is_some_and(|(at, code)| at < terminated && code == 200)).collect();
    let unfinished: Vec<&&Exchange> = in_flight.iter().filter(|e| e.outcome != Outcome::Completed).collect();
    assert!(unfinished.is_empty(), "answers under way at SIGTERM that did not finish: {unfinished:#?}");
    let refused_while_draining = exchanges
        .iter()
        .filter(|e| e.sent >= terminated && e.outcome == Outcome::Definite("503 not_ready".into()))
        .count();
    row.note(format!("503 + Retry-After while draining: {refused_while_draining}"));
    assert!(refused_while_draining >= 1, "new requests were refused with 503 while the agent drained");
    let counts = row.tally.counts();
    assert!(
        counts.kinds.keys().all(|k| !k.contains("without Retry-After")),
        "every refusal says when to retry: {:?}",
        counts.kinds
    );
    row.summarize(format!(
        "stream completed ({}); 503+Retry-After ×{refused_while_draining} while draining; agent gone after {}",
        secs(drained),
        secs(gone)
    ));
}
