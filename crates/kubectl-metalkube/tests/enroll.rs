//! The plugin binary against the in-process test API server, through a kubeconfig as a user
//! would run it: enroll applies the MetalNode and issues a certificate that chains to the CA
//! and names the Mac's address; renewals and conflicts; status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use metalkube_api::MetalNode;
use metalkube_api::bundle::{AgentBundle, parse_bundle};
use metalkube_testkit::apiserver::TestApiServer;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// The chart's CA: what helm's genCA writes (RSA, PKCS#1).
const HELM_CA: (&str, &str) = (include_str!("fixtures/helm-genca.crt"), include_str!("fixtures/helm-genca.key"));
/// A CA in cert-manager's default encoding (ECDSA P-256, SEC1).
const SEC1_CA: (&str, &str) = (include_str!("fixtures/sec1-ec-ca.crt"), include_str!("fixtures/sec1-ec-ca.key"));

struct Cluster {
    server: TestApiServer,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let server = TestApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user:\n    token: admin\n",
            server.url
        );
        std::fs::write(dir.path().join("kubeconfig"), config).unwrap();
        let cluster = Self { server, dir };
        cluster.ca_secret("metalkube-ca", HELM_CA).await;
        cluster
    }

    async fn ca_secret(&self, name: &str, (cert, key): (&str, &str)) {
        let secret = Secret {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            data: Some(
                [("tls.crt", cert), ("tls.key", key), ("ca.crt", cert)]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        };
        let secrets: Api<Secret> = Api::namespaced(self.server.client(), "metalkube-system");
        secrets.create(&PostParams::default(), &secret).await.unwrap();
    }

    /// Runs the plugin; its stdout and stderr.
    async fn kubectl_metalkube(&self, args: &[&str]) -> Output {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-metalkube"))
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .args(args)
            .output()
            .await
            .unwrap();
        eprintln!("kubectl-metalkube {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
        output
    }

    async fn node(&self, name: &str) -> MetalNode {
        Api::<MetalNode>::all(self.server.client()).get(name).await.unwrap()
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Whether `bundle`'s certificate chains to `ca` and is valid for `name`, as the controller's
/// TLS client checks it.
fn verifies(bundle: &AgentBundle, ca: &str, name: &str) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    let cert = CertificateDer::from_pem_slice(bundle.tls.certificate.as_bytes()).unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier.verify_server_cert(&cert, &[], &name, &[], UnixTime::now()).map(|_| ())
}

fn read_bundle(path: &Path) -> AgentBundle {
    parse_bundle(&std::fs::read_to_string(path).unwrap(), "bundle").unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn enroll_applies_the_node_and_issues_a_certificate_for_its_address() {
    let cluster = Cluster::start().await;
    let out = cluster.dir.path().join("mac-01.bundle");
    let args = ["enroll", "mac-01", "--address", "10.0.0.21", "--label", "chip=m4-max", "--memory-budget", "48Gi"];
    let output = cluster.kubectl_metalkube(&[&args[..], &["--output", out.to_str().unwrap()]].concat()).await;
    assert!(output.status.success());
    assert!(stderr(&output).contains("metalkube-agent join"), "says what to do next");
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600, "it holds a private key");

    let bundle = read_bundle(&out);
    assert_eq!(bundle.agent.node_name, "mac-01");
    assert_eq!(bundle.agent.serving_address, "10.0.0.21");
    assert_eq!(bundle.agent.grpc_listen.to_string(), "0.0.0.0:9443");
    assert_eq!(bundle.agent.memory_budget_bytes, Some(48 << 30));
    assert_eq!(bundle.tls.client_ca, HELM_CA.0, "the agent trusts the CA that signs the controller");
    verifies(&bundle, HELM_CA.0, "10.0.0.21").unwrap();
    assert!(verifies(&bundle, HELM_CA.0, "10.0.0.22").is_err(), "the certificate names this Mac only");
    assert!(verifies(&bundle, SEC1_CA.0, "10.0.0.21").is_err(), "and chains to this CA only");

    let node = cluster.node("mac-01").await;
    assert_eq!(node.spec.agent_endpoint, "https://10.0.0.21:9443");
    assert_eq!(node.spec.serving_address, "10.0.0.21");
    assert!(!node.spec.unschedulable);
    assert_eq!(node.metadata.labels.unwrap()["chip"], "m4-max");

    // Another address without --renew: refused, and the node is left as it was.
    let moved = cluster.kubectl_metalkube(&["enroll", "mac-01", "--address", "10.0.0.22"]).await;
    assert!(!moved.status.success());
    assert!(moved.stdout.is_empty(), "no bundle");
    assert!(
        stderr(&moved).contains(
            "MetalNode mac-01 is already enrolled at 10.0.0.21 (https://10.0.0.21:9443); to move it to 10.0.0.22 with a new certificate, pass --renew"
        ),
        "{}",
        stderr(&moved)
    );
    assert_eq!(cluster.node("mac-01").await.spec.serving_address, "10.0.0.21");

    // --renew: a new certificate for the new address; the labels stay.
    let renewed = cluster
        .kubectl_metalkube(&[
            "enroll",
            "mac-01",
            "--renew",
            "--address",
            "10.0.0.22",
            "--unschedulable",
            "-o",
            out.to_str().unwrap(),
        ])
        .await;
    assert!(renewed.status.success());
    let bundle = read_bundle(&out);
    verifies(&bundle, HELM_CA.0, "10.0.0.22").unwrap();
    assert!(verifies(&bundle, HELM_CA.0, "10.0.0.21").is_err());
    let node = cluster.node("mac-01").await;
    assert_eq!(node.spec.agent_endpoint, "https://10.0.0.22:9443");
    assert!(node.spec.unschedulable);
    assert_eq!(node.metadata.labels.unwrap()["chip"], "m4-max", "a renewal keeps the labels");

    // --renew without --address keeps the enrolled one (and the cordon).
    let again = cluster.kubectl_metalkube(&["enroll", "mac-01", "--renew"]).await;
    assert!(again.status.success());
    let bundle = parse_bundle(&String::from_utf8(again.stdout).unwrap(), "stdout").unwrap();
    verifies(&bundle, HELM_CA.0, "10.0.0.22").unwrap();
    assert!(cluster.node("mac-01").await.spec.unschedulable);
    assert_eq!(bundle.agent.memory_budget_bytes, Some(48 << 30), "a renewal keeps the budget it was given");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_keeps_the_port_and_what_others_set() {
    let cluster = Cluster::start().await;
    let first = cluster.kubectl_metalkube(&["enroll", "mac-04", "--address", "10.0.0.4", "--grpc-port", "9500"]).await;
    assert!(first.status.success());
    // Someone else labels and cordons the node (kubectl, GitOps).
    let nodes = Api::<MetalNode>::all(cluster.server.client());
    let theirs = serde_json::json!({"metadata": {"labels": {"team": "ml"}}, "spec": {"unschedulable": true}});
    nodes.patch("mac-04", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(theirs)).await.unwrap();

    let renewed = cluster.kubectl_metalkube(&["enroll", "mac-04", "--renew"]).await;
    assert!(renewed.status.success());
    let bundle = parse_bundle(&String::from_utf8(renewed.stdout).unwrap(), "stdout").unwrap();
    assert_eq!(bundle.agent.grpc_listen.to_string(), "0.0.0.0:9500", "the enrolled port stays");
    let node = cluster.node("mac-04").await;
    assert_eq!(node.spec.agent_endpoint, "https://10.0.0.4:9500");
    assert_eq!(node.metadata.labels.unwrap_or_default().get("team").map(String::as_str), Some("ml"));
    assert!(node.spec.unschedulable, "enroll leaves what it was not told to change");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_secret_whose_key_is_not_its_certificates_is_refused_before_anything_is_applied() {
    let cluster = Cluster::start().await;
    cluster.ca_secret("mixed-ca", (HELM_CA.0, SEC1_CA.1)).await;
    let output =
        cluster.kubectl_metalkube(&["enroll", "mac-05", "--address", "10.0.0.5", "--ca-secret", "mixed-ca"]).await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("tls.key must be the key of its tls.crt"), "{}", stderr(&output));
    assert!(output.stdout.is_empty(), "no bundle");
    assert!(Api::<MetalNode>::all(cluster.server.client()).get_opt("mac-05").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dns_name_a_cert_manager_ca_and_what_is_refused() {
    let cluster = Cluster::start().await;
    cluster.ca_secret("cm-ca", SEC1_CA).await;
    let output = cluster
        .kubectl_metalkube(&[
            "enroll",
            "mac-02",
            "--address",
            "mac-02.lan",
            "--ca-secret",
            "cm-ca",
            "--grpc-port",
            "9555",
        ])
        .await;
    assert!(output.status.success());
    let bundle = parse_bundle(&String::from_utf8(output.stdout).unwrap(), "stdout").unwrap();
    verifies(&bundle, SEC1_CA.0, "mac-02.lan").unwrap();
    assert_eq!(bundle.agent.grpc_listen.to_string(), "0.0.0.0:9555");
    assert_eq!(cluster.node("mac-02").await.spec.agent_endpoint, "https://mac-02.lan:9555");

    let cases: [(&[&str], &str); 5] = [
        (
            &["enroll", "mac-03", "--address", "10.0.0.3", "--ca-secret", "nope"],
            "Secret metalkube-system/nope not found",
        ),
        (&["enroll", "mac-03", "--renew"], "MetalNode mac-03 is not enrolled, so there is nothing to renew"),
        (&["enroll", "mac-03"], "--address is required to enroll a new Mac"),
        (&["enroll", "Mac_03", "--address", "10.0.0.3"], "NAME \"Mac_03\": a MetalNode name is 1-253 lowercase"),
        (&["enroll", "mac-03", "--address", "10.0.0.3", "--memory-budget", "48GB"], "\"48GB\" is not a size"),
    ];
    for (args, message) in cases {
        let output = cluster.kubectl_metalkube(args).await;
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr(&output).contains(message), "{args:?}: {}", stderr(&output));
    }
    assert!(
        Api::<MetalNode>::all(cluster.server.client()).get_opt("mac-03").await.unwrap().is_none(),
        "nothing applied"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_lists_every_enrolled_mac() {
    let cluster = Cluster::start().await;
    for (name, address) in [("mac-01", "10.0.0.21"), ("mac-02", "10.0.0.22")] {
        assert!(cluster.kubectl_metalkube(&["enroll", name, "--address", address]).await.status.success());
    }
    let output = cluster.kubectl_metalkube(&["status"]).await;
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("MAC "), "{table}");
    assert!(lines[1].starts_with("mac-01   Unknown "), "{table}");
    assert!(lines[2].starts_with("mac-02   Unknown "), "{table}");
    assert_eq!(lines.len(), 3, "{table}");
}
