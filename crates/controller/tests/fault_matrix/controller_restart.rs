//! A controller restart (row 9): killed hard under load, a new controller leads and reconciles,
//! and no condition or endpoint moves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use metalkube_api::{MetalModel, MetalNode};
use metalkube_testkit::apiserver::TestApiServer;
use serde_json::Value;

use crate::clients::Load;
use crate::cluster::{Cluster, MODELS_NS, metric_sum};
use crate::row::{Row, bounded, chat_url, secs};
use crate::support::CONTROLLER_TOKEN;

/// Records every change of what clients and operators rely on: each MetalModel's and
/// MetalNode's conditions (with their transition times) and ready replicas, and each
/// EndpointSlice's endpoints.
struct Observer {
    changes: Arc<Mutex<Vec<(Instant, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn conditions_signature(v: &Value) -> String {
    let mut conditions: Vec<String> = v["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    format!(
                        "{}={}/{} since {}",
                        c["type"].as_str().unwrap_or_default(),
                        c["status"].as_str().unwrap_or_default(),
                        c["reason"].as_str().unwrap_or_default(),
                        c["lastTransitionTime"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    conditions.sort();
    format!("{} readyReplicas={}", conditions.join(", "), v["status"]["readyReplicas"])
}

fn slice_signature(s: &EndpointSlice) -> String {
    let port = s.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port).unwrap_or(0);
    let endpoints: Vec<String> = s
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            format!(
                "{}:{port} ready={:?} serving={:?} terminating={:?}",
                e.addresses.join(","),
                c.ready,
                c.serving,
                c.terminating
            )
        })
        .collect();
    endpoints.join("; ")
}

impl Observer {
    fn start(client: &Client) -> Self {
        let changes: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let record = |changes: Arc<Mutex<Vec<(Instant, String)>>>| {
            let mut last: BTreeMap<String, String> = BTreeMap::new();
            move |what: String, signature: String| {
                if last.get(&what) != Some(&signature) {
                    changes.lock().unwrap().push((Instant::now(), format!("{what}: {signature}")));
                    last.insert(what, signature);
                }
            }
        };
        let models: Api<MetalModel> = Api::namespaced(client.clone(), MODELS_NS);
        let mut on_model = record(changes.clone());
        let a = tokio::spawn(async move {
            let mut s = std::pin::pin!(watcher(models, watcher::Config::default()).default_backoff().touched_objects());
            while let Some(m) = s.next().await {
                let Ok(m) = m else { continue };
                on_model(
                    format!("MetalModel {}", m.name_any()),
                    conditions_signature(&serde_json::to_value(&m).unwrap()),
                );
            }
        });
        let nodes: Api<MetalNode> = Api::all(client.clone());
        let mut on_node = record(changes.clone());
        let b = tokio::spawn(async move {
            let mut s = std::pin::pin!(watcher(nodes, watcher::Config::default()).default_backoff().touched_objects());
            while let Some(n) = s.next().await {
                let Ok(n) = n else { continue };
                on_node(
                    format!("MetalNode {}", n.name_any()),
                    conditions_signature(&serde_json::to_value(&n).unwrap()),
                );
            }
        });
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), MODELS_NS);
        let mut on_slice = record(changes.clone());
        let c = tokio::spawn(async move {
            let mut s = std::pin::pin!(watcher(slices, watcher::Config::default()).default_backoff());
            while let Some(event) = s.next().await {
                match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        on_slice(format!("EndpointSlice {}", s.name_any()), slice_signature(&s));
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        on_slice(format!("EndpointSlice {}", s.name_any()), "deleted".into())
                    }
                    _ => {}
                }
            }
        });
        Self { changes, tasks: vec![a, b, c] }
    }

    fn seen(&self, what: &str) -> bool {
        self.changes.lock().unwrap().iter().any(|(_, c)| c.starts_with(what))
    }

    fn since(&self, t: Instant) -> Vec<String> {
        self.changes.lock().unwrap().iter().filter(|(at, _)| *at >= t).map(|(_, c)| c.clone()).collect()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// MetalModel status writes the controller made so far.
fn status_writes(server: &TestApiServer) -> usize {
    let requests = server.requests();
    let writes = requests.iter().filter(|r| {
        (r.verb, r.resource, r.subresource, r.user.as_deref())
            == ("patch", "metalmodels", "status", Some(CONTROLLER_TOKEN))
    });
    writes.count()
}

pub async fn controller_restart(row: Row) {
    let mut cluster = Cluster::start(&row, "127.0.0.9").await;
    let port = cluster.create_model("tiny").await;
    cluster.wait_ready("tiny", port).await;
    let observer = Observer::start(&cluster.client);
    bounded("the observer's first look", || async {
        (observer.seen("MetalModel tiny") && observer.seen("EndpointSlice tiny") && observer.seen("MetalNode"))
            .then_some(())
    })
    .await;
    let (loaded, writes_before) = (Instant::now(), status_writes(&cluster.server));
    let load = Load::start(&chat_url(&cluster.mac.ip, port), &row.tally, 2);
    row.tally.completions_since(Instant::now(), 5, "five completions before the fault").await;

    // A hard stop: no lease handed over, no goodbye to the agent.
    let killed = Instant::now();
    cluster.controller.as_mut().unwrap().kill();
    cluster.start_controller();
    let streaming = bounded("the new controller leading, with the agent's stream up", || async {
        let text = cluster.controller_metrics().await?;
        (metric_sum(&text, "metalkube_controller_leader ") == 1.0
            && metric_sum(&text, "metalkube_controller_agent_stream_up{") == 1.0)
            .then(|| metric_sum(&text, "metalkube_controller_reconciles_total{result=\"ok\"}"))
    })
    .await;
    // A reconcile that began after the stream was up saw everything the old controller saw.
    bounded("a full reconcile by the new controller", || async {
        let text = cluster.controller_metrics().await?;
        (metric_sum(&text, "metalkube_controller_reconciles_total{result=\"ok\"}") > streaming).then_some(())
    })
    .await;
    let took = killed.elapsed();
    row.tally.completions_since(Instant::now(), 5, "completions after the new controller reconciled").await;
    load.stop().await;
    row.note(format!(
        "status writes of one model under load: {} in {} (pulse every 0.5 s)",
        status_writes(&cluster.server) - writes_before,
        secs(loaded.elapsed())
    ));
    let moved = observer.since(killed);
    row.note(format!("changes after the restart: {moved:?}"));
    assert!(moved.is_empty(), "a controller restart must not move conditions or endpoints: {moved:#?}");
    let counts = row.tally.counts();
    assert_eq!(counts.definite, 0, "no request failed: {:?}", counts.kinds);
    drop(cluster);
    row.summarize(format!("SIGKILL + start; new leader reconciled after {}; nothing moved", secs(took)));
}
