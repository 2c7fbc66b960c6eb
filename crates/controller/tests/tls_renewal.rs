//! A renewed certificate is taken up: when the controller's TLS files change (cert-manager
//! rewrites the mounted Secret), the controller releases its lease and exits cleanly, so the
//! kubelet restarts it with the new files and the standby leads meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use metalkube_testkit::apiserver::TestApiServer;
use metalkube_testkit::pki::TestCa;
use support::{CONTROLLER_TOKEN, free_port, write_kubeconfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_restarts_the_controller_and_frees_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = TestApiServer::start().await;
    let (agent_ca, controller_ca) = (TestCa::new("metalkube agents"), TestCa::new("metalkube controller"));
    support::write_controller_tls(dir, &agent_ca, &controller_ca);
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &server.url, CONTROLLER_TOKEN);
    let args = ["--lease-name", "renewal", "--tls-check-interval", "100ms", "--identity", "renewing"];
    let mut controller = support::start_controller(dir, &kubeconfig, free_port("127.0.0.1"), &args);
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    let holder = || async {
        leases.get_opt("renewal").await.ok().flatten().and_then(|l| l.spec?.holder_identity).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while holder().await != "renewing" {
        assert!(Instant::now() < deadline, "the controller took the lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(controller.child.try_wait().unwrap().is_none(), "running while its files stay the same");

    // The renewal: a new client certificate from the same CA.
    let renewed = controller_ca.client("metalkube-controller");
    std::fs::write(dir.join("client.crt"), renewed.cert).unwrap();
    std::fs::write(dir.join("client.key"), renewed.key).unwrap();
    let status = loop {
        if let Some(status) = controller.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the controller did not exit after its certificate changed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "a clean exit, not a crash: {status}");
    assert_eq!(holder().await, "", "the lease was released for the standby");
    let log = std::fs::read_to_string(dir.join("controller.log")).unwrap();
    assert!(log.contains("TLS files changed"), "{log}");
}
