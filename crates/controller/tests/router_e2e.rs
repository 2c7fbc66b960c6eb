//! Routing end to end on loopback: the test API server, the `metalkube-controller` binary, three
//! `metalkube-agent serve` processes (mTLS, engine simulators) and the `metalkube-router` binary
//! following the cluster's MetalNodes with its own client certificate. A MetalModel with three
//! replicas routes through the router (the default from two replicas): its Service's slice lists
//! the router, and clients reach the model by the Service's name. Then one Mac is made slow and
//! takes less, another is stopped and is routed around before its pulse turns red; the timeline
//! is printed. Last, the router's API requests are checked against the chart's RBAC for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use metalkube_api::MetalModel;
use metalkube_testkit::apiserver::TestApiServer;
use metalkube_testkit::pki::TestCa;
use metalkube_testkit::sim::Fault;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{CONTROLLER_TOKEN, Mac, Proc, free_port, write_kubeconfig};

const ROUTER_TOKEN: &str = "metalkube-router";
const OWN_NS: &str = "metalkube-system";
const STEP: Duration = Duration::from_secs(90);

/// What happened when, relative to the start.
#[derive(Clone)]
struct Timeline {
    start: Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Timeline {
    fn note(&self, what: impl Into<String>) {
        let line = format!("{:>8.3} s  {}", self.start.elapsed().as_secs_f64(), what.into());
        println!("{line}");
        self.lines.lock().unwrap().push(line);
    }
}

async fn wait_for<F, Fut>(timeline: &Timeline, what: &str, logs: &[&Path], mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STEP;
    while !check().await {
        if Instant::now() > deadline {
            for log in logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                println!(
                    "--- {} (last lines)\n{}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            panic!("{what}: not within {STEP:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    timeline.note(what);
}

/// One completion through the router as a client of the model's Service: status, the Mac that
/// answered.
async fn ask(http: &reqwest::Client, router: u16, stream: bool) -> (u16, String) {
    let body = json!({"model": "anything", "prompt": "hi", "max_tokens": 8, "stream": stream});
    let sent = http
        .post(format!("http://127.0.0.1:{router}/v1/completions"))
        .header("host", "tiny.default.svc.cluster.local")
        .json(&body)
        .send()
        .await;
    let Ok(r) = sent else { return (0, String::new()) };
    let status = r.status().as_u16();
    let mac = r.headers().get("x-metalkube-replica").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let _ = r.bytes().await;
    (status, mac)
}

/// `clients` clients, each sending its next request when the last is answered, `each` times.
async fn load(http: &reqwest::Client, router: u16, clients: usize, each: usize) -> Vec<(u16, String, Duration)> {
    let start = Instant::now();
    let runs = (0..clients).map(|c| async move {
        let mut mine = Vec::new();
        for i in 0..each {
            let (status, mac) = ask(http, router, (c + i) % 2 == 0).await;
            mine.push((status, mac, start.elapsed()));
        }
        mine
    });
    futures::future::join_all(runs).await.into_iter().flatten().collect()
}

fn shares(results: &[(u16, String, Duration)]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for (status, mac, _) in results {
        *by.entry(format!("{status} {mac}")).or_insert(0) += 1;
    }
    by
}

/// The engine port the agent of `mac` reports for `tiny`.
async fn engine_port(mac: &Mac) -> Option<u16> {
    let body: Value =
        reqwest::get(format!("http://{}:{}/api/v1/models", mac.ip, mac.http_port)).await.ok()?.json().await.ok()?;
    body["models"].as_array()?.iter().find(|m| m["name"] == "tiny")?["internalPort"].as_u64().map(|p| p as u16)
}

fn condition(model: &MetalModel, type_: &str) -> Option<(String, String)> {
    let v = serde_json::to_value(model).ok()?;
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| (c["status"].as_str().unwrap_or("").to_owned(), c["reason"].as_str().unwrap_or("").to_owned()))
}

/// The router, as the chart runs it: following every MetalNode with its own identity.
fn start_router(dir: &Path, kubeconfig: &Path, ca: &TestCa, port: u16, http_port: u16) -> Proc {
    let pem = ca.client("metalkube-router");
    std::fs::write(dir.join("router.crt"), &pem.cert).unwrap();
    std::fs::write(dir.join("router.key"), &pem.key).unwrap();
    std::fs::write(dir.join("router-ca.crt"), &ca.cert_pem).unwrap();
    let log = std::fs::File::create(dir.join("router.log")).unwrap();
    let child = Command::new(metalkube_testkit::workspace_binary("metalkube-router", "metalkube-router"))
        .env("KUBECONFIG", kubeconfig)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--http-listen", &format!("127.0.0.1:{http_port}")])
        .arg("--agent-ca")
        .arg(dir.join("router-ca.crt"))
        .arg("--client-cert")
        .arg(dir.join("router.crt"))
        .arg("--client-key")
        .arg(dir.join("router.key"))
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(log)
        .spawn()
        .unwrap();
    Proc { child, name: "router".into() }
}

/// What Kubernetes publishes for the router's Deployment: its Service, and a slice naming its one
/// ready pod (here the router on loopback).
async fn publish_router(client: &Client, port: u16) {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "metalkube-router", "namespace": OWN_NS},
        "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": port}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), OWN_NS).create(&PostParams::default(), &service).await.unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "metalkube-router-abcde", "namespace": OWN_NS,
                     "labels": {"kubernetes.io/service-name": "metalkube-router"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), OWN_NS).create(&PostParams::default(), &slice).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_e2e() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let timeline = Timeline { start: Instant::now(), lines: Arc::default() };
    let server = TestApiServer::start().await;
    let client = server.client();
    let (kubeconfig, admin_kubeconfig, router_kubeconfig) =
        (dir.join("kubeconfig"), dir.join("admin-kubeconfig"), dir.join("router-kubeconfig"));
    write_kubeconfig(&kubeconfig, &server.url, CONTROLLER_TOKEN);
    write_kubeconfig(&admin_kubeconfig, &server.url, "e2e-admin");
    write_kubeconfig(&router_kubeconfig, &server.url, ROUTER_TOKEN);

    let ca = TestCa::new("metalkube-ca");
    let ca_secret = Secret {
        metadata: ObjectMeta { name: Some("metalkube-ca".into()), ..Default::default() },
        data: Some(
            [("tls.crt", &ca.cert_pem), ("tls.key", &ca.key_pem), ("ca.crt", &ca.cert_pem)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), OWN_NS).create(&PostParams::default(), &ca_secret).await.unwrap();

    timeline.note("three Macs enrolled, their agents started (engine simulator)");
    let mut macs = [
        Mac::new("mac-a", "127.0.0.2", "23200-23249", dir, &ca, &ca),
        Mac::new("mac-b", "127.0.0.3", "23250-23299", dir, &ca, &ca),
        Mac::new("mac-c", "127.0.0.4", "23300-23349", dir, &ca, &ca),
    ];
    for m in &mut macs {
        m.engine = Some(metalkube_testkit::sim_engine());
        let name = m.name.clone();
        m.enroll(&name, &admin_kubeconfig, OWN_NS, "metalkube-ca");
        m.start();
    }
    support::write_controller_tls(dir, &ca, &ca);
    let metrics_port = free_port("127.0.0.1");
    let args: Vec<&str> = support::FAST_TIMINGS
        .iter()
        .copied()
        .chain(["--namespace", OWN_NS, "--router-service", "metalkube-system/metalkube-router"])
        .collect();
    let _controller = support::start_controller(dir, &kubeconfig, metrics_port, &args);
    let (router_port, router_http) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let _router = start_router(dir, &router_kubeconfig, &ca, router_port, router_http);
    publish_router(&client, router_port).await;
    let logs = [dir.join("controller.log"), dir.join("router.log")];
    let logs: Vec<&Path> = logs.iter().map(|p| p.as_path()).collect();

    let model_path = metalkube_testkit::tiny_model(dir);
    let model: MetalModel = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {
            "model": {"source": format!("file://{}", model_path.display())},
            "replicas": 3,
            "engine": {"contextSize": 512, "gpuLayers": 0, "parallel": 4, "extraArgs": ["--threads", "1"]},
            "pulse": {"interval": "500ms", "timeout": "6s", "yellowAfter": "3s", "redAfter": "4s", "redStreak": 2}
        }
    }))
    .unwrap();
    let models: Api<MetalModel> = Api::namespaced(client.clone(), "default");
    models.create(&PostParams::default(), &model).await.unwrap();
    timeline.note("MetalModel default/tiny applied: 3 replicas, no routing field (Router from 2 replicas)");

    wait_for(&timeline, "tiny Ready, routed through the router (Routed True, ThroughRouter)", &logs, || {
        let models = models.clone();
        async move {
            let Ok(m) = models.get("tiny").await else { return false };
            condition(&m, "Ready").is_some_and(|(s, _)| s == "True")
                && condition(&m, "Routed").is_some_and(|(s, r)| s == "True" && r == "ThroughRouter")
        }
    })
    .await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice = slices
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=tiny"))
        .await
        .unwrap()
        .items
        .pop()
        .expect("the model's Service has a slice");
    let addresses: Vec<String> = slice.endpoints.iter().flatten().flat_map(|e| e.addresses.clone()).collect();
    let ports: Vec<i32> = slice.ports.iter().flatten().filter_map(|p| p.port).collect();
    assert_eq!(
        (addresses, ports),
        (vec!["127.0.0.1".to_owned()], vec![i32::from(router_port)]),
        "the Service reaches the router"
    );
    let http = reqwest::Client::new();
    wait_for(&timeline, "the router serves tiny on all three Macs", &logs, || {
        let http = http.clone();
        async move {
            let results = load(&http, router_port, 6, 2).await;
            let by = shares(&results);
            results.iter().all(|(s, _, _)| *s == 200) && by.len() == 3
        }
    })
    .await;

    let before = load(&http, router_port, 6, 6).await;
    timeline.note(format!("6 clients x 6 requests by the Service's name: {:?}", shares(&before)));
    assert!(before.iter().all(|(s, _, _)| *s == 200));

    // mac-b's engine becomes eight times slower than the others.
    for (m, latency_ms) in [(&macs[0], 50), (&macs[1], 400), (&macs[2], 50)] {
        let port = engine_port(m).await.expect("the engine's port");
        metalkube_testkit::set_fault(port, &Fault { latency_ms, ..Fault::default() }).await;
    }
    timeline.note("mac-b made slow: 400 ms a completion against 50 ms on mac-a and mac-c");
    let _ = load(&http, router_port, 6, 3).await; // the agents measure the new speeds
    let slow = load(&http, router_port, 5, 8).await;
    let by = shares(&slow);
    timeline.note(format!("5 clients x 8 requests: {by:?}"));
    let share = |mac: &str| slow.iter().filter(|(_, m, _)| m == mac).count();
    assert!(slow.iter().all(|(s, _, _)| *s == 200), "{by:?}");
    assert!(share("mac-b") * 2 < share("mac-a").min(share("mac-c")), "the slow Mac takes less: {by:?}");

    // mac-c's engine stops: the router sees its streams stall before the pulse turns red.
    let pid = support::Mac::engine_pid(&macs[2], "tiny").await.expect("mac-c's engine pid");
    metalkube_testkit::processes::signal(pid, Signal::SIGSTOP);
    let stopped = Instant::now();
    timeline.note("mac-c's engine stopped (SIGSTOP)");
    let after = load(&http, router_port, 6, 8).await;
    let late: Vec<_> = after.iter().filter(|(_, m, at)| m == "mac-c" && *at > Duration::from_secs(1)).collect();
    timeline.note(format!(
        "6 clients x 8 requests while mac-c is stopped: {:?}; answered by mac-c more than 1 s after: {}",
        shares(&after),
        late.len()
    ));
    let metrics = reqwest::get(format!("http://127.0.0.1:{router_http}/metrics")).await.unwrap().text().await.unwrap();
    let retried: Vec<&str> = metrics.lines().filter(|l| l.starts_with("metalkube_router_retries_total{")).collect();
    timeline.note(format!("requests caught on mac-c and tried again elsewhere: {retried:?}"));
    assert!(after.iter().all(|(s, _, _)| *s == 200), "no client gets an error: {:?}", shares(&after));
    assert!(late.is_empty(), "{late:?}");
    wait_for(&timeline, "mac-c's replica reported not ready by the controller (the pulse's verdict)", &logs, || {
        let models = models.clone();
        async move {
            let Ok(m) = models.get("tiny").await else { return false };
            let v = serde_json::to_value(&m).unwrap_or_default();
            v["status"]["replicas"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["node"] == "mac-c" && r["ready"] == false))
        }
    })
    .await;
    let last_c = after.iter().filter(|(_, m, _)| m == "mac-c").map(|(_, _, at)| *at).max();
    timeline.note(format!(
        "the pulse's verdict came {:.1} s after SIGSTOP; the router's last answer from mac-c: {}",
        stopped.elapsed().as_secs_f64(),
        last_c.map_or("none after SIGSTOP".to_owned(), |at| format!("{:.2} s after SIGSTOP", at.as_secs_f64()))
    ));
    metalkube_testkit::processes::signal(pid, Signal::SIGCONT);
    timeline.note("mac-c's engine resumed (SIGCONT)");
    wait_for(&timeline, "mac-c answers through the router again", &logs, || {
        let http = http.clone();
        async move { load(&http, router_port, 6, 2).await.iter().any(|(_, m, _)| m == "mac-c") }
    })
    .await;

    router_rbac_is_least_privilege(&server);
    println!("\ntimeline:\n{}", timeline.lines.lock().unwrap().join("\n"));
}

/// The chart's RBAC for the router against what it really asked: every request allowed, every
/// granted verb used.
fn router_rbac_is_least_privilege(server: &TestApiServer) {
    let manifests = metalkube_testkit::chart::render(
        "metalkube",
        OWN_NS,
        &[
            "--set",
            "tls.existingSecret=metalkube-controller-tls",
            "--set",
            "router.tls.existingSecret=metalkube-router-tls",
        ],
    );
    let account = metalkube_testkit::chart::documents(&manifests)
        .into_iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_owned))
        .find(|name| name.contains("router"))
        .expect("the chart renders the router's ServiceAccount");
    let grants = metalkube_testkit::rbac::grants(&manifests, OWN_NS, &account);
    let requests: Vec<_> = server.requests().into_iter().filter(|r| r.user.as_deref() == Some(ROUTER_TOKEN)).collect();
    assert!(!requests.is_empty(), "the router asked the API server for its MetalNodes");
    let denied = metalkube_testkit::rbac::denied(&grants, &requests);
    assert!(denied.is_empty(), "the chart's RBAC does not allow what the router did: {denied:#?}");
    let unused = metalkube_testkit::rbac::unused(&grants, &requests);
    assert!(unused.is_empty(), "the chart grants the router what it never used: {unused:#?}");
}
