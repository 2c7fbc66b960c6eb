//! `https://` model sources on the real engine: downloaded once into the model cache, verified
//! against spec.model.sha256, refused clearly when the hash, the server or the certificate is
//! wrong, and never leaving a partial file behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;

use metalkube_api::Phase;
use metalkube_testkit::https_files::HttpsFiles;
use metalkube_testkit::pki::TestCa;
use sha2::{Digest, Sha256};
use support::{Harness, fast_backoff, port_block};

fn cache_entries(h: &Harness) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(h.dir.path().join("state/models"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn https_sources_are_downloaded_once_verified_and_refused_clearly() {
    let mirror_ca = TestCa::new("model mirror");
    let model_dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(metalkube_testkit::tiny_model(model_dir.path())).unwrap();
    let sha = format!("{:x}", Sha256::digest(&bytes));
    let server = HttpsFiles::serve(&mirror_ca, HashMap::from([("/m/tiny.gguf".to_owned(), bytes)])).await;
    let url = format!("{}/m/tiny.gguf", server.url);
    let h = Harness::with_download_ca(
        metalkube_testkit::real_engine(),
        port_block(),
        fast_backoff(),
        Some(mirror_ca.cert_pem.clone()),
    )
    .await;

    let mut first = h.desired("remote-a", Some(&url));
    first.spec.model.sha256 = Some(sha.clone());
    h.agent.upsert(first.clone()).await;
    let r = h.wait_for("default/remote-a", "serving", |r| r.phase == Phase::Serving).await;
    assert!(r.memory_bytes.is_some_and(|m| m > 0), "the estimate is read from the downloaded header");
    assert_eq!(cache_entries(&h), [format!("sha256-{sha}.gguf")], "content-addressed, no partial file left");

    let mut second = first.clone();
    second.name = "remote-b".into();
    h.agent.upsert(second).await;
    h.wait_for("default/remote-b", "serving", |r| r.phase == Phase::Serving).await;
    assert_eq!(server.requests(), 1, "the second model reuses the cached file");

    let mut wrong_hash = h.desired("wrong-hash", Some(&url));
    wrong_hash.spec.model.sha256 = Some("0".repeat(64));
    h.agent.upsert(wrong_hash).await;
    let r = h.wait_for("default/wrong-hash", "failed", |r| r.phase == Phase::Failed).await;
    let message = r.last_error.unwrap();
    assert!(message.contains(&sha) && message.contains("spec.model.sha256 wants"), "{message}");

    h.agent.upsert(h.desired("missing", Some(&format!("{}/m/nope.gguf", server.url)))).await;
    let r = h.wait_for("default/missing", "failed", |r| r.phase == Phase::Failed).await;
    assert!(r.last_error.as_deref().unwrap().contains("HTTP 404"), "{r:#?}");
    assert_eq!(r.restarts, 0, "a bad source is Failed, not a crash loop");
    assert_eq!(cache_entries(&h), [format!("sha256-{sha}.gguf")], "failed downloads leave nothing behind");
    h.agent.shutdown().await;

    // Without the mirror's CA the certificate is not trusted.
    let untrusting = Harness::with(metalkube_testkit::real_engine(), port_block(), fast_backoff()).await;
    untrusting.agent.upsert(untrusting.desired("untrusted", Some(&url))).await;
    let r = untrusting.wait_for("default/untrusted", "failed", |r| r.phase == Phase::Failed).await;
    assert!(r.last_error.as_deref().unwrap().contains("downloading"), "{r:#?}");
    assert!(cache_entries(&untrusting).is_empty());
    untrusting.agent.shutdown().await;
}
