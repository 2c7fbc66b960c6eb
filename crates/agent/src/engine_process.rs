//! One running llama-server: spawned in its own process group, its output kept in a log file
//! (and the last lines in memory for error messages), its exit noticed the moment it happens,
//! and stopped with SIGTERM, a grace period, then SIGKILL of the whole group.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use crate::AgentError;

const TAIL_LINES: usize = 40;
const PUMP_DRAIN: Duration = Duration::from_secs(1);
/// A log larger than this is moved to `<name>.log.1` before the next line is written.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// What the agent writes next to each engine so a later agent run can find it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PidRecord {
    pub pid: u32,
    pub binary: PathBuf,
    pub port: u16,
}

pub struct EngineProcess {
    pid: u32,
    port: u16,
    started: Instant,
    exit: watch::Receiver<Option<ExitStatus>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    pidfile: PathBuf,
}

impl EngineProcess {
    pub fn spawn(
        binary: &Path,
        args: Vec<OsString>,
        port: u16,
        log_path: &Path,
        pidfile: &Path,
    ) -> Result<Self, AgentError> {
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so stopping it reaches anything it forks, and a signal aimed at the
            // agent's group (Ctrl-C) does not hit it behind the supervisor's back.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| AgentError::Spawn { binary: binary.to_owned(), source })?;
        let pid = child.id().ok_or_else(|| AgentError::Spawn {
            binary: binary.to_owned(),
            source: std::io::Error::other("exited before its pid could be read"),
        })?;
        let record = PidRecord { pid, binary: binary.to_owned(), port };
        write_pidfile(pidfile, &record)?;

        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let log = Arc::new(tokio::sync::Mutex::new(LogFile::open(log_path)));
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump_lines(out, log.clone(), tail.clone())));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump_lines(err, log, tail.clone())));
        }
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            // The exit is explained by the last lines the engine wrote: read them to the end
            // before anyone classifies the exit (bounded, in case a grandchild holds the pipe).
            let _ = tokio::time::timeout(PUMP_DRAIN, futures::future::join_all(pumps)).await;
            // A wait error leaves no status; report a synthetic failure so nobody waits forever.
            let status = status.unwrap_or_else(failed_status);
            let _ = exit_tx.send(Some(status));
        });
        Ok(Self { pid, port, started: Instant::now(), exit, tail, pidfile: pidfile.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Resolves when the process has exited (at once if it already has).
    pub async fn exited(&self) -> ExitStatus {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(status) => status.unwrap_or_else(failed_status),
            Err(_) => failed_status(),
        }
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// The last lines the engine printed, oldest first.
    pub fn tail(&self) -> Vec<String> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// SIGTERM (and SIGCONT, so a stopped engine can act on it), `grace`, then SIGKILL to the
    /// process group. Returns once the engine is gone and its pidfile removed.
    pub async fn stop(self, grace: Duration) -> ExitStatus {
        let group = Pid::from_raw(self.pid as i32);
        if !self.has_exited() {
            let _ = killpg(group, Signal::SIGTERM);
            let _ = killpg(group, Signal::SIGCONT);
        }
        let status = match tokio::time::timeout(grace, self.exited()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(pid = self.pid, "engine ignored SIGTERM for {grace:?}; sending SIGKILL");
                let _ = killpg(group, Signal::SIGKILL);
                self.exited().await
            }
        };
        // Whatever the leader left behind in its group goes too.
        let _ = killpg(group, Signal::SIGKILL);
        let _ = std::fs::remove_file(&self.pidfile);
        status
    }
}

fn failed_status() -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus::from_raw(1 << 8)
}

fn write_pidfile(path: &Path, record: &PidRecord) -> Result<(), AgentError> {
    let io = |source| AgentError::StateDir { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let json = serde_json::to_vec(record).map_err(|e| io(std::io::Error::other(e)))?;
    std::fs::write(&tmp, json).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

struct LogFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    written: u64,
}

impl LogFile {
    fn open(path: &Path) -> Self {
        Self { path: path.to_owned(), file: None, written: u64::MAX }
    }

    async fn write_line(&mut self, line: &str) {
        if self.written >= LOG_ROTATE_BYTES {
            self.file = None;
            if self.written != u64::MAX || tokio::fs::metadata(&self.path).await.is_ok() {
                let _ = tokio::fs::rename(&self.path, self.path.with_extension("log.1")).await;
            }
            if let Some(dir) = self.path.parent() {
                let _ = tokio::fs::create_dir_all(dir).await;
            }
            self.file = tokio::fs::File::create(&self.path).await.ok();
            self.written = 0;
        }
        if let Some(f) = self.file.as_mut() {
            let _ = f.write_all(line.as_bytes()).await;
            let _ = f.write_all(b"\n").await;
            self.written += line.len() as u64 + 1;
        }
    }
}

async fn pump_lines(
    stream: impl AsyncRead + Unpin,
    log: Arc<tokio::sync::Mutex<LogFile>>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log.lock().await.write_line(&line).await;
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}
