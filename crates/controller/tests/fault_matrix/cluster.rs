//! The controller rows' world: a test API server, the real controller, and one Mac serving the
//! tiny model.

use std::path::PathBuf;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use metalkube_api::{MetalModel, MetalNode};
use metalkube_testkit::apiserver::TestApiServer;
use metalkube_testkit::pki::TestCa;
use serde_json::json;

use crate::clients::http_client;
use crate::row::{Pulse, Row, bounded, file_source, spec};
use crate::support::{
    self, CONTROLLER_TOKEN, Mac, Proc, free_port, start_controller, write_controller_tls, write_kubeconfig,
};

/// An API server, the real controller and one Mac serving the tiny model.
pub struct Cluster {
    pub server: TestApiServer,
    pub client: Client,
    pub dir: PathBuf,
    kubeconfig: PathBuf,
    metrics_port: u16,
    pub mac: Mac,
    pub controller: Option<Proc>,
    pub source: String,
}

pub const MODELS_NS: &str = "default";

impl Cluster {
    pub async fn start(row: &Row, ip: &str) -> Self {
        let server = TestApiServer::start().await;
        let dir = row.path().to_owned();
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &server.url, CONTROLLER_TOKEN);
        let (agent_ca, controller_ca) = (TestCa::new("fault matrix agents"), TestCa::new("fault matrix controller"));
        let (first, last) = row.engine_ports();
        let mut mac =
            Mac::new(&format!("fm-mac{}", row.n), ip, &format!("{first}-{last}"), &dir, &agent_ca, &controller_ca);
        // Room for both of row 10's models: what is measured here is the API, not placement.
        mac.budget_bytes = 4 << 30;
        row.show_log(mac.log());
        row.show_log(dir.join("controller.log"));
        mac.start();
        write_controller_tls(&dir, &agent_ca, &controller_ca);
        let source = file_source(&row.tiny_model("tiny"));
        let mut cluster = Self {
            client: server.client(),
            server,
            metrics_port: free_port("127.0.0.1"),
            dir,
            kubeconfig,
            mac,
            controller: None,
            source,
        };
        cluster.start_controller();
        let node: MetalNode = serde_json::from_value(json!({
            "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalNode",
            "metadata": {"name": cluster.mac.name},
            "spec": {"agentEndpoint": cluster.mac.endpoint(), "servingAddress": cluster.mac.ip}
        }))
        .unwrap();
        Api::<MetalNode>::all(cluster.client.clone()).create(&PostParams::default(), &node).await.unwrap();
        cluster
    }

    pub fn start_controller(&mut self) {
        let args: Vec<&str> = support::FAST_TIMINGS
            .iter()
            .copied()
            .chain(["--lease-duration", "3s", "--namespace", "metalkube-system"])
            .collect();
        self.controller = Some(start_controller(&self.dir, &self.kubeconfig, self.metrics_port, &args));
    }

    pub async fn create_model(&self, name: &str) -> u16 {
        let port = free_port(&self.mac.ip);
        let model: MetalModel = serde_json::from_value(json!({
            "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
            "metadata": {"name": name, "namespace": MODELS_NS},
            "spec": spec(&self.source, port, Pulse::Calm, "3s")
        }))
        .unwrap();
        Api::<MetalModel>::namespaced(self.client.clone(), MODELS_NS)
            .create(&PostParams::default(), &model)
            .await
            .unwrap();
        port
    }

    /// Waits until `name` is Ready with its one endpoint ready on `port`.
    pub async fn wait_ready(&self, name: &str, port: u16) {
        let models: Api<MetalModel> = Api::namespaced(self.client.clone(), MODELS_NS);
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), MODELS_NS);
        let ip = self.mac.ip.clone();
        bounded(&format!("{name} Ready with one ready endpoint {ip}:{port}"), || async {
            let m = serde_json::to_value(models.get(name).await.ok()?).ok()?;
            let ready =
                m["status"]["conditions"].as_array()?.iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
            let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={name}"));
            let endpoints: Vec<(Vec<String>, bool, i32)> = slices
                .list(&lp)
                .await
                .ok()?
                .items
                .iter()
                .flat_map(|s| {
                    let p = s.ports.as_ref().and_then(|p| p.first()).and_then(|p| p.port).unwrap_or(0);
                    s.endpoints.iter().flatten().map(move |e| {
                        let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                        (e.addresses.clone(), ready, p)
                    })
                })
                .collect();
            let status_port = m["status"]["replicas"][0]["port"].as_u64();
            (ready
                && m["status"]["readyReplicas"] == 1
                && status_port == Some(u64::from(port))
                && endpoints == [(vec![ip.clone()], true, i32::from(port))])
            .then_some(())
        })
        .await;
    }

    pub async fn controller_metrics(&self) -> Option<String> {
        http_client()
            .get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.stop();
        }
        if let Some(mut agent) = self.mac.proc.take() {
            agent.stop();
        }
    }
}

/// The sum of a metric's samples whose line starts with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}
