//! Remote model sources on the real engine. `https://`: downloaded once into the model cache,
//! verified against spec.model.sha256, refused clearly when the hash, the server or the
//! certificate is wrong, never leaving a partial file behind. `hf://`: through a hub-like
//! server (resolve, redirect to a CDN host, token, X-Linked-ETag, Range/If-Range) that cuts the
//! transfer halfway: resumed where it stopped, split shards fetched, the cache limit kept.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;

use metalkube_agent::model::Token;
use metalkube_api::{ModelKey, Phase};
use metalkube_testkit::https_files::HttpsFiles;
use metalkube_testkit::hub::{HubEntry, TestHub};
use metalkube_testkit::pki::TestCa;
use sha2::{Digest, Sha256};
use support::{Harness, fast_backoff, port_block, test_downloads};

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
    let r = h.wait_for(&ModelKey::new("default", "remote-a"), "serving", |r| r.phase == Phase::Serving).await;
    assert!(r.memory_bytes.is_some_and(|m| m > 0), "the estimate is read from the downloaded header");
    assert_eq!(
        cache_entries(&h),
        [format!("sha256-{sha}.gguf"), format!("sha256-{sha}.gguf.sha256")],
        "content-addressed (with its digest), no partial file left"
    );

    let mut second = first.clone();
    second.name = "remote-b".into();
    h.agent.upsert(second).await;
    h.wait_for(&ModelKey::new("default", "remote-b"), "serving", |r| r.phase == Phase::Serving).await;
    assert_eq!(
        server.requests(),
        2,
        "one probe and one transfer, for the first model only: the second reuses the file"
    );

    let mut wrong_hash = h.desired("wrong-hash", Some(&url));
    wrong_hash.spec.model.sha256 = Some("0".repeat(64));
    h.agent.upsert(wrong_hash).await;
    let r = h.wait_for(&ModelKey::new("default", "wrong-hash"), "failed", |r| r.phase == Phase::Failed).await;
    let message = r.last_error.unwrap();
    assert!(message.contains(&sha) && message.contains("spec.model.sha256 wants"), "{message}");
    // Asked again with the same wrong digest (here by an unrelated change): not downloaded again.
    let before = server.requests();
    let mut again = h.desired("wrong-hash", Some(&url));
    again.spec.model.sha256 = Some("0".repeat(64));
    again.spec.pulse.red_streak += 1;
    h.agent.upsert(again).await;
    let r = h
        .wait_for(&ModelKey::new("default", "wrong-hash"), "failed from memory", |r| {
            r.phase == Phase::Failed && r.last_error.as_deref().is_some_and(|e| e.contains("downloaded earlier"))
        })
        .await;
    assert!(r.last_error.unwrap().contains(&sha));
    assert_eq!(server.requests(), before, "a known mismatch costs no download");

    h.agent.upsert(h.desired("missing", Some(&format!("{}/m/nope.gguf", server.url)))).await;
    let r = h.wait_for(&ModelKey::new("default", "missing"), "failed", |r| r.phase == Phase::Failed).await;
    assert!(r.last_error.as_deref().unwrap().contains("HTTP 404"), "{r:#?}");
    assert_eq!(r.restarts, 0, "a bad source is Failed, not a crash loop");
    assert_eq!(
        cache_entries(&h),
        [format!("sha256-{sha}.gguf"), format!("sha256-{sha}.gguf.sha256")],
        "failed downloads leave nothing behind"
    );
    h.agent.shutdown().await;

    // Without the mirror's CA the certificate is not trusted.
    let untrusting = Harness::with(metalkube_testkit::real_engine(), port_block(), fast_backoff()).await;
    untrusting.agent.upsert(untrusting.desired("untrusted", Some(&url))).await;
    let r = untrusting.wait_for(&ModelKey::new("default", "untrusted"), "failed", |r| r.phase == Phase::Failed).await;
    assert!(r.last_error.as_deref().unwrap().contains("downloading"), "{r:#?}");
    assert!(cache_entries(&untrusting).is_empty());
    untrusting.agent.shutdown().await;
}

const TOKEN: &str = "hf_test_token";
const REPO: &str = "metalkube/tiny-GGUF";

fn entry(path: &str, bytes: &[u8]) -> HubEntry {
    HubEntry { repo: REPO.into(), revision: "main".into(), path: path.into(), bytes: bytes.to_vec() }
}

fn hub_harness_downloads(
    ca: &TestCa,
    hub: &TestHub,
    cache_max_bytes: Option<u64>,
) -> metalkube_agent::engine::download::DownloadConfig {
    metalkube_agent::engine::download::DownloadConfig {
        hub_endpoint: hub.endpoint.clone(),
        hub_token: Token::new(TOKEN),
        cache_max_bytes,
        ..test_downloads(Some(ca.cert_pem.clone()))
    }
}

fn sha256_of(path: &std::path::Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

#[tokio::test(flavor = "multi_thread")]
async fn hub_sources_resume_after_a_cut_fetch_every_shard_and_keep_the_cache_limit() {
    let ca = TestCa::new("test hub");
    let model_dir = tempfile::tempdir().unwrap();
    let tiny = std::fs::read(metalkube_testkit::tiny_model(model_dir.path())).unwrap();
    let tiny_sha = format!("{:x}", Sha256::digest(&tiny));
    // The second shard's bytes are never read: the first is a whole GGUF without split
    // metadata, so llama.cpp loads it alone. What is tested is that every shard is fetched
    // next to the first under its own name.
    let shard2: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let hub = TestHub::serve(
        &ca,
        vec![
            entry("tiny.gguf", &tiny),
            entry("split/tiny-00001-of-00002.gguf", &tiny),
            entry("split/tiny-00002-of-00002.gguf", &shard2),
        ],
        Some(TOKEN),
    )
    .await;
    let cut = 200_000u64;
    hub.cut_after(cut);
    hub.pace(16 << 10, std::time::Duration::from_millis(100));
    let h = Harness::with_downloads(metalkube_testkit::real_engine(), hub_harness_downloads(&ca, &hub, None)).await;
    let cache = h.dir.path().join("state/models/hf").join(REPO).join("main");

    let mut tiny_model = h.desired("tiny", Some(&format!("hf://{REPO}/tiny.gguf")));
    tiny_model.spec.model.sha256 = Some(tiny_sha.clone());
    h.agent.upsert(tiny_model).await;
    let downloading = h
        .wait_for(&ModelKey::new("default", "tiny"), "downloading with a known size", |r| {
            r.phase == Phase::Downloading
                && r.download.as_ref().is_some_and(|d| d.total_bytes == Some(tiny.len() as u64) && d.done_bytes > 0)
        })
        .await;
    let progress = downloading.download.unwrap();
    let during = h.metrics().await;
    for series in [
        "metalkube_agent_model_download_bytes{model=\"default/tiny\"}".to_owned(),
        format!("metalkube_agent_model_download_size_bytes{{model=\"default/tiny\"}} {}", tiny.len()),
        "metalkube_agent_model_download_rate_bytes_per_second{model=\"default/tiny\"}".to_owned(),
    ] {
        assert!(during.contains(&series), "{series} while downloading:\n{during}");
    }
    assert!(progress.bytes_per_second.is_some_and(|r| r > 0.0) && progress.eta_seconds.is_some(), "{progress:?}");
    let tiny_report = h.wait_for(&ModelKey::new("default", "tiny"), "serving", |r| r.phase == Phase::Serving).await;
    assert_eq!(sha256_of(&cache.join("tiny.gguf")), tiny_sha);

    let seen = hub.seen();
    let cdn_transfers: Vec<_> = seen
        .iter()
        .filter(|s| s.host == "cdn" && s.path.ends_with(&tiny_sha) && s.range.as_deref() != Some("bytes=0-0"))
        .collect();
    let resumed: Vec<u64> = cdn_transfers
        .iter()
        .filter_map(|s| s.range.as_deref()?.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .collect();
    assert_eq!(cdn_transfers.len(), 2, "one cut transfer and one resumed: {seen:#?}");
    assert_eq!(cdn_transfers[0].body_bytes, cut, "the first transfer was cut");
    assert_eq!(resumed.len(), 1, "the second asked for a range: {seen:#?}");
    let from = resumed[0];
    assert!(from > 0 && from <= cut, "resumed from what reached the disk ({from}), not from zero");
    assert_eq!(cdn_transfers[1].if_range.as_deref(), Some(format!("\"{tiny_sha}\"").as_str()), "guarded by If-Range");
    assert_eq!(cdn_transfers[1].body_bytes, tiny.len() as u64 - from, "only the rest was sent again");
    println!(
        "resume: file {} bytes; first transfer cut after {} bytes; resumed with Range bytes={from}-; \
         second transfer {} bytes; sent in all {} bytes",
        tiny.len(),
        cdn_transfers[0].body_bytes,
        cdn_transfers[1].body_bytes,
        cdn_transfers[0].body_bytes + cdn_transfers[1].body_bytes
    );
    assert!(
        seen.iter().filter(|s| s.host == "hub").all(|s| s.authorization.as_deref() == Some("Bearer hf_test_token"))
    );
    assert!(
        seen.iter().filter(|s| s.host == "cdn").all(|s| s.authorization.is_none()),
        "the token never leaves the hub"
    );
    let metrics = h.metrics().await;
    assert!(metrics.contains("metalkube_agent_download_resumes_total 1"), "{metrics}");
    assert!(!metrics.contains("metalkube_agent_model_download_bytes{"), "no download series once done");

    // A split model: every shard lands next to the first, which the engine loads.
    h.agent.upsert(h.desired("split", Some(&format!("hf://{REPO}/split/tiny-00001-of-00002.gguf")))).await;
    let split_report = h.wait_for(&ModelKey::new("default", "split"), "serving", |r| r.phase == Phase::Serving).await;
    assert_eq!(
        split_report.memory_bytes,
        tiny_report.memory_bytes.map(|m| m + shard2.len() as u64),
        "the memory estimate counts the shards the first one's header does not describe"
    );
    assert_eq!(sha256_of(&cache.join("split/tiny-00002-of-00002.gguf")), format!("{:x}", Sha256::digest(&shard2)));
    assert_eq!(sha256_of(&cache.join("split/tiny-00001-of-00002.gguf")), tiny_sha);

    // A wrong token (the model's own, taking precedence over the agent's) is refused clearly.
    let mut denied = h.desired("denied", Some(&format!("hf://{REPO}/tiny.gguf@v2")));
    denied.hub_token = Token::new("hf_wrong");
    h.agent.upsert(denied).await;
    let r = h.wait_for(&ModelKey::new("default", "denied"), "failed", |r| r.phase == Phase::Failed).await;
    let message = r.last_error.unwrap_or_default();
    assert!(message.contains("HTTP 401") && message.contains("HF_TOKEN") && !message.contains("hf_wrong"), "{message}");

    // spec.model.sha256 that the hub contradicts: refused before a byte moves.
    let before = hub.seen().len();
    let mut conflicting = h.desired("conflict", Some(&format!("hf://{REPO}/split/tiny-00002-of-00002.gguf")));
    conflicting.spec.model.sha256 = Some("0".repeat(64));
    std::fs::remove_file(cache.join("split/tiny-00002-of-00002.gguf")).unwrap();
    h.agent.upsert(conflicting).await;
    let r = h.wait_for(&ModelKey::new("default", "conflict"), "failed", |r| r.phase == Phase::Failed).await;
    let message = r.last_error.unwrap_or_default();
    assert!(message.contains("the hub says") && message.contains(&"0".repeat(64)), "{message}");
    assert!(hub.seen()[before..].iter().all(|s| s.range.as_deref() == Some("bytes=0-0")), "only probes");
    h.agent.shutdown().await;

    // The cache limit: an unused model file goes when a new one would not fit; used ones stay.
    let limited = Harness::with_downloads(
        metalkube_testkit::real_engine(),
        hub_harness_downloads(&ca, &hub, Some(tiny.len() as u64 + 1_000)),
    )
    .await;
    let cache = limited.dir.path().join("state/models/hf").join(REPO).join("main");
    limited.agent.upsert(limited.desired("first", Some(&format!("hf://{REPO}/tiny.gguf")))).await;
    limited.wait_for(&ModelKey::new("default", "first"), "serving", |r| r.phase == Phase::Serving).await;
    assert!(limited.agent.remove(&ModelKey::new("default", "first")).await);
    limited.agent.upsert(limited.desired("second", Some(&format!("hf://{REPO}/split/tiny-00001-of-00002.gguf")))).await;
    limited.wait_for(&ModelKey::new("default", "second"), "serving", |r| r.phase == Phase::Serving).await;
    assert!(!cache.join("tiny.gguf").exists(), "the unused file was removed");
    assert!(
        cache.join("split/tiny-00001-of-00002.gguf").is_file()
            && cache.join("split/tiny-00002-of-00002.gguf").is_file()
    );
    limited.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_models_naming_one_file_fetch_it_once() {
    let ca = TestCa::new("test hub");
    let model_dir = tempfile::tempdir().unwrap();
    let tiny = std::fs::read(metalkube_testkit::tiny_model(model_dir.path())).unwrap();
    let hub = TestHub::serve(&ca, vec![entry("tiny.gguf", &tiny)], Some(TOKEN)).await;
    // Slow enough that the second model asks while the first is still downloading.
    hub.pace(16 << 10, std::time::Duration::from_millis(150));
    let h = Harness::with_downloads(metalkube_testkit::real_engine(), hub_harness_downloads(&ca, &hub, None)).await;
    let source = format!("hf://{REPO}/tiny.gguf");
    h.agent.apply(vec![h.desired("one", Some(&source)), h.desired("two", Some(&source))]).await;
    let seen_while = h
        .wait_for(&ModelKey::new("default", "two"), "downloading with progress (shared with the first)", |r| {
            r.phase == Phase::Downloading && r.download.as_ref().is_some_and(|d| d.done_bytes > 0)
        })
        .await;
    assert!(seen_while.download.is_some_and(|d| d.total_bytes == Some(tiny.len() as u64)));
    h.wait_for(&ModelKey::new("default", "one"), "serving", |r| r.phase == Phase::Serving).await;
    h.wait_for(&ModelKey::new("default", "two"), "serving", |r| r.phase == Phase::Serving).await;
    let transfers = hub.seen().iter().filter(|s| s.host == "cdn" && s.range.as_deref() != Some("bytes=0-0")).count();
    assert_eq!(transfers, 1, "one transfer for both models: {:#?}", hub.seen());
    h.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partial_file_that_is_already_whole_is_finished_not_fetched_again() {
    let ca = TestCa::new("test hub");
    let model_dir = tempfile::tempdir().unwrap();
    let tiny = std::fs::read(metalkube_testkit::tiny_model(model_dir.path())).unwrap();
    let tiny_sha = format!("{:x}", Sha256::digest(&tiny));
    let hub = TestHub::serve(&ca, vec![entry("tiny.gguf", &tiny)], Some(TOKEN)).await;
    let h = Harness::with_downloads(metalkube_testkit::real_engine(), hub_harness_downloads(&ca, &hub, None)).await;
    // Cut between the last byte and the rename: the whole file sits in `.partial`.
    let cache = h.dir.path().join("state/models/hf").join(REPO).join("main");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("tiny.gguf.partial"), &tiny).unwrap();
    std::fs::write(cache.join("tiny.gguf.partial.validator"), format!("\"{tiny_sha}\"")).unwrap();
    h.agent.upsert(h.desired("tiny", Some(&format!("hf://{REPO}/tiny.gguf")))).await;
    h.wait_for(&ModelKey::new("default", "tiny"), "serving", |r| r.phase == Phase::Serving).await;
    let cdn: Vec<_> =
        hub.seen().into_iter().filter(|s| s.host == "cdn" && s.range.as_deref() != Some("bytes=0-0")).collect();
    assert_eq!(cdn.len(), 1, "{cdn:#?}");
    assert_eq!(
        (cdn[0].range.clone(), cdn[0].status, cdn[0].body_bytes),
        (Some(format!("bytes={}-", tiny.len())), 416, 0)
    );
    assert_eq!(sha256_of(&cache.join("tiny.gguf")), tiny_sha);
    assert!(!cache.join("tiny.gguf.partial").exists());
    h.agent.shutdown().await;
}
