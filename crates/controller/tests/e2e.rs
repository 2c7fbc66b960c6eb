//! End to end on loopback: an API server, the `metalkube-controller` binary, two
//! `metalkube-agent serve` processes on 127.0.0.2 and 127.0.0.3 with mTLS, and real llama-server
//! engines serving the tiny model. It walks the scenario of issue 4 (ready, a frozen engine, a
//! lost agent, a model that fits nowhere, deletion) and prints a timeline of every condition and
//! endpoint transition.
//!
//! `loopback_e2e` uses the in-process test API server and runs in `cargo xtask test` (and alone
//! with `cargo xtask e2e`). `real_cluster_e2e` runs the same scenario against the cluster in
//! `KUBECONFIG`; it is ignored by default and says so when KUBECONFIG is unset.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{CONTROLLER_TOKEN, Mac, free_port, write_kubeconfig};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::conditions;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use metalkube_api::{MetalModel, MetalNode};
use metalkube_testkit::apiserver::TestApiServer;
use metalkube_testkit::pki::TestCa;
use metalkube_testkit::processes::{processes_mentioning, signal};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const GRACE: Duration = Duration::from_secs(3);
/// Longest any step may take; a step that needs it is a failure, not a slow pass.
const STEP: Duration = Duration::from_secs(60);

/// When things happened, relative to the start, as they were seen through the API.
#[derive(Clone)]
struct Timeline {
    start: Instant,
    lines: Arc<Mutex<Vec<String>>>,
    /// Process logs, shown when a step fails.
    logs: Arc<Mutex<Vec<PathBuf>>>,
}

impl Timeline {
    fn new() -> Self {
        Self { start: Instant::now(), lines: Arc::default(), logs: Arc::default() }
    }
    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
    fn record(&self, what: String) {
        let line = format!("{:>8.3} s  {what}", self.elapsed());
        println!("{line}");
        self.lines.lock().unwrap().push(line);
    }
    fn step(&self, what: &str) {
        self.record(format!("== {what}"));
    }
    fn fail(&self, message: &str) -> ! {
        self.print();
        for log in self.logs.lock().unwrap().iter() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            println!("---- last lines of {} ----", log.display());
            for l in tail.iter().rev() {
                println!("{l}");
            }
        }
        panic!("{message}");
    }
    fn print(&self) {
        println!("\n---- e2e timeline ----");
        for l in self.lines.lock().unwrap().iter() {
            println!("{l}");
        }
        println!("---- end of timeline ----");
    }
}

fn conditions(obj: &Value) -> BTreeMap<String, String> {
    obj["status"]["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let t = c["type"].as_str().unwrap_or_default().to_owned();
                    (t, format!("{}/{}", c["status"].as_str().unwrap_or(""), c["reason"].as_str().unwrap_or("")))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn endpoint_states(slice: &EndpointSlice) -> BTreeMap<String, String> {
    let port = slice.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port).unwrap_or(0);
    slice
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            let flag = |b: Option<bool>, name: &str| if b == Some(true) { name.to_owned() } else { format!("!{name}") };
            (
                format!("{}:{port}", e.addresses.join(",")),
                format!(
                    "{} {} {}",
                    flag(c.ready, "ready"),
                    flag(c.serving, "serving"),
                    flag(c.terminating, "terminating")
                ),
            )
        })
        .collect()
}

/// Records every change of conditions (models, nodes) and endpoints into the timeline.
fn watch_into_timeline(client: Client, ns: &str, timeline: Timeline) -> Vec<tokio::task::JoinHandle<()>> {
    fn diff(timeline: &Timeline, what: &str, old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) {
        for (k, v) in new {
            if old.get(k) != Some(v) {
                timeline.record(format!("{what} {k}={v}"));
            }
        }
        for k in old.keys() {
            if !new.contains_key(k) {
                timeline.record(format!("{what} {k} gone"));
            }
        }
    }
    let models: Api<MetalModel> = Api::namespaced(client.clone(), ns);
    let nodes: Api<MetalNode> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::namespaced(client, ns);
    let t1 = timeline.clone();
    let a = tokio::spawn(async move {
        let mut seen: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut s = std::pin::pin!(watcher(models, watcher::Config::default()).default_backoff().touched_objects());
        while let Some(m) = s.next().await {
            let Ok(m) = m else { continue };
            let v = serde_json::to_value(&m).unwrap();
            let mut now = conditions(&v);
            now.insert("readyReplicas".into(), v["status"]["readyReplicas"].to_string());
            let old = seen.insert(m.name_any(), now.clone()).unwrap_or_default();
            diff(&t1, &format!("MetalModel {}", m.name_any()), &old, &now);
        }
    });
    let t2 = timeline.clone();
    let b = tokio::spawn(async move {
        let mut seen: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut s = std::pin::pin!(watcher(nodes, watcher::Config::default()).default_backoff().touched_objects());
        while let Some(n) = s.next().await {
            let Ok(n) = n else { continue };
            let now = conditions(&serde_json::to_value(&n).unwrap());
            let old = seen.insert(n.name_any(), now.clone()).unwrap_or_default();
            diff(&t2, &format!("MetalNode {}", n.name_any()), &old, &now);
        }
    });
    let t3 = timeline;
    let c = tokio::spawn(async move {
        let mut seen: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut s = std::pin::pin!(watcher(slices, watcher::Config::default()).default_backoff());
        while let Some(event) = s.next().await {
            let Ok(event) = event else { continue };
            match event {
                watcher::Event::Apply(slice) | watcher::Event::InitApply(slice) => {
                    let now = endpoint_states(&slice);
                    let old = seen.insert(slice.name_any(), now.clone()).unwrap_or_default();
                    diff(&t3, &format!("EndpointSlice {}", slice.name_any()), &old, &now);
                }
                watcher::Event::Delete(slice) => {
                    seen.remove(&slice.name_any());
                    t3.record(format!("EndpointSlice {} deleted", slice.name_any()));
                }
                _ => {}
            }
        }
    });
    vec![a, b, c]
}

async fn wait<T, F, Fut>(timeline: &Timeline, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = check().await {
            timeline.record(format!("ok: {what}"));
            return v;
        }
        if Instant::now() > deadline {
            timeline.fail(&format!("not {what} within {STEP:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(obj: &impl serde::Serialize, type_: &str) -> Option<(String, String)> {
    let v = serde_json::to_value(obj).ok()?;
    let c = v["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
    Some((c["status"].as_str()?.to_owned(), c["reason"].as_str()?.to_owned()))
}

fn is(c: Option<(String, String)>, status: &str, reason: &str) -> bool {
    c.is_some_and(|(s, r)| s == status && (reason.is_empty() || r == reason))
}

async fn endpoints(slices: &Api<EndpointSlice>, model: &str) -> BTreeMap<String, (bool, bool)> {
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={model}"));
    let mut out = BTreeMap::new();
    for s in slices.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        for e in s.endpoints.iter().flatten() {
            let c = e.conditions.clone().unwrap_or_default();
            out.insert(e.addresses.join(","), (c.ready == Some(true), c.serving == Some(true)));
        }
    }
    out
}

fn model_spec(source: &str, context_size: u32, replicas: u32) -> Value {
    json!({
        "model": {"source": source},
        "replicas": replicas,
        "engine": {"contextSize": context_size, "gpuLayers": 0, "parallel": 2,
                   "extraArgs": ["--threads", "1"], "startupTimeout": "60s"},
        "admission": {"queueDepth": 8, "queueTimeout": "10s", "maxRequestBytes": 1048576},
        "pulse": {"interval": "200ms", "timeout": "1s", "yellowAfter": "300ms", "redAfter": "600ms", "redStreak": 2}
    })
}

struct Cluster {
    client: Client,
    kubeconfig: PathBuf,
    /// The person's kubeconfig, which `kubectl metalkube enroll` runs with.
    admin_kubeconfig: PathBuf,
    /// Where the MetalModels live.
    namespace: String,
    /// The controller's own namespace (its Lease, the agents Service).
    controller_namespace: String,
    /// Suffix that keeps cluster-scoped names (MetalNodes) apart from other runs.
    suffix: String,
}

/// Each Mac the agents Service lists (by its MetalNode): (ready, HTTP port).
async fn agent_targets(slices: &Api<EndpointSlice>) -> BTreeMap<String, (bool, i32)> {
    let lp = ListParams::default().labels("kubernetes.io/service-name=metalkube-agents");
    let mut out = BTreeMap::new();
    for s in slices.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        let port = s.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port).unwrap_or(0);
        for e in s.endpoints.iter().flatten() {
            let node = e.target_ref.as_ref().and_then(|r| r.name.clone()).unwrap_or_default();
            out.insert(node, (e.conditions.as_ref().and_then(|c| c.ready) == Some(true), port));
        }
    }
    out
}

async fn scenario(cluster: &Cluster, dir: &Path) {
    let timeline = Timeline::new();
    let ns = cluster.namespace.clone();
    let own_ns = cluster.controller_namespace.clone();
    let client = cluster.client.clone();
    // One metalkube CA, as the chart makes it: it signs the controller's client certificate and,
    // through enrolment, every agent's serving certificate.
    let ca = TestCa::new("metalkube-ca");
    let ca_secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta { name: Some("metalkube-ca".into()), ..Default::default() },
        data: Some(
            [("tls.crt", &ca.cert_pem), ("tls.key", &ca.key_pem), ("ca.crt", &ca.cert_pem)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &own_ns)
        .create(&PostParams::default(), &ca_secret)
        .await
        .unwrap();
    let mut macs = [
        Mac::new("mac-a", "127.0.0.2", "23100-23149", dir, &ca, &ca),
        Mac::new("mac-b", "127.0.0.3", "23150-23199", dir, &ca, &ca),
    ];
    let model_path = metalkube_testkit::tiny_model(dir);
    let source = format!("file://{}", model_path.display());
    timeline.step("enroll two Macs: kubectl metalkube enroll, then metalkube-agent join --no-start");
    for m in &mut macs {
        let node = format!("{}{}", m.name, cluster.suffix);
        m.enroll(&node, &cluster.admin_kubeconfig, &own_ns, "metalkube-ca");
        timeline.logs.lock().unwrap().push(m.log());
        m.start();
    }
    support::write_controller_tls(dir, &ca, &ca);
    let metrics_port = free_port("127.0.0.1");
    timeline.logs.lock().unwrap().push(dir.join("controller.log"));
    let lease_name = format!("metalkube-e2e{}", cluster.suffix);
    let start_controller = || {
        let args: Vec<&str> = support::FAST_TIMINGS
            .iter()
            .copied()
            .chain(["--api-keys-resync", "1s", "--namespace", &own_ns, "--lease-name", &lease_name])
            .collect();
        support::start_controller(dir, &cluster.kubeconfig, metrics_port, &args)
    };
    let mut controller = start_controller();
    let watchers = watch_into_timeline(client.clone(), &ns, timeline.clone());

    let nodes: Api<MetalNode> = Api::all(client.clone());
    let models: Api<MetalModel> = Api::namespaced(client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let agent_slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &own_ns);
    let node_name = |m: &Mac| format!("{}{}", m.name, cluster.suffix);

    timeline.step("apply MetalModel tiny (replicas 2); the MetalNodes came from enroll");
    for m in &macs {
        let node = nodes.get(&node_name(m)).await.unwrap();
        assert_eq!(
            (node.spec.agent_endpoint.as_str(), node.spec.serving_address.as_str()),
            (m.endpoint().as_str(), m.ip.as_str())
        );
    }
    // tiny asks for API keys: the controller reads them from this Secret and gives the agents
    // their digests only.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let keys_secret = |keys: &str| k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta { name: Some("tiny-keys".into()), ..Default::default() },
        data: Some(BTreeMap::from([("keys".to_owned(), k8s_openapi::ByteString(keys.as_bytes().to_vec()))])),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &keys_secret("first-key\n")).await.unwrap();
    let mut tiny_spec = model_spec(&source, 512, 2);
    tiny_spec["auth"] = json!({"apiKeySecretRef": {"name": "tiny-keys", "key": "keys"}});
    let tiny: MetalModel = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
        "metadata": {"name": "tiny", "namespace": ns}, "spec": tiny_spec
    }))
    .unwrap();
    models.create(&PostParams::default(), &tiny).await.unwrap();
    wait(&timeline, "tiny Ready with two ready endpoints", || async {
        let m = models.get("tiny").await.ok()?;
        let eps = endpoints(&slices, "tiny").await;
        (is(condition(&m, "Ready"), "True", "AllReplicasReady")
            && eps.len() == 2
            && eps.values().all(|(ready, _)| *ready))
        .then_some(())
    })
    .await;
    for m in &macs {
        wait(&timeline, &format!("MetalNode {} Ready=True", m.name), || async {
            is(condition(&nodes.get(&node_name(m)).await.ok()?, "Ready"), "True", "AgentConnected").then_some(())
        })
        .await;
    }
    wait(&timeline, "the agents Service lists both Macs, ready, on their HTTP ports", || async {
        let targets = agent_targets(&agent_slices).await;
        let want: BTreeMap<String, (bool, i32)> =
            macs.iter().map(|m| (node_name(m), (true, i32::from(m.http_port)))).collect();
        (targets == want).then_some(())
    })
    .await;
    let status = models.get("tiny").await.unwrap().status.unwrap();
    let port = status.replicas.iter().find(|r| r.node == node_name(&macs[0])).and_then(|r| r.port).unwrap();
    let chat_url = format!("http://127.0.0.2:{port}/v1/chat/completions");
    let chat = |key: Option<&str>| {
        let mut req = reqwest::Client::new()
            .post(&chat_url)
            .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    assert_eq!(chat(None).await.unwrap().status(), 401, "tiny asks for a key");
    assert_eq!(chat(Some("wrong")).await.unwrap().status(), 401);
    let served: Value = chat(Some("first-key")).await.unwrap().json().await.unwrap();
    assert!(served["choices"][0]["message"]["content"].is_string(), "a completion through mac-a's endpoint: {served}");

    timeline.step("rotate tiny's API key in its Secret");
    secrets
        .replace("tiny-keys", &PostParams::default(), &{
            let mut s = keys_secret("second-key\n");
            s.metadata.resource_version = secrets.get("tiny-keys").await.unwrap().metadata.resource_version;
            s
        })
        .await
        .unwrap();
    wait(&timeline, "the new key is taken and the old one refused", || async {
        let new = chat(Some("second-key")).await.ok()?.status();
        let old = chat(Some("first-key")).await.ok()?.status();
        (new == 200 && old == 401).then_some(())
    })
    .await;

    timeline.step("SIGSTOP the engine on mac-a");
    let frozen = macs[0].engine_pid("tiny").await.expect("mac-a reports its engine pid");
    signal(frozen, Signal::SIGSTOP);
    wait(&timeline, "mac-a's endpoint not ready and tiny Degraded/PulseRed", || async {
        let m = models.get("tiny").await.ok()?;
        let eps = endpoints(&slices, "tiny").await;
        (eps.get("127.0.0.2").is_some_and(|(ready, _)| !ready) && is(condition(&m, "Degraded"), "True", "PulseRed"))
            .then_some(())
    })
    .await;
    wait(&timeline, "tiny Ready again on a new engine", || async {
        let m = models.get("tiny").await.ok()?;
        let eps = endpoints(&slices, "tiny").await;
        let fresh = macs[0].engine_pid("tiny").await.is_some_and(|p| p != frozen);
        (fresh && is(condition(&m, "Ready"), "True", "") && eps.values().all(|(r, _)| *r) && eps.len() == 2)
            .then_some(())
    })
    .await;
    let restarts = models.get("tiny").await.unwrap().status.unwrap().pulse.restarts;
    assert!(restarts >= 1, "the frozen engine was restarted: restarts={restarts}");

    timeline.step("SIGKILL the agent on mac-b");
    let killed_at = Instant::now();
    macs[1].proc.as_mut().unwrap().kill();
    let b = node_name(&macs[1]);
    wait(&timeline, "mac-b Ready=Unknown and its endpoint not ready", || async {
        let n = nodes.get(&b).await.ok()?;
        let eps = endpoints(&slices, "tiny").await;
        let scraped_as_down = agent_targets(&agent_slices).await.get(&b).is_some_and(|(ready, _)| !ready);
        (is(condition(&n, "Ready"), "Unknown", "AgentUnreachable")
            && eps.get("127.0.0.3").is_some_and(|(r, _)| !r)
            && scraped_as_down)
            .then_some(())
    })
    .await;
    let lost_after = killed_at.elapsed();
    let m = models.get("tiny").await.unwrap();
    assert!(is(condition(&m, "Degraded"), "True", "AgentUnreachable"), "{:?}", condition(&m, "Degraded"));
    // Never before the grace period ends (a blip must not pull endpoints), and soon after.
    assert!(
        lost_after >= GRACE && lost_after < GRACE + Duration::from_secs(3),
        "noticed {lost_after:?} after the kill; grace {GRACE:?}"
    );
    timeline.record(format!(
        "mac-b noticed unreachable {:.2} s after the kill (grace {GRACE:?})",
        lost_after.as_secs_f64()
    ));

    timeline.step("restart the agent on mac-b");
    macs[1].start();
    wait(&timeline, "tiny Ready with two ready endpoints again", || async {
        let m = models.get("tiny").await.ok()?;
        let n = nodes.get(&b).await.ok()?;
        let eps = endpoints(&slices, "tiny").await;
        let listed_ready = agent_targets(&agent_slices).await.get(&b).is_some_and(|(ready, _)| *ready);
        (is(condition(&m, "Ready"), "True", "")
            && is(condition(&n, "Ready"), "True", "AgentConnected")
            && eps.len() == 2
            && eps.values().all(|(r, _)| *r)
            && listed_ready)
            .then_some(())
    })
    .await;
    let engines = processes_mentioning(&model_path);
    assert_eq!(engines.len(), 2, "one engine per Mac after the agent restart, not a second one: {engines:?}");

    timeline.step("restart the controller");
    let quiet_from = timeline.lines.lock().unwrap().len();
    controller.stop();
    controller = start_controller();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &own_ns);
    wait(&timeline, "the new controller holds the lease and has seen both agents", || async {
        let holder = leases.get(&lease_name).await.ok()?.spec?.holder_identity?;
        let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.ok()?.text().await.ok()?;
        let up = text.lines().filter(|l| l.starts_with("metalkube_controller_agent_stream_up") && l.ends_with(" 1"));
        (!holder.is_empty() && up.count() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flips: Vec<String> = timeline.lines.lock().unwrap()[quiet_from..]
        .iter()
        .filter(|l| {
            !l.contains("ok: ") && (l.contains("EndpointSlice") || l.contains("MetalNode") || l.contains("Ready="))
        })
        .cloned()
        .collect();
    assert!(flips.is_empty(), "a controller restart must not touch healthy endpoints or conditions: {flips:?}");

    timeline.step("apply MetalModel huge (KV cache for 1M tokens, budget 400 MiB)");
    let huge: MetalModel = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
        "metadata": {"name": "huge", "namespace": ns}, "spec": model_spec(&source, 1 << 20, 1)
    }))
    .unwrap();
    models.create(&PostParams::default(), &huge).await.unwrap();
    let message = wait(&timeline, "huge Scheduled=False/InsufficientMemory", || async {
        let m = models.get("huge").await.ok()?;
        let v = serde_json::to_value(&m).ok()?;
        let c = v["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Scheduled")?.clone();
        (c["status"] == "False" && c["reason"] == "InsufficientMemory").then(|| c["message"].to_string())
    })
    .await;
    timeline.record(format!("huge: {message}"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flaps = timeline.lines.lock().unwrap().iter().filter(|l| l.contains("MetalModel huge Scheduled=")).count();
    assert_eq!(flaps, 2, "once known not to fit, huge stays unscheduled (no place-refuse-unschedule loop)");
    assert_eq!(processes_mentioning(&model_path).len(), 2, "huge never started an engine");
    let tiny_now = models.get("tiny").await.unwrap();
    assert!(is(condition(&tiny_now, "Ready"), "True", ""), "tiny unaffected");

    // A model placed before its size is known (it counts as 0 until an agent reads its header)
    // that fits a Mac alone but not beside tiny: its name sorts first, and still tiny, serving
    // there before it, keeps its place and the newcomer gives way.
    let tiny_bytes = tiny_now.status.as_ref().and_then(|s| s.memory_bytes).expect("tiny's memory is known");
    let header = metalkube_gguf::read_header(&model_path).unwrap();
    let bytes_at = |ctx: u64| metalkube_gguf::estimate_memory(&header, ctx).unwrap().total();
    let per_token = bytes_at(2) - bytes_at(1);
    let rival_ctx = (support::BUDGET_BYTES - bytes_at(0) - tiny_bytes / 2) / per_token;
    assert!(bytes_at(rival_ctx) <= support::BUDGET_BYTES && bytes_at(rival_ctx) + tiny_bytes > support::BUDGET_BYTES);
    timeline.step(&format!(
        "apply MetalModel a-rival: {} MiB, fits a Mac alone but not beside tiny",
        bytes_at(rival_ctx) >> 20
    ));
    let quiet_from = timeline.lines.lock().unwrap().len();
    let rival: MetalModel = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
        "metadata": {"name": "a-rival", "namespace": ns}, "spec": model_spec(&source, rival_ctx as u32, 1)
    }))
    .unwrap();
    models.create(&PostParams::default(), &rival).await.unwrap();
    let message = wait(&timeline, "a-rival Scheduled=False/InsufficientMemory", || async {
        let m = models.get("a-rival").await.ok()?;
        let v = serde_json::to_value(&m).ok()?;
        let c = v["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Scheduled")?.clone();
        (c["status"] == "False" && c["reason"] == "InsufficientMemory").then(|| c["message"].to_string())
    })
    .await;
    timeline.record(format!("a-rival: {message}"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tiny_moved: Vec<String> = timeline.lines.lock().unwrap()[quiet_from..]
        .iter()
        .filter(|l| l.contains("MetalModel tiny ") || l.contains("EndpointSlice tiny"))
        .cloned()
        .collect();
    assert!(tiny_moved.is_empty(), "a newcomer took tiny's place: {tiny_moved:?}");
    assert_eq!(processes_mentioning(&model_path).len(), 2, "a-rival waited for memory and never started an engine");
    models.delete("a-rival", &DeleteParams::default()).await.unwrap();

    timeline.step("scale tiny to 1 replica");
    let scale = json!({"spec": {"replicas": 1}});
    models.patch("tiny", &PatchParams::default(), &Patch::Merge(&scale)).await.unwrap();
    wait(&timeline, "tiny Ready with one endpoint and one engine", || async {
        let m = models.get("tiny").await.ok()?;
        let eps = endpoints(&slices, "tiny").await;
        (is(condition(&m, "Ready"), "True", "")
            && m.status.as_ref()?.replicas.len() == 1
            && eps.len() == 1
            && processes_mentioning(&model_path).len() == 1)
            .then_some(())
    })
    .await;

    let drained = timeline.lines.lock().unwrap().iter().any(|l| l.contains("=!ready serving terminating"));
    assert!(drained, "the leaving replica was published as terminating before it went");

    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: std::collections::BTreeSet<String> =
        events.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    timeline.record(format!("Events recorded: {reasons:?}"));
    for wanted in ["Scheduled", "PulseRed", "EngineRestarted", "AgentUnreachable", "FailedScheduling", "Unscheduled"] {
        assert!(reasons.contains(wanted), "no {wanted} event among {reasons:?}");
    }

    timeline.step("delete both models");
    for name in ["huge", "tiny"] {
        models.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait(&timeline, "models, Service and slices gone and no engine left", || async {
        let gone = models.list(&ListParams::default()).await.ok()?.items.is_empty();
        // The agents Service's slices stay: they list Macs, not models.
        let no_slices = slices.list(&ListParams::default().labels("metalkube.dev/model")).await.ok()?.items.is_empty();
        let no_service = services.get_opt("tiny").await.ok()?.is_none();
        (gone && no_slices && no_service && processes_mentioning(&model_path).is_empty()).then_some(())
    })
    .await;

    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.unwrap().text().await.unwrap();
    for needle in [
        "metalkube_controller_reconciles_total",
        "metalkube_controller_agent_stream_up{node=\"mac-a",
        "metalkube_controller_reconcile_duration_seconds_bucket",
        "metalkube_controller_leader 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
    metalkube_testkit::promtool::check_metrics(&metrics);

    controller.stop();
    for w in watchers {
        w.abort();
    }
    for m in &macs {
        let _ = nodes.delete(&node_name(m), &DeleteParams::default()).await;
    }
    timeline.print();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_e2e() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestApiServer::start().await;
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &server.url, CONTROLLER_TOKEN);
    let admin_kubeconfig = dir.path().join("admin-kubeconfig");
    write_kubeconfig(&admin_kubeconfig, &server.url, "e2e-admin");
    // Models in one namespace, the controller in another: the RBAC check then also proves which
    // grants must be cluster-wide and which the namespaced Role covers.
    let cluster = Cluster {
        client: server.client(),
        kubeconfig,
        admin_kubeconfig,
        namespace: "default".into(),
        controller_namespace: "metalkube-system".into(),
        suffix: String::new(),
    };
    scenario(&cluster, dir.path()).await;
    controller_rbac_is_least_privilege(&server, &cluster.controller_namespace);
}

/// The chart's RBAC against what the controller really asked for during the scenario: every
/// request allowed, every granted verb used.
fn controller_rbac_is_least_privilege(server: &TestApiServer, namespace: &str) {
    let manifests = metalkube_testkit::chart::render(
        "metalkube",
        namespace,
        &[
            "--set",
            "tls.existingSecret=metalkube-controller-tls",
            "--set",
            "router.tls.existingSecret=metalkube-router-tls",
        ],
    );
    let account = metalkube_testkit::chart::documents(&manifests)
        .into_iter()
        .find(|d| {
            d["kind"] == "ServiceAccount" && d["metadata"]["labels"]["app.kubernetes.io/name"] == "metalkube-controller"
        })
        .and_then(|d| d["metadata"]["name"].as_str().map(str::to_owned))
        .expect("the chart renders the controller's ServiceAccount");
    let grants = metalkube_testkit::rbac::grants(&manifests, namespace, &account);
    let requests: Vec<_> =
        server.requests().into_iter().filter(|r| r.user.as_deref() == Some(CONTROLLER_TOKEN)).collect();
    let distinct: std::collections::BTreeSet<String> = requests
        .iter()
        .map(|r| {
            format!(
                "{} {}/{}{}",
                r.verb,
                r.group,
                r.resource,
                if r.subresource.is_empty() { String::new() } else { format!("/{}", r.subresource) }
            )
        })
        .collect();
    println!("the controller made {} API requests of {} kinds: {distinct:#?}", requests.len(), distinct.len());
    let denied = metalkube_testkit::rbac::denied(&grants, &requests);
    assert!(denied.is_empty(), "the chart's RBAC does not allow what the controller did: {denied:#?}");
    let unused = metalkube_testkit::rbac::unused(&grants, &requests);
    assert!(unused.is_empty(), "the chart grants what the controller never used: {unused:#?}");
}

/// The same scenario against a real cluster. Agents still run here on loopback, so the
/// cluster must accept EndpointSlice addresses in 127.0.0.0/8 (kind and k3d do for slices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: KUBECONFIG=... cargo test -p metalkube-controller --test e2e -- --ignored"]
async fn real_cluster_e2e() {
    let Some(kubeconfig) = std::env::var_os("KUBECONFIG").map(PathBuf::from) else {
        println!("real_cluster_e2e skipped: KUBECONFIG is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let client = Client::try_default().await.expect("a client from KUBECONFIG");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for file in ["metalmodels.metalkube.dev.yaml", "metalnodes.metalkube.dev.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds").join(file);
        let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        crds.patch(&crd.name_any(), &PatchParams::apply("metalkube-e2e").force(), &Patch::Apply(&crd)).await.unwrap();
    }
    for name in ["metalmodels.metalkube.dev", "metalnodes.metalkube.dev"] {
        let established = kube::runtime::wait::await_condition(crds.clone(), name, conditions::is_crd_established());
        tokio::time::timeout(STEP, established).await.expect("CRD established in time").unwrap();
    }
    let suffix = format!("-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let namespace = format!("metalkube-e2e{suffix}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.unwrap();
    let cluster = Cluster {
        client,
        admin_kubeconfig: kubeconfig.clone(),
        kubeconfig,
        namespace: namespace.clone(),
        controller_namespace: namespace.clone(),
        suffix,
    };
    scenario(&cluster, dir.path()).await;
    let _ = namespaces.delete(&namespace, &DeleteParams::default()).await;
}
