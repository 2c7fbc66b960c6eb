//! A model from a gated hub repository in a cluster: the controller reads the token from
//! `spec.model.tokenSecretRef` and hands it to the agent over mTLS; a Secret made after the
//! model still reaches the agent, the token goes to the hub only, and no log shows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use metalkube_api::{MetalModel, MetalNode, Phase};
use metalkube_testkit::apiserver::TestApiServer;
use metalkube_testkit::hub::{HubEntry, TestHub};
use metalkube_testkit::pki::TestCa;
use serde_json::json;
use support::{
    CONTROLLER_TOKEN, FAST_TIMINGS, Mac, free_port, start_controller, write_controller_tls, write_kubeconfig,
};

const TOKEN: &str = "hf_cluster_secret_token";

async fn wait_for<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "not {what} within 90 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_token_from_a_secret_made_after_the_model_reaches_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    let server = TestApiServer::start().await;
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &server.url, CONTROLLER_TOKEN);
    let client = server.client();

    let hub_ca = TestCa::new("test hub");
    let tiny = std::fs::read(metalkube_testkit::tiny_model(dir)).unwrap();
    let entry =
        HubEntry { repo: "gated/tiny-GGUF".into(), revision: "main".into(), path: "tiny.gguf".into(), bytes: tiny };
    let hub = TestHub::serve(&hub_ca, vec![entry], Some(TOKEN)).await;
    std::fs::write(dir.join("hub-ca.crt"), &hub_ca.cert_pem).unwrap();

    let ca = TestCa::new("metalkube-ca");
    let mut mac = Mac::new("hub-mac", "127.0.0.12", "23300-23349", dir, &ca, &ca);
    mac.extra_args = vec![
        "--hf-endpoint".into(),
        hub.endpoint.clone(),
        "--download-ca".into(),
        dir.join("hub-ca.crt").display().to_string(),
    ];
    mac.start();
    write_controller_tls(dir, &ca, &ca);
    let args: Vec<&str> =
        FAST_TIMINGS.iter().copied().chain(["--api-keys-resync", "1s", "--namespace", "metalkube-system"]).collect();
    let _controller = start_controller(dir, &kubeconfig, free_port("127.0.0.1"), &args);

    let node: MetalNode = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalNode",
        "metadata": {"name": "hub-mac"},
        "spec": {"agentEndpoint": mac.endpoint(), "servingAddress": mac.ip}
    }))
    .unwrap();
    Api::<MetalNode>::all(client.clone()).create(&PostParams::default(), &node).await.unwrap();
    let model: MetalModel = serde_json::from_value(json!({
        "apiVersion": "metalkube.dev/v1alpha1", "kind": "MetalModel",
        "metadata": {"name": "gated", "namespace": "default"},
        "spec": {
            "model": {"source": "hf://gated/tiny-GGUF/tiny.gguf", "tokenSecretRef": {"name": "hf-token", "key": "token"}},
            "engine": {"contextSize": 512, "gpuLayers": 0, "parallel": 2, "extraArgs": ["--threads", "1"]},
            "pulse": {"interval": "500ms", "timeout": "3s", "yellowAfter": "1s", "redAfter": "2s"}
        }
    }))
    .unwrap();
    let models: Api<MetalModel> = Api::namespaced(client.clone(), "default");
    models.create(&PostParams::default(), &model).await.unwrap();

    // No Secret yet: the hub refuses, and the replica says what to do.
    let message = wait_for("gated Failed with the hub's refusal", async || {
        let m = models.get("gated").await.ok()?;
        let r = m.status?.replicas.into_iter().next()?;
        (r.phase == Phase::Failed).then_some(r.message?)
    })
    .await;
    assert!(message.contains("HTTP 401") && message.contains("tokenSecretRef"), "{message}");

    // The Secret arrives later: the controller reads it on its next pass and the agent,
    // rechecking its failed model, downloads with it.
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("hf-token".into()), ..Default::default() },
        data: Some(BTreeMap::from([("token".to_owned(), ByteString(format!("{TOKEN}\n").into_bytes()))])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), "default").create(&PostParams::default(), &secret).await.unwrap();
    wait_for("gated ready", async || {
        let m = models.get("gated").await.ok()?;
        (m.status?.ready_replicas == 1).then_some(())
    })
    .await;

    let seen = hub.seen();
    let bearer = format!("Bearer {TOKEN}");
    assert!(seen.iter().any(|s| s.host == "hub" && s.authorization.as_deref() == Some(bearer.as_str())), "{seen:#?}");
    assert!(seen.iter().filter(|s| s.host == "cdn").all(|s| s.authorization.is_none()), "never to the CDN");
    let status = serde_json::to_string(&models.get("gated").await.unwrap().status).unwrap();
    let logs =
        std::fs::read_to_string(mac.log()).unwrap() + &std::fs::read_to_string(dir.join("controller.log")).unwrap();
    for (place, text) in [("status", &status), ("logs", &logs)] {
        assert!(!text.contains(TOKEN), "the token shows in the {place}");
    }
}
