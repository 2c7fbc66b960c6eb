//! A routed model's Service follows the metalkube-router's ready pods, and falls back to its Macs
//! whenever no router pod is ready (static stability). On loopback: the in-process API server,
//! the real controller (`--router-service metalkube-system/metalkube-router`) and one Mac serving
//! the tiny model on the real engine. The router's own EndpointSlice is written here as
//! Kubernetes' EndpointSlice controller would write it from the router pods' readiness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use metalkube_api::{MetalModel, MetalNode};
use metalkube_testkit::apiserver::TestApiServer;
use metalkube_testkit::pki::TestCa;
use serde_json::{Value, json};
use support::{CONTROLLER_TOKEN, Mac, free_port, start_controller, write_controller_tls, write_kubeconfig};

const STEP: Duration = Duration::from_secs(60);
const ROUTER_NS: &str = "metalkube-system";
const ROUTER_SERVICE: &str = "metalkube-router";
/// A model that names `Direct` lives alone in this namespace, so the requests made for it can be
/// counted.
const DIRECT_NS: &str = "pinned";

async fn wait<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = check().await {
            println!("ok: {what}");
            return v;
        }
        assert!(Instant::now() < deadline, "not {what} within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn condition(m: &MetalModel, type_: &str) -> Option<(String, String)> {
    let v = serde_json::to_value(m).ok()?;
    let c = v["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?.clone();
    Some((c["status"].as_str()?.to_owned(), c["reason"].as_str()?.to_owned()))
}

/// What a model's Service lists: "address:port" → ready, with the slices' names.
async fn listed(slices: &Api<EndpointSlice>, model: &str) -> (BTreeMap<String, bool>, Vec<String>) {
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={model}"));
    let mut out = BTreeMap::new();
    let mut names = Vec::new();
    for s in slices.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        names.push(s.metadata.name.clone().unwrap_or_default());
        let port = s.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port).unwrap_or(0);
        for e in s.endpoints.iter().flatten() {
            let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
            out.insert(format!("{}:{port}", e.addresses.join(",")), ready);
        }
    }
    names.sort();
    (out, names)
}

/// The router Service's slice as the EndpointSlice controller writes it: both of the Service's
/// ports, one endpoint per router pod with its readiness.
fn router_slice(pods: &[(&str, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "metalkube-router-x7k2p", "namespace": ROUTER_NS,
                     "labels": {"kubernetes.io/service-name": ROUTER_SERVICE,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"}, {"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": pods.iter().enumerate().map(|(i, (ip, ready))| json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "targetRef": {"kind": "Pod", "namespace": ROUTER_NS, "name": format!("metalkube-router-{i}")},
            "nodeName": "k8s-node-1"
        })).collect::<Vec<_>>()
    })
}

fn model(name: &str, namespace: &str, source: &str, replicas: u32, routing: Option<&str>) -> MetalModel {
    let mut spec = json!({
        "model": {"source": source},
        "replicas": replicas,
        "engine": {"contextSize": 512, "gpuLayers": 0, "parallel": 2, "extraArgs": ["--threads", "1"], "startupTimeout": "60s"},
        "pulse": {"interval": "500ms", "timeout": "3s", "yellowAfter": "1s", "redAfter": "2s", "redStreak": 2}
    });
    if let Some(mode) = routing {
        spec["routing"] = json!({"mode": mode});
    }
    serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routed_service_follows_the_ready_router_pods_and_falls_back_to_the_macs() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = TestApiServer::start().await;
    let client = server.client();
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &server.url, CONTROLLER_TOKEN);
    let (agent_ca, controller_ca) = (TestCa::new("routing agents"), TestCa::new("routing controller"));
    let mut mac = Mac::new("rt-mac", "127.0.0.20", "24400-24419", dir, &agent_ca, &controller_ca);
    mac.start();
    write_controller_tls(dir, &agent_ca, &controller_ca);
    let router_flag = format!("{ROUTER_NS}/{ROUTER_SERVICE}");
    let args: Vec<&str> = support::FAST_TIMINGS
        .iter()
        .copied()
        .chain(["--namespace", ROUTER_NS, "--router-service", &router_flag])
        .collect();
    let _controller = start_controller(dir, &kubeconfig, free_port("127.0.0.1"), &args);
    let node: MetalNode = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalNode", "metadata": {"name": mac.name},
        "spec": {"agentEndpoint": mac.endpoint(), "servingAddress": mac.ip}
    }))
    .unwrap();
    Api::<MetalNode>::all(client.clone()).create(&PostParams::default(), &node).await.unwrap();
    let source = format!("file://{}", metalkube_testkit::tiny_model(dir).display());

    // Two replicas and no mode: routed by default. One Mac, so one replica serves, through the
    // Mac until a router pod is ready.
    let models: Api<MetalModel> = Api::namespaced(client.clone(), "default");
    models.create(&PostParams::default(), &model("tiny", "default", &source, 2, None)).await.unwrap();
    let pinned_models: Api<MetalModel> = Api::namespaced(client.clone(), DIRECT_NS);
    pinned_models
        .create(&PostParams::default(), &model("pinned", DIRECT_NS, &source, 0, Some("Direct")))
        .await
        .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let mac_endpoint =
        wait("tiny served through the Mac while no router exists: Routed=False/RouterUnavailable", || async {
            let m = models.get("tiny").await.ok()?;
            let port = m.status.as_ref()?.replicas.first()?.port?;
            let want = format!("127.0.0.20:{port}");
            let (eps, _) = listed(&slices, "tiny").await;
            let routed = condition(&m, "Routed")?;
            (routed == ("False".into(), "RouterUnavailable".into()) && eps == BTreeMap::from([(want.clone(), true)]))
                .then_some(want)
        })
        .await;
    wait("pinned Routed=False/Direct", || async {
        let m = pinned_models.get("pinned").await.ok()?;
        (condition(&m, "Routed")? == ("False".into(), "Direct".into())).then_some(())
    })
    .await;
    let service =
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "default").get("tiny").await.unwrap();
    assert_eq!(
        service.metadata.name.as_deref(),
        Some("tiny"),
        "the Service is named after the model: the router reads tiny, tiny.default, tiny.default.svc[.cluster.local] from Host"
    );

    // From here on nothing may reconcile the Direct model: the router's changes touch routed
    // models only.
    let pinned_requests = || {
        server
            .requests()
            .into_iter()
            .filter(|r| r.user.as_deref() == Some(CONTROLLER_TOKEN) && r.namespace.as_deref() == Some(DIRECT_NS))
            .count()
    };
    // Its own status write reconciles it once more; wait until it has settled.
    let mut before = pinned_requests();
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = pinned_requests();
        if now == before {
            break;
        }
        before = now;
    }

    let router_slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ROUTER_NS);
    let slice: EndpointSlice =
        serde_json::from_value(router_slice(&[("10.9.0.1", true), ("10.9.0.2", false)])).unwrap();
    router_slices.create(&PostParams::default(), &slice).await.unwrap();
    wait("tiny's Service lists the router pods (one ready) and no Mac: Routed=True/ThroughRouter", || async {
        let m = models.get("tiny").await.ok()?;
        let (eps, names) = listed(&slices, "tiny").await;
        let want = BTreeMap::from([("10.9.0.1:8080".to_owned(), true), ("10.9.0.2:8080".to_owned(), false)]);
        (eps == want
            && names == ["tiny-router-8080-ipv4"]
            && condition(&m, "Routed")? == ("True".into(), "ThroughRouter".into()))
            .then_some(())
    })
    .await;
    let routed_slice = slices.get("tiny-router-8080-ipv4").await.unwrap();
    let pod = routed_slice.endpoints.as_ref().unwrap().iter().find(|e| e.addresses == ["10.9.0.1"]).unwrap();
    assert_eq!(pod.target_ref.as_ref().unwrap().name.as_deref(), Some("metalkube-router-0"));
    assert_eq!(routed_slice.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"), "the Service's port name");

    // Every router pod not ready (the router down, or being replaced): the Macs stand in.
    let down = router_slice(&[("10.9.0.1", false), ("10.9.0.2", false)]);
    let apply = PatchParams::apply("endpointslice-controller.k8s.io").force();
    router_slices.patch("metalkube-router-x7k2p", &apply, &Patch::Apply(&down)).await.unwrap();
    wait("tiny back on its Mac while no router pod is ready: Routed=False/RouterUnavailable", || async {
        let m = models.get("tiny").await.ok()?;
        let (eps, _) = listed(&slices, "tiny").await;
        (eps == BTreeMap::from([(mac_endpoint.clone(), true)])
            && condition(&m, "Routed")? == ("False".into(), "RouterUnavailable".into()))
            .then_some(())
    })
    .await;
    let up = router_slice(&[("10.9.0.3", true)]);
    router_slices.patch("metalkube-router-x7k2p", &apply, &Patch::Apply(&up)).await.unwrap();
    wait("tiny through the router again on its new pod", || async {
        let (eps, _) = listed(&slices, "tiny").await;
        (eps == BTreeMap::from([("10.9.0.3:8080".to_owned(), true)])).then_some(())
    })
    .await;
    // A change of the model itself moves it too: Direct named on a two-replica model.
    models
        .patch("tiny", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"routing": {"mode": "Direct"}}})))
        .await
        .unwrap();
    wait("tiny Direct by its own choice: Routed=False/Direct, its Mac listed", || async {
        let m = models.get("tiny").await.ok()?;
        let (eps, _) = listed(&slices, "tiny").await;
        (eps == BTreeMap::from([(mac_endpoint.clone(), true)])
            && condition(&m, "Routed")? == ("False".into(), "Direct".into()))
            .then_some(())
    })
    .await;
    router_slices.patch("metalkube-router-x7k2p", &apply, &Patch::Apply(&down)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pinned_requests(),
        before,
        "the router's endpoints changed four times; the Direct model in {DIRECT_NS} must not have been reconciled"
    );

    // What the controller asked for here, the chart (router on) allows.
    let manifests = metalkube_testkit::chart::render(
        "metalkube",
        ROUTER_NS,
        &["--set", "tls.existingSecret=metalkube-tls", "--set", "router.tls.existingSecret=metalkube-router-tls"],
    );
    let account = metalkube_testkit::chart::documents(&manifests)
        .into_iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["labels"]["app.kubernetes.io/component"] == "controller")
        .and_then(|d| d["spec"]["template"]["spec"]["serviceAccountName"].as_str().map(str::to_owned))
        .expect("the chart runs the controller under a ServiceAccount");
    let grants = metalkube_testkit::rbac::grants(&manifests, ROUTER_NS, &account);
    let requests: Vec<_> =
        server.requests().into_iter().filter(|r| r.user.as_deref() == Some(CONTROLLER_TOKEN)).collect();
    let denied = metalkube_testkit::rbac::denied(&grants, &requests);
    assert!(denied.is_empty(), "the chart's RBAC does not allow what the controller did: {denied:#?}");
}
