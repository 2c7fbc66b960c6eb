//! Engines a previous agent run left behind. They run in their own process groups, so they
//! survive an agent crash; on start the agent finds them by their pidfiles and stops them
//! before starting fresh ones, so no engine is ever left unsupervised.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::engine::process::PidRecord;

/// Stops every engine recorded under `dir` that is still running the recorded binary, and
/// removes the records. Returns the pids it stopped.
pub async fn reap_orphans(dir: &Path, grace: Duration) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut stopped = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let record: Option<PidRecord> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(record) = record
            && is_our_engine(&record)
        {
            tracing::warn!(pid = record.pid, port = record.port, "stopping engine left by a previous agent run");
            stop_group(record.pid, grace).await;
            stopped.push(record.pid);
        }
        let _ = std::fs::remove_file(&path);
    }
    stopped
}

/// The pid may have been reused by an unrelated process since: only a process whose command
/// line starts with the recorded binary is ours.
fn is_our_engine(record: &PidRecord) -> bool {
    let Ok(pid) = i32::try_from(record.pid) else { return false };
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let out = std::process::Command::new("ps").args(["-o", "command=", "-p", &record.pid.to_string()]).output();
    match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim_start().starts_with(&*record.binary.to_string_lossy()),
        Err(_) => false,
    }
}

async fn stop_group(pid: u32, grace: Duration) {
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    let _ = killpg(group, Signal::SIGCONT);
    let deadline = tokio::time::Instant::now() + grace;
    // Not our child, so there is no exit to wait on: check until it is gone.
    while kill(group, None).is_ok() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = killpg(group, Signal::SIGKILL);
}
