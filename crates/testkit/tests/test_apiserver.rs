//! The test API server through the real kube::Client stack: typed Api calls, server-side apply,
//! status, optimistic concurrency, finalizers, and a kube-runtime watcher.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use metalkube_api::{MetalModel, MetalModelSpec, MetalNode};
use metalkube_testkit::apiserver::TestApiServer;
use serde_json::json;

fn model(name: &str) -> MetalModel {
    let spec: MetalModelSpec = serde_json::from_value(json!({"model": {"source": "file:///m.gguf"}})).unwrap();
    let mut m = MetalModel::new(name, spec);
    m.metadata.namespace = Some("default".into());
    m
}

#[tokio::test]
async fn typed_crud_status_and_conflicts() {
    let server = TestApiServer::start().await;
    let models: Api<MetalModel> = Api::namespaced(server.client(), "default");
    let created = models.create(&PostParams::default(), &model("tiny")).await.unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(models.list(&Default::default()).await.unwrap().items.len(), 1);

    let status = json!({"status": {"readyReplicas": 2, "grade": "Green"}});
    let patched = models.patch_status("tiny", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    assert_eq!(patched.status.unwrap().ready_replicas, 2);
    assert_eq!(patched.metadata.generation, Some(1), "status writes leave the generation");

    let mut stale = created.clone();
    stale.spec.replicas = 3;
    let err = models.replace("tiny", &PostParams::default(), &stale).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "{err:?}");

    let fresh = models.get("tiny").await.unwrap();
    let mut next = fresh.clone();
    next.spec.replicas = 3;
    let replaced = models.replace("tiny", &PostParams::default(), &next).await.unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_eq!(replaced.status.unwrap().ready_replicas, 2, "a main write keeps the status");

    let nodes: Api<MetalNode> = Api::all(server.client());
    assert!(nodes.list(&Default::default()).await.unwrap().items.is_empty());
    let missing = models.get("nope").await.unwrap_err();
    assert!(matches!(missing, kube::Error::Api(ref s) if s.code == 404 && s.reason == "NotFound"), "{missing:?}");
}

#[tokio::test]
async fn server_side_apply_creates_and_updates() {
    let server = TestApiServer::start().await;
    let services: Api<Service> = Api::namespaced(server.client(), "default");
    let pp = PatchParams::apply("metalkube-controller").force();
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "tiny", "labels": {"app": "x"}},
                     "spec": {"ports": [{"port": 8080}]}});
    let created = services.patch("tiny", &pp, &Patch::Apply(&svc)).await.unwrap();
    assert_eq!(created.spec.unwrap().ports.unwrap()[0].port, 8080);
    let svc2 = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "tiny"}, "spec": {"ports": [{"port": 9090}]}});
    let updated = services.patch("tiny", &pp, &Patch::Apply(&svc2)).await.unwrap();
    assert_eq!(updated.spec.unwrap().ports.unwrap()[0].port, 9090);
    let selected = services.list(&kube::api::ListParams::default().labels("app=x")).await.unwrap();
    assert_eq!(selected.items.len(), 1);
}

#[tokio::test]
async fn finalizers_hold_deletion_and_a_watcher_sees_it_all() {
    let server = TestApiServer::start().await;
    let models: Api<MetalModel> = Api::namespaced(server.client(), "default");
    let mut events = watcher(models.clone(), watcher::Config::default()).boxed();
    // The initial list is empty.
    loop {
        if let watcher::Event::InitDone = events.next().await.unwrap().unwrap() {
            break;
        }
    }

    let mut m = model("held");
    m.metadata.finalizers = Some(vec!["metalkube.dev/engines".into()]);
    models.create(&PostParams::default(), &m).await.unwrap();
    models.delete("held", &DeleteParams::default()).await.unwrap();
    let deleting = models.get("held").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some(), "held by its finalizer");
    let release = json!({"metadata": {"finalizers": null}});
    models.patch("held", &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();
    assert!(models.get_opt("held").await.unwrap().is_none(), "gone with its last finalizer");

    let mut seen = Vec::new();
    while let Some(event) = events.next().await {
        match event.unwrap() {
            watcher::Event::Apply(o) => {
                seen.push(if o.metadata.deletion_timestamp.is_some() { "deleting" } else { "applied" })
            }
            watcher::Event::Delete(_) => {
                seen.push("deleted");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(seen, ["applied", "deleting", "deleted"]);
}

#[tokio::test]
async fn specs_that_break_the_crd_schema_are_refused_with_the_field() {
    let server = TestApiServer::start().await;
    let models: Api<MetalModel> = Api::namespaced(server.client(), "default");
    let bad = json!({"apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel", "metadata": {"name": "bad"},
                     "spec": {"model": {"source": "s3://bucket/m.gguf"}, "engine": {"contextSize": 16, "gpuLayers": 0, "parallel": 1, "startupTimeout": "1m"}}});
    let err = models.patch("bad", &PatchParams::apply("t"), &Patch::Apply(&bad)).await.unwrap_err();
    let kube::Error::Api(status) = err else { panic!("{err:?}") };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(
        status.message.contains("spec.model.source") && status.message.contains("spec.engine.contextSize"),
        "{}",
        status.message
    );
    assert!(models.get_opt("bad").await.unwrap().is_none(), "nothing was stored");

    models.create(&PostParams::default(), &model("good")).await.unwrap();
    let err = models
        .patch("good", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": -1}})))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.message.contains("spec.replicas")), "{err:?}");
}

#[tokio::test]
async fn kube_runtime_finalizer_helper_works_through_json_patch() {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event, finalizer};
    let server = TestApiServer::start().await;
    let models: Api<MetalModel> = Api::namespaced(server.client(), "default");
    models.create(&PostParams::default(), &model("f")).await.unwrap();
    let run = |m: MetalModel| {
        let api = models.clone();
        async move {
            finalizer(&api, "metalkube.dev/test", std::sync::Arc::new(m), |e| async move {
                Ok::<_, std::io::Error>(match e {
                    Event::Apply(_) => Action::await_change(),
                    Event::Cleanup(_) => Action::await_change(),
                })
            })
            .await
        }
    };
    run(models.get("f").await.unwrap()).await.unwrap();
    assert_eq!(models.get("f").await.unwrap().metadata.finalizers, Some(vec!["metalkube.dev/test".into()]));
    models.delete("f", &DeleteParams::default()).await.unwrap();
    run(models.get("f").await.unwrap()).await.unwrap();
    assert!(models.get_opt("f").await.unwrap().is_none(), "cleanup removed the finalizer and the object");
}

#[tokio::test]
async fn a_metalnode_serving_address_must_be_an_ip_or_a_dns_name() {
    let server = TestApiServer::start().await;
    let nodes: Api<metalkube_api::MetalNode> = Api::all(server.client());
    let node = |name: &str, address: &str| {
        json!({"apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalNode", "metadata": {"name": name},
               "spec": {"agentEndpoint": "https://mac:9443", "servingAddress": address}})
    };
    for (name, good) in [("v4", "10.0.0.21"), ("v6", "fd00::21"), ("dns", "mac-01.lan")] {
        nodes.patch(name, &PatchParams::apply("t"), &Patch::Apply(&node(name, good))).await.unwrap();
    }
    for bad in ["http://10.0.0.21", "10.0.0.21:9090", "", "Mac 01"] {
        let err = nodes.patch("bad", &PatchParams::apply("t"), &Patch::Apply(&node("bad", bad))).await.unwrap_err();
        assert!(
            matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.message.contains("spec.servingAddress")),
            "{bad:?}: {err:?}"
        );
    }
}
