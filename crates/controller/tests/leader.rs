//! Leader election on a Lease through the real kube client: one holder at a time, hand-over on
//! release, take-over when the holder stops renewing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use metalkube_controller::leader::LeaderElector;
use metalkube_testkit::apiserver::TestApiServer;

#[tokio::test]
async fn one_leader_at_a_time() {
    let server = TestApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    let duration = Duration::from_secs(1);
    let a = LeaderElector::new(leases.clone(), "metalkube-controller", "a", duration);
    let b = LeaderElector::new(leases.clone(), "metalkube-controller", "b", duration);

    assert!(a.try_hold().await.unwrap());
    assert!(!b.try_hold().await.unwrap(), "b waits while a holds a fresh lease");
    assert!(a.try_hold().await.unwrap(), "a renews");

    a.release().await;
    assert!(b.try_hold().await.unwrap(), "a released: b takes over at once");
    assert!(!a.try_hold().await.unwrap());

    // b stops renewing; once its lease has run out, a takes it.
    tokio::time::sleep(duration + Duration::from_millis(1100)).await;
    assert!(a.try_hold().await.unwrap(), "an expired lease is taken");
    let lease = leases.get("metalkube-controller").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("a"));
    assert_eq!(lease.lease_transitions, Some(3));
}
