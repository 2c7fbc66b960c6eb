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

/// A standby that reaches the API server is ready (so a 2-replica Deployment is fully
/// available); the leader is ready; a replica the API server has not answered is not.
#[tokio::test]
async fn a_standby_is_ready_to_take_over_and_an_unreachable_one_is_not() {
    use metalkube_controller::http::{ReplicaRole, Role};
    let server = TestApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(server.client(), "default");
    let duration = Duration::from_secs(30);
    let leader = LeaderElector::new(leases.clone(), "metalkube-controller", "a", duration);
    let standby = LeaderElector::new(leases, "metalkube-controller", "b", duration);
    let (leader_role, standby_role) = (ReplicaRole::default(), ReplicaRole::default());
    assert_eq!(standby_role.get(), Role::Starting);

    leader.acquire(&leader_role).await;
    // The standby's first attempt finds the lease held; it keeps waiting (it would take over
    // when the lease runs out), standing by.
    let _ = tokio::time::timeout(Duration::from_millis(500), standby.acquire(&standby_role)).await;
    assert_eq!(standby_role.get(), Role::Standby);

    let gone: Api<Lease> = Api::namespaced(
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap(),
        "default",
    );
    let cut_off = LeaderElector::new(gone, "metalkube-controller", "c", duration);
    let cut_off_role = ReplicaRole::default();
    cut_off_role.set(Role::Standby);
    let _ = tokio::time::timeout(Duration::from_millis(500), cut_off.acquire(&cut_off_role)).await;
    assert_eq!(cut_off_role.get(), Role::Starting, "no API server, not ready");
}
