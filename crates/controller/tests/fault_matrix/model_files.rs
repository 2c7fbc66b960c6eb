//! Faults of the model's files (rows 5 and 8): a truncated GGUF crash-loops with every request
//! refused as not ready; a download larger than the free disk fails before a byte is written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use metalkube_testkit::https_files::HttpsFiles;
use metalkube_testkit::pki::TestCa;

use crate::clients::Load;
use crate::row::{Pulse, Row, bounded, chat_url, file_source, spec};
use crate::standalone::{AgentOpts, Standalone, serving_tiny, wait_model};
use crate::support::free_port;

/// A size-limited tmpfs mounted on a directory for as long as it lives.
struct Tmpfs(pub PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs on {} (needs root): {status}", dir.display());
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

// --- row 5 ----------------------------------------------------------------------------------

pub async fn truncated_model(row: Row) {
    let model = row.tiny_model("truncated");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let mut agent = Standalone::start(&row, AgentOpts { backoff_max: Some("1s"), ..Default::default() });
    let port = free_port("127.0.0.1");
    agent.serve("truncated", &spec(&file_source(&model), port, Pulse::Calm, "3s"));
    wait_model(&agent.api, "truncated", "listening on its serving port", |m| m["servingPort"] == port).await;
    let load = Load::start(&chat_url("127.0.0.1", port), &row.tally, 3);
    let looping = wait_model(&agent.api, "truncated", "in CrashLoopBackOff", |m| {
        m["phase"] == "CrashLoopBackOff" && m["restarts"].as_u64() >= Some(2)
    })
    .await;
    bounded("ten refusals", || async { (row.tally.counts().definite >= 10).then_some(()) }).await;
    load.stop().await;
    let message = looping["lastError"].as_str().unwrap_or_default().to_owned();
    row.note(format!("last error: {message}"));
    assert!(message.contains("engine exited"), "{looping:#}");
    let counts = row.tally.counts();
    assert_eq!(counts.completed, 0);
    assert_eq!(
        counts.kinds.keys().collect::<Vec<_>>(),
        ["503 not_ready"],
        "every request is refused as not ready, with Retry-After"
    );
    agent.stop();
    row.summarize(format!(
        "CrashLoopBackOff ({} restarts); every request 503 not_ready + Retry-After",
        looping["restarts"]
    ));
}

// --- row 8 ----------------------------------------------------------------------------------

pub async fn disk_full_download(row: Row) {
    let state = row.path().join("state");
    let tmpfs = Tmpfs::mount(&state, "2m");
    let mirror_ca = TestCa::new("fault matrix mirror");
    let ca_path = row.path().join("mirror-ca.pem");
    std::fs::write(&ca_path, &mirror_ca.cert_pem).unwrap();
    // Larger than the whole state disk: any GGUF would do, and the download never gets far
    // enough for the content to matter.
    let big_size = 3usize << 20;
    let server =
        HttpsFiles::serve(&mirror_ca, HashMap::from([("/models/big.gguf".to_owned(), vec![0x5a_u8; big_size])])).await;
    let opts = AgentOpts { state_dir: Some(state.clone()), download_ca: Some(ca_path), ..Default::default() };
    let (mut agent, _, load, _) = serving_tiny(&row, opts, Pulse::Calm, "3s", 3).await;

    let big_port = free_port("127.0.0.1");
    let url = format!("{}/models/big.gguf", server.url);
    agent.serve("big", &spec(&url, big_port, Pulse::Calm, "3s"));
    let failed = wait_model(&agent.api, "big", "Failed", |m| m["phase"] == "Failed").await;
    let message = failed["lastError"].as_str().unwrap_or_default().to_owned();
    row.note(format!("big: {message}"));
    // Sized up before a byte is written: the 2 MiB disk (holding tiny already) cannot take it.
    assert!(message.contains(&format!("needs {big_size} more bytes")) && message.contains("are free"), "{failed:#}");
    assert_eq!(failed["restarts"], 0, "a full disk is Failed, not a crash loop");
    let cache: Vec<String> = std::fs::read_dir(state.join("models"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(cache.is_empty(), "no partial download left: {cache:?}");
    assert!(server.requests() >= 1);
    row.tally.completions_since(Instant::now(), 5, "tiny still serving").await;
    load.stop().await;
    let counts = row.tally.counts();
    assert_eq!(counts.definite, 0, "tiny's clients never noticed: {:?}", counts.kinds);
    agent.stop();
    drop(tmpfs);
    let free = message.split("only ").nth(1).and_then(|s| s.split(' ').next()).unwrap_or("?").to_owned();
    row.summarize(format!(
        "big Failed before downloading: needs {big_size} bytes, {free} free; nothing written; tiny kept serving"
    ));
}
