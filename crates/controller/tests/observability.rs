//! The observability half, proven against a real Prometheus (Debian's 2.42): it discovers the
//! agent through the `metalkube-agents` EndpointSlice the real controller writes into the test
//! API server, with the chart's own ServiceMonitor turned into a scrape config the
//! way prometheus-operator does; scrapes the agent (real llama-server) and the controller while
//! traffic, a burst of refusals and a frozen engine play out; and evaluates the chart's alert
//! rules. Debian builds Prometheus without Kubernetes service discovery, so a small bridge here
//! serves those objects to Prometheus' HTTP service discovery with the same `__meta_kubernetes_*`
//! labels Kubernetes discovery gives (Prometheus 2.42's endpointslice role). The Endpoints
//! object the controller writes beside the slice (for prometheus-operator's default role) cannot
//! hold the loopback addresses the test Macs have, as Kubernetes refuses those there; its
//! content is unit-tested in `agent_endpoints.rs`. What is emulated, then, is prometheus-operator's translation of a ServiceMonitor
//! and Kubernetes discovery itself; the objects, relabelings, scrapes, queries and rules are real. Then every Grafana panel query and every alert expression goes through
//! Prometheus' HTTP API: any query error fails, and so does any panel query that returns no
//! series, except panels marked "macOS only:" (listed). The tables it prints are the record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kube::Api;
use kube::api::PostParams;
use metalkube_api::{MetalModel, MetalNode};
use metalkube_testkit::apiserver::TestApiServer;
use metalkube_testkit::pki::TestCa;
use metalkube_testkit::processes::signal;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::{CONTROLLER_TOKEN, Mac, Proc, free_port, write_kubeconfig};

/// The controller's namespace, as the chart is rendered for it.
const NAMESPACE: &str = "metalkube-system";
const SCRAPE: &str = "1s";
/// Grafana's `$__rate_interval` for a 1 s scrape: four scrape intervals.
const RATE_INTERVAL: &str = "4s";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// prometheus-operator's `relabelings` (camelCase) as Prometheus `relabel_configs`.
fn relabel_config(r: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (from, to) in [
        ("sourceLabels", "source_labels"),
        ("targetLabel", "target_label"),
        ("regex", "regex"),
        ("replacement", "replacement"),
        ("separator", "separator"),
        ("modulus", "modulus"),
    ] {
        if let Some(v) = r.get(from) {
            out.insert(to.into(), v.clone());
        }
    }
    out.insert(
        "action".into(),
        r.get("action").cloned().unwrap_or(json!("replace")).as_str().unwrap().to_lowercase().into(),
    );
    Value::Object(out)
}

/// A Prometheus label name for a Kubernetes label key, as service discovery spells it.
fn sanitize(label: &str) -> String {
    label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

/// The scrape config prometheus-operator generates for a ServiceMonitor's first endpoint: keep
/// the selected Services' endpoints on the named port, set namespace/service/job/endpoint, then
/// the ServiceMonitor's own relabelings; discovered by the EndpointSlice role.
fn scrape_config_from_service_monitor(monitor: &Value, discovery: &str) -> Value {
    let role = "endpointslice";
    let spec = &monitor["spec"];
    let endpoint = &spec["endpoints"][0];
    let port_label = "__meta_kubernetes_endpointslice_port_name";
    let mut relabel = vec![];
    for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
        let k = sanitize(k);
        relabel.push(json!({
            "action": "keep",
            "source_labels": [format!("__meta_kubernetes_service_label_{k}"), format!("__meta_kubernetes_service_labelpresent_{k}")],
            "regex": format!("({});true", v.as_str().unwrap()),
        }));
    }
    relabel.push(json!({"action": "keep", "source_labels": [port_label], "regex": endpoint["port"]}));
    relabel.push(json!({"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"}));
    relabel.push(json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"}));
    relabel.push(json!({"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"}));
    if let Some(job_label) = spec["jobLabel"].as_str() {
        relabel.push(json!({
            "source_labels": [format!("__meta_kubernetes_service_label_{}", sanitize(job_label))],
            "target_label": "job", "regex": "(.+)",
        }));
    }
    relabel.push(json!({"target_label": "endpoint", "replacement": endpoint["port"]}));
    relabel.extend(endpoint["relabelings"].as_array().into_iter().flatten().map(relabel_config));
    let namespace = spec["namespaceSelector"]["matchNames"][0].as_str().unwrap();
    json!({
        "job_name": format!("serviceMonitor/{}/{}/0/{role}", monitor["metadata"]["namespace"].as_str().unwrap(), monitor["metadata"]["name"].as_str().unwrap()),
        "scrape_interval": SCRAPE,
        "metrics_path": endpoint["path"].as_str().unwrap_or("/metrics"),
        "http_sd_configs": [{"url": format!("{discovery}/{role}/{namespace}"), "refresh_interval": SCRAPE}],
        "relabel_configs": relabel,
    })
}

/// Kubernetes service discovery for Prometheus' HTTP discovery: the Services and EndpointSlices
/// of a namespace in the test API server, as target groups with the meta labels Prometheus' own
/// Kubernetes discovery (endpointslice role) sets.
mod kubernetes_sd {
    use std::collections::BTreeMap;

    use axum::extract::{Path, State};
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, ListParams};
    use serde_json::{Value, json};

    fn service_labels(services: &[Service], name: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(svc) = services.iter().find(|s| s.metadata.name.as_deref() == Some(name)) else { return out };
        out.insert("__meta_kubernetes_service_name".into(), name.to_owned());
        for (k, v) in svc.metadata.labels.iter().flatten() {
            out.insert(format!("__meta_kubernetes_service_label_{}", super::sanitize(k)), v.clone());
            out.insert(format!("__meta_kubernetes_service_labelpresent_{}", super::sanitize(k)), "true".into());
        }
        out
    }

    fn target(address: &str, port: i32, mut labels: BTreeMap<String, String>) -> Value {
        labels.insert("__address__".into(), format!("{address}:{port}"));
        json!({"targets": [format!("{address}:{port}")], "labels": labels})
    }

    pub fn endpointslice_groups(namespace: &str, services: &[Service], slices: &[EndpointSlice]) -> Vec<Value> {
        let mut out = vec![];
        for slice in slices {
            let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")) else {
                continue;
            };
            let mut group = service_labels(services, service);
            group.insert("__meta_kubernetes_namespace".into(), namespace.to_owned());
            group
                .insert("__meta_kubernetes_endpointslice_name".into(), slice.metadata.name.clone().unwrap_or_default());
            group.insert("__meta_kubernetes_endpointslice_address_type".into(), slice.address_type.clone());
            for port in slice.ports.iter().flatten() {
                for e in slice.endpoints.iter().flatten() {
                    let mut labels = group.clone();
                    labels.insert(
                        "__meta_kubernetes_endpointslice_port_name".into(),
                        port.name.clone().unwrap_or_default(),
                    );
                    labels.insert("__meta_kubernetes_endpointslice_port".into(), port.port.unwrap_or(0).to_string());
                    if let Some(c) = &e.conditions {
                        for (name, v) in [("ready", c.ready), ("serving", c.serving), ("terminating", c.terminating)] {
                            if let Some(v) = v {
                                labels.insert(
                                    format!("__meta_kubernetes_endpointslice_endpoint_conditions_{name}"),
                                    v.to_string(),
                                );
                            }
                        }
                    }
                    if let Some(r) = &e.target_ref {
                        labels.insert(
                            "__meta_kubernetes_endpointslice_address_target_kind".into(),
                            r.kind.clone().unwrap_or_default(),
                        );
                        labels.insert(
                            "__meta_kubernetes_endpointslice_address_target_name".into(),
                            r.name.clone().unwrap_or_default(),
                        );
                    }
                    for a in &e.addresses {
                        out.push(target(a, port.port.unwrap_or(0), labels.clone()));
                    }
                }
            }
        }
        out
    }

    async fn discover(
        State(client): State<kube::Client>,
        Path((role, namespace)): Path<(String, String)>,
    ) -> axum::Json<Vec<Value>> {
        let lp = ListParams::default();
        let services =
            Api::<Service>::namespaced(client.clone(), &namespace).list(&lp).await.map(|l| l.items).unwrap_or_default();
        assert_eq!(role, "endpointslice", "the bridge serves the endpointslice role");
        let slices =
            Api::<EndpointSlice>::namespaced(client, &namespace).list(&lp).await.map(|l| l.items).unwrap_or_default();
        axum::Json(endpointslice_groups(&namespace, &services, &slices))
    }

    /// Serves `/{role}/{namespace}` on a loopback port; returns its base URL.
    pub async fn serve(client: kube::Client) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/{role}/{namespace}", axum::routing::get(discover)).with_state(client);
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }
}

/// The chart, rendered with every optional feature on, as the objects it holds.
fn rendered_chart() -> Vec<Value> {
    let manifests = metalkube_testkit::chart::render("mk", NAMESPACE, &["-f", "ci/all-on-values.yaml"]);
    metalkube_testkit::chart::documents(&manifests)
}

struct Prometheus {
    url: String,
    _proc: Proc,
}

impl Prometheus {
    fn start(dir: &Path, scrape_configs: Vec<Value>) -> Self {
        let rules = dir.join("alerts.yaml");
        std::fs::copy(repo().join("charts/metalkube/files/alerts.yaml"), &rules).unwrap();
        let config = json!({
            "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE, "scrape_timeout": SCRAPE},
            "rule_files": [rules],
            "scrape_configs": scrape_configs,
        });
        // JSON is YAML: Prometheus reads it as its config file.
        std::fs::write(dir.join("prometheus.yml"), config.to_string()).unwrap();
        let port = free_port("127.0.0.1");
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("prometheus (Debian package prometheus, installed by `cargo xtask setup`): {e}")
            });
        Self { url: format!("http://127.0.0.1:{port}"), _proc: Proc { child, name: "prometheus".into() } }
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, String> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query).map_err(|e| e.to_string())?;
        let resp = reqwest::Client::new().get(url).send().await.map_err(|e| e.to_string())?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// The value of a scalar-like PromQL expression now (its first series), if any.
    async fn value(&self, expr: &str) -> Option<f64> {
        let data = self.get("/api/v1/query", &[("query", expr.to_owned())]).await.ok()?;
        data["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits until Prometheus has scraped the agents at least once after `moment` plus `after`.
    async fn scraped_since(&self, moment: f64, after: f64) {
        wait_for("Prometheus scraped the agent after the last event", Duration::from_secs(60), || async {
            let last = self.value(r#"max(timestamp(up{job="metalkube-agents"}))"#).await?;
            (last >= moment + after).then_some(())
        })
        .await;
    }

    /// Series a PromQL expression returns over [from, now] at a 1 s step.
    async fn range_series(&self, expr: &str, from: f64) -> Result<usize, String> {
        let q = [
            ("query", expr.to_owned()),
            ("start", format!("{from:.3}")),
            ("end", format!("{:.3}", now_secs())),
            ("step", "1".to_owned()),
        ];
        let data = self.get("/api/v1/query_range", &q).await?;
        Ok(data["result"].as_array().map_or(0, Vec::len))
    }

    async fn metric_names(&self) -> BTreeSet<String> {
        let names = self.get("/api/v1/label/__name__/values", &[]).await.unwrap_or_default();
        names.as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
    }
}

/// Grafana's variables and intervals, as the check fills them in.
fn substitute(expr: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut out = expr.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("${{{name}}}"), value).replace(&format!("${name}"), value);
    }
    out
}

/// A stat panel's `… or vector(0)` always returns a series; the part before it must have data.
fn without_fallback(expr: &str) -> &str {
    expr.trim_end().strip_suffix("or vector(0)").map_or(expr, str::trim_end)
}

fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = vec![];
    walk(&dashboard["panels"], &mut out);
    out
}

/// Metric names a PromQL expression refers to (ours, and `up`).
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if expr[i..].starts_with("metalkube_")
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let end = expr[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(expr.len(), |n| i + n);
            names.insert(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

async fn completion(client: &reqwest::Client, url: &str, n_predict: u32) -> u16 {
    let body = json!({"prompt": "the quick brown fox", "n_predict": n_predict, "cache_prompt": false});
    client.post(format!("{url}/completion")).json(&body).send().await.map_or(0, |r| r.status().as_u16())
}

/// A chat completion for `default/tiny` through the router (which reads the model from the body).
async fn routed_chat(client: &reqwest::Client, router: &str, max_tokens: u32) -> u16 {
    let body =
        json!({"model": "default/tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens});
    match client.post(format!("{router}/v1/chat/completions")).json(&body).send().await {
        Ok(r) => {
            let code = r.status().as_u16();
            let _ = r.bytes().await;
            code
        }
        Err(_) => 0,
    }
}

/// The real `metalkube-router` following the Mac's agent over mTLS, with a client certificate of
/// its own from the CA the agent trusts for clients, as the chart issues it. Its serving port and
/// its health port (/readyz, /metrics).
fn start_router(dir: &Path, mac: &Mac, agent_ca: &TestCa, client_ca: &TestCa) -> (Proc, u16, u16) {
    let pem = client_ca.client("metalkube-router");
    std::fs::write(dir.join("router.crt"), pem.cert).unwrap();
    std::fs::write(dir.join("router.key"), pem.key).unwrap();
    std::fs::write(dir.join("router-agent-ca.crt"), &agent_ca.cert_pem).unwrap();
    let (port, health) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let log = std::fs::File::create(dir.join("router.log")).unwrap();
    let child = Command::new(metalkube_testkit::workspace_binary("metalkube-router", "metalkube-router"))
        .env("RUST_LOG", "info")
        .args(["--listen", &format!("127.0.0.1:{port}"), "--http-listen", &format!("127.0.0.1:{health}")])
        .args(["--agent", &format!("{}={}", mac.name, mac.endpoint())])
        .arg("--agent-ca")
        .arg(dir.join("router-agent-ca.crt"))
        .arg("--client-cert")
        .arg(dir.join("router.crt"))
        .arg("--client-key")
        .arg(dir.join("router.key"))
        .args(["--queue-timeout", "20s"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    (Proc { child, name: "router".into() }, port, health)
}

async fn streamed_chat(client: &reqwest::Client, url: &str) -> u16 {
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": true});
    match client.post(format!("{url}/v1/chat/completions")).json(&body).send().await {
        Ok(r) => {
            let code = r.status().as_u16();
            let _ = r.bytes().await;
            code
        }
        Err(_) => 0,
    }
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            println!("ok: {what}");
            return v;
        }
        assert!(Instant::now() < deadline, "not {what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_panel_and_alert() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = TestApiServer::start().await;
    let client = server.client();

    // One Mac, one model with a small admission limit so refusals are easy to make.
    let (agent_ca, controller_ca) = (TestCa::new("metalkube agents"), TestCa::new("metalkube controller"));
    let mut mac = Mac::new("mac-a", "127.0.0.4", "23400-23449", dir, &agent_ca, &controller_ca);
    mac.budget_bytes = 2 << 30;
    mac.start();
    support::write_controller_tls(dir, &agent_ca, &controller_ca);
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &server.url, CONTROLLER_TOKEN);
    let controller_port = free_port("127.0.0.1");
    let _controller = support::start_controller(
        dir,
        &kubeconfig,
        controller_port,
        &["--grace-period", "3s", "--heartbeat", "2s", "--namespace", NAMESPACE],
    );

    let nodes: Api<MetalNode> = Api::all(client.clone());
    let models: Api<MetalModel> = Api::namespaced(client.clone(), "default");
    let node: MetalNode = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalNode", "metadata": {"name": "mac-a"},
        "spec": {"agentEndpoint": mac.endpoint(), "servingAddress": mac.ip}
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let model_path = metalkube_testkit::tiny_model(dir);
    let tiny: MetalModel = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
        "metadata": {"name": "tiny", "namespace": "default"},
        "spec": {
            "model": {"source": format!("file://{}", model_path.display())},
            "engine": {"contextSize": 512, "gpuLayers": 0, "parallel": 2, "extraArgs": ["--threads", "1"], "startupTimeout": "60s"},
            "admission": {"maxConcurrent": 1, "queueDepth": 1, "queueTimeout": "2s", "maxRequestBytes": 1048576},
            "pulse": {"interval": "300ms", "timeout": "1s", "yellowAfter": "300ms", "redAfter": "600ms", "redStreak": 2}
        }
    }))
    .unwrap();
    models.create(&PostParams::default(), &tiny).await.unwrap();
    // A second model whose every pulse is slower than its yellowAfter: a drifting model, for the
    // panels and alerts about yellow pulses.
    let mut drifting = tiny.clone();
    drifting.metadata.name = Some("drifting".into());
    drifting.spec.pulse.yellow_after = metalkube_api::Duration::from_millis(1);
    drifting.spec.pulse.red_after = metalkube_api::Duration::from_secs(8);
    drifting.spec.pulse.timeout = metalkube_api::Duration::from_secs(9);
    models.create(&PostParams::default(), &drifting).await.unwrap();
    for name in ["tiny", "drifting"] {
        wait_for(&format!("{name} ready"), Duration::from_secs(60), || async {
            (models.get(name).await.ok()?.status?.ready_replicas == 1).then_some(())
        })
        .await;
    }

    // The router in front of the Mac, scraped for the router's panels and alerts.
    let (_router, router_port, router_health) = start_router(dir, &mac, &agent_ca, &controller_ca);
    let http = reqwest::Client::new();
    wait_for("the router follows the Mac (readyz 200)", Duration::from_secs(30), || async {
        let code = http.get(format!("http://127.0.0.1:{router_health}/readyz")).send().await.ok()?.status();
        (code == reqwest::StatusCode::OK).then_some(())
    })
    .await;

    // Prometheus, configured from the chart's own ServiceMonitors.
    let chart = rendered_chart();
    let monitor = |name: &str| {
        chart
            .iter()
            .find(|d| {
                d["kind"] == "ServiceMonitor" && d["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(name))
            })
            .unwrap_or_else(|| panic!("the chart renders a ServiceMonitor *{name}"))
            .clone()
    };
    let agents_monitor = monitor("-agents");
    let controller_monitor = monitor("-controller");
    let discovery = kubernetes_sd::serve(server.client()).await;
    let mut agents_job = scrape_config_from_service_monitor(&agents_monitor, &discovery);
    agents_job["job_name"] = json!("metalkube-agents (EndpointSlice role)");
    // The controller runs here as a process, not a pod: a static target with the labels its
    // ServiceMonitor gives it.
    let controller_job = json!({
        "job_name": "metalkube-controller",
        "static_configs": [{"targets": [format!("127.0.0.1:{controller_port}")], "labels": {
            "job": "metalkube-controller", "namespace": NAMESPACE, "endpoint": controller_monitor["spec"]["endpoints"][0]["port"],
        }}],
    });
    // The router likewise: a static target with the labels its ServiceMonitor gives its pods.
    let router_monitor = monitor("-router");
    let router_job = json!({
        "job_name": "metalkube-router",
        "static_configs": [{"targets": [format!("127.0.0.1:{router_health}")], "labels": {
            "job": "metalkube-router", "namespace": NAMESPACE, "endpoint": router_monitor["spec"]["endpoints"][0]["port"],
        }}],
    });
    let prometheus = Prometheus::start(dir, vec![agents_job, controller_job, router_job]);
    let started = now_secs();
    let discovered = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let targets = prometheus.get("/api/v1/targets", &[]).await.unwrap_or_default();
            let active = targets["activeTargets"].as_array().cloned().unwrap_or_default();
            let up = |job: &str| {
                active.iter().any(|t| {
                    t["labels"]["job"] == job
                        && t["health"] == "up"
                        && (job != "metalkube-agents" || t["labels"]["node"] == "mac-a")
                })
            };
            if up("metalkube-agents") && up("metalkube-controller") && up("metalkube-router") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if discovered.is_err() {
        let targets = prometheus.get("/api/v1/targets", &[]).await;
        let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
        panic!(
            "Prometheus did not scrape the Mac (node label), the controller and the router within 60 s:\n{targets:#?}\n{log}"
        );
    }
    println!("ok: Prometheus scrapes the Mac (found through the EndpointSlice), the controller and the router");

    // Through the router: answers, then a burst larger than the Mac's one place and queue of one,
    // which the router holds in its fleet queue rather than refusing.
    let router = format!("http://127.0.0.1:{router_port}");
    let mut routed: BTreeMap<u16, u32> = BTreeMap::new();
    for _ in 0..5 {
        *routed.entry(routed_chat(&http, &router, 8).await).or_default() += 1;
    }
    let burst: Vec<_> = (0..6).map(|_| routed_chat(&http, &router, 64)).collect();
    for code in futures::future::join_all(burst).await {
        *routed.entry(code).or_default() += 1;
    }
    println!("routed traffic answered with {routed:?}");
    assert!(routed.get(&200).is_some_and(|n| *n >= 5), "the router served tiny: {routed:?}");

    // Traffic: answers, streams, a burst of refusals, a frozen engine, answers again.
    let port = models.get("tiny").await.unwrap().status.unwrap().replicas[0].port.expect("tiny's serving port");
    let serving = format!("http://{}:{port}", mac.ip);
    let mut codes: BTreeMap<u16, u32> = BTreeMap::new();
    for _ in 0..10 {
        *codes.entry(completion(&http, &serving, 8).await).or_default() += 1;
        *codes.entry(streamed_chat(&http, &serving).await).or_default() += 1;
    }
    // Overload for a few seconds: a queue of one behind one place, so most are refused (429) and
    // the model reads as saturated at every pulse meanwhile.
    let overload_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < overload_until {
        let burst: Vec<_> = (0..8).map(|_| completion(&http, &serving, 200)).collect();
        for code in futures::future::join_all(burst).await {
            *codes.entry(code).or_default() += 1;
        }
    }
    let too_large = http.post(format!("{serving}/completion")).body(vec![b'x'; 2 << 20]).send().await;
    *codes.entry(too_large.map_or(0, |r| r.status().as_u16())).or_default() += 1;
    wait_for("Prometheus saw tiny saturated", Duration::from_secs(30), || async {
        let seen = prometheus.value(r#"max_over_time(metalkube_agent_saturated{model="default/tiny"}[1m])"#).await?;
        (seen == 1.0).then_some(())
    })
    .await;
    let frozen = mac.engine_pid("tiny").await.expect("the agent reports its engine pid");
    signal(frozen, Signal::SIGSTOP);
    let readyz = format!("http://{}:{}/readyz", mac.ip, mac.http_port);
    wait_for("the agent says tiny is not ready", Duration::from_secs(30), || async {
        let code = http.get(&readyz).send().await.ok()?.status();
        (code == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    *codes.entry(completion(&http, &serving, 8).await).or_default() += 1;
    wait_for("a new engine after the frozen one", Duration::from_secs(60), || async {
        let pid = mac.engine_pid("tiny").await?;
        let ready = models.get("tiny").await.ok()?.status?.ready_replicas == 1;
        (pid != frozen && ready).then_some(())
    })
    .await;
    for _ in 0..5 {
        *codes.entry(completion(&http, &serving, 8).await).or_default() += 1;
        *codes.entry(streamed_chat(&http, &serving).await).or_default() += 1;
    }
    println!("traffic answered with {codes:?}");
    assert!(codes.get(&429).is_some_and(|n| *n > 0), "the burst was refused with 429: {codes:?}");
    // Scraped after the last event, past a rate window.
    prometheus.scraped_since(now_secs(), 5.0).await;

    // Every variable and panel query of the dashboard.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("charts/metalkube/dashboards/metalkube.json")).unwrap(),
    )
    .unwrap();
    let range = format!("{}s", (now_secs() - started).ceil() as u64 + 60);
    // Each variable takes a real value (a label typo in a filter then matches nothing), and
    // each panel query is run for every model the model variable offers. A panel passes when
    // some model gives it series: some only have data for one (yellow pulses are the drifting
    // model's, refusals and saturation tiny's), as a real fleet's panels do.
    let model_values = ["default/drifting", "default/tiny"];
    let vars_for = |model: &str| {
        BTreeMap::from([
            ("node", "mac-a".to_owned()),
            ("model", model.to_owned()),
            ("__rate_interval", RATE_INTERVAL.to_owned()),
            ("__interval", SCRAPE.to_owned()),
            ("__range", range.clone()),
        ])
    };
    let vars = vars_for("default/tiny");
    let mut failures = vec![];
    for var in dashboard["templating"]["list"].as_array().unwrap().iter().filter(|v| v["type"] == "query") {
        let query = var["query"]["query"].as_str().or(var["query"].as_str()).unwrap();
        let (metric, label) = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .expect("variables are label_values(selector, label)");
        let values = prometheus
            .get(&format!("/api/v1/label/{}/values", label.trim()), &[("match[]", substitute(metric, &vars))])
            .await;
        let wanted: Vec<String> = match var["name"].as_str().unwrap() {
            "model" => model_values.iter().map(|m| (*m).to_owned()).collect(),
            other => vec![vars[other].clone()],
        };
        println!("variable {:<6} {query:<70} -> {values:?}", var["name"].as_str().unwrap());
        let offered =
            |w: &String| values.as_ref().is_ok_and(|v| v.as_array().is_some_and(|a| a.iter().any(|x| x == w)));
        if !wanted.iter().all(offered) {
            failures.push(format!("variable {query}: {values:?} does not offer {wanted:?}"));
        }
    }
    println!("\n{:<4} {:<38} {:>6}  query", "id", "panel", "series");
    let mut macos_only = vec![];
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        let macos = panel["description"].as_str().is_some_and(|d| d.starts_with("macOS only:"));
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else { continue };
            let query = substitute(without_fallback(expr), &vars);
            let mut result = Ok(0);
            for model in model_values {
                let one = prometheus.range_series(&substitute(without_fallback(expr), &vars_for(model)), started).await;
                result = match (result, one) {
                    (Ok(a), Ok(b)) => Ok(a + b),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                if !expr.contains("$model") {
                    break;
                }
            }
            let shown = match &result {
                Ok(n) => n.to_string(),
                Err(_) => "ERROR".into(),
            };
            println!("{:<4} {title:<38} {shown:>6}  {query}", panel["id"]);
            match result {
                Err(e) => failures.push(format!("panel {title:?}: {query}: {e}")),
                Ok(0) if macos => macos_only.push(format!("{title}: {query}")),
                Ok(0) => failures.push(format!("panel {title:?} has no series: {query}")),
                Ok(_) => {}
            }
        }
    }
    println!("\nmacOS-only panel queries with no series on this Linux agent ({}):", macos_only.len());
    for q in &macos_only {
        println!("  {q}");
    }

    // Every alert: healthy in Prometheus' rule evaluation, its metrics exist, and what it returned.
    let names = prometheus.metric_names().await;
    let macos_metrics = [
        "metalkube_agent_host_memory_pressure",
        "metalkube_agent_host_memory_wired_bytes",
        "metalkube_agent_host_memory_compressed_bytes",
    ];
    // Series that exist only while a model downloads, which this scenario (local files) never
    // does; crates/agent/tests/model_download.rs checks their names while a download runs.
    let download_metrics = ["metalkube_agent_model_download_rate_bytes_per_second"];
    let rules = prometheus.get("/api/v1/rules", &[]).await.unwrap();
    println!("\n{:<34} {:<9} {:>6}  expression", "alert", "state", "series");
    let mut alerts = 0;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap().iter().filter(|r| r["type"] == "alerting") {
            alerts += 1;
            let (name, query) = (rule["name"].as_str().unwrap(), rule["query"].as_str().unwrap());
            if rule["health"] != "ok" {
                failures.push(format!("alert {name}: {} {}", rule["health"], rule["lastError"]));
            }
            let series = prometheus.range_series(query, started).await;
            if let Err(e) = &series {
                failures.push(format!("alert {name}: {e}"));
            }
            for metric in metric_names_in(query) {
                let known = names.iter().any(|n| *n == metric || n.starts_with(&format!("{metric}_")));
                if !known && !macos_metrics.contains(&metric.as_str()) && !download_metrics.contains(&metric.as_str()) {
                    failures.push(format!("alert {name} refers to {metric}, which no target exports"));
                }
            }
            let one_line = query.split_whitespace().collect::<Vec<_>>().join(" ");
            println!(
                "{name:<34} {:<9} {:>6}  {one_line}",
                rule["state"].as_str().unwrap_or(""),
                series.map_or("ERROR".into(), |n| n.to_string())
            );
        }
    }
    assert!(alerts >= 10, "the rules file was loaded: {alerts} alerts");
    assert!(failures.is_empty(), "{} problem(s):\n{}", failures.len(), failures.join("\n"));
}
