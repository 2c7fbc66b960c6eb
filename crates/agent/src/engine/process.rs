//! One running llama-server: spawned in its own process group, its output kept in a log file
//! (and the last lines in memory for error messages), its exit noticed the moment it happens,
//! and stopped with SIGTERM, a grace period, then SIGKILL of the whole group.
//!
//! The engine logs several lines per request. Its stdout and stderr share one pipe, which a
//! plain thread copies to the log file a read at a time: no task wake-up per line and no trip
//! through tokio's blocking pool per write (that was a third of a core at 1,700 requests a
//! second, spent outside the serving path).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

const TAIL_LINES: usize = 40;
const PUMP_DRAIN: Duration = Duration::from_secs(1);
/// A log larger than this is moved to `<name>.log.1` before the next line is written.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// Why an engine process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "llama-server not found (looked in {looked_in}); install it (on a Mac: brew install llama.cpp) or pass --engine PATH"
    )]
    EngineMissing { looked_in: String },
    #[error("cannot start {}: {source}", binary.display())]
    Spawn { binary: PathBuf, source: std::io::Error },
    /// The pidfile a later agent run finds the engine by could not be written.
    #[error("state directory {}: {source}", path.display())]
    Pidfile { path: PathBuf, source: std::io::Error },
}

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
    tail: Arc<Mutex<LineTail>>,
    pidfile: PathBuf,
}

impl EngineProcess {
    pub fn spawn(
        binary: &Path,
        args: Vec<OsString>,
        port: u16,
        log_path: &Path,
        pidfile: &Path,
    ) -> Result<Self, ProcessError> {
        let spawn_error = |source| ProcessError::Spawn { binary: binary.to_owned(), source };
        let (output, output_writer) = std::io::pipe().map_err(spawn_error)?;
        let stderr_writer = output_writer.try_clone().map_err(spawn_error)?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(output_writer)
            .stderr(stderr_writer)
            // Its own group, so stopping it reaches anything it forks, and a signal aimed at the
            // agent's group (Ctrl-C) does not hit it behind the supervisor's back.
            .process_group(0)
            .kill_on_drop(true);
        let spawned = cmd.spawn();
        // The engine holds the pipe's write ends now; ours must close, or the copy never ends.
        drop(cmd);
        let mut child = spawned.map_err(spawn_error)?;
        let pid = child.id().ok_or_else(|| ProcessError::Spawn {
            binary: binary.to_owned(),
            source: std::io::Error::other("exited before its pid could be read"),
        })?;
        let record = PidRecord { pid, binary: binary.to_owned(), port };
        write_pidfile(pidfile, &record)?;

        let tail = Arc::new(Mutex::new(LineTail::default()));
        let (copied_tx, copied) = oneshot::channel();
        let log = LogFile::open(log_path);
        let copy_tail = tail.clone();
        std::thread::Builder::new()
            .name(format!("engine-{pid}-log"))
            .spawn(move || {
                copy_output(output, log, &copy_tail);
                let _ = copied_tx.send(());
            })
            .map_err(spawn_error)?;
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            // The exit is explained by the last lines the engine wrote: read them to the end
            // before anyone classifies the exit (bounded, in case a grandchild holds the pipe).
            let _ = tokio::time::timeout(PUMP_DRAIN, copied).await;
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
        metalkube_runtime::sync::lock(&self.tail).lines()
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

fn write_pidfile(path: &Path, record: &PidRecord) -> Result<(), ProcessError> {
    let io = |source| ProcessError::Pidfile { path: path.to_owned(), source };
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
    file: Option<std::fs::File>,
    written: u64,
}

impl LogFile {
    fn open(path: &Path) -> Self {
        Self { path: path.to_owned(), file: None, written: u64::MAX }
    }

    /// Appends `bytes`; a log past LOG_ROTATE_BYTES (or one left by an earlier engine, at the
    /// first write) is moved to `<name>.log.1` first. A log that cannot be written is skipped:
    /// the engine serves on, and its last lines stay in memory for error messages.
    fn write(&mut self, bytes: &[u8]) {
        if self.written >= LOG_ROTATE_BYTES {
            self.file = None;
            if self.written != u64::MAX || self.path.exists() {
                let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            }
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            self.file = std::fs::File::create(&self.path).ok();
            self.written = 0;
        }
        if let Some(f) = self.file.as_mut() {
            let _ = f.write_all(bytes);
            self.written += bytes.len() as u64;
        }
    }
}

/// Copies the engine's output to its log until every writer has closed the pipe.
fn copy_output(mut output: impl Read, mut log: LogFile, tail: &Mutex<LineTail>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match output.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                log.write(&buf[..n]);
                metalkube_runtime::sync::lock(tail).push(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    metalkube_runtime::sync::lock(tail).finish();
}

/// A line longer than this is cut in the tail (the log keeps it whole).
const TAIL_LINE_BYTES: usize = 4096;

/// The last TAIL_LINES lines of a byte stream that arrives in pieces.
#[derive(Default)]
struct LineTail {
    lines: VecDeque<String>,
    /// The start of a line whose end has not arrived yet (at most TAIL_LINE_BYTES of it).
    partial: Vec<u8>,
}

impl LineTail {
    fn push(&mut self, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|b| *b == b'\n') {
            self.take_partial(&bytes[..end]);
            bytes = &bytes[end + 1..];
        }
        let room = TAIL_LINE_BYTES.saturating_sub(self.partial.len());
        self.partial.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The output ended: a last line without a newline is a line too.
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            self.take_partial(&[]);
        }
    }

    fn take_partial(&mut self, rest: &[u8]) {
        let room = TAIL_LINE_BYTES.saturating_sub(self.partial.len());
        self.partial.extend_from_slice(&rest[..rest.len().min(room)]);
        let line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_owned();
        self.partial.clear();
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    fn lines(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines_of(bytes: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(bytes);
        let mut raw: Vec<&str> = text.split('\n').collect();
        // A newline at the very end closes the last line; it does not open another.
        if raw.last().is_some_and(|l| l.is_empty()) {
            raw.pop();
        }
        let mut lines: Vec<String> = raw.iter().map(|l| l.trim_end_matches('\r').to_owned()).collect();
        let skip = lines.len().saturating_sub(TAIL_LINES);
        lines.split_off(skip)
    }

    proptest! {
        /// However the output is split into reads, the tail is its last lines (ASCII here, so
        /// a character is never cut between reads).
        #[test]
        fn the_tail_is_the_last_lines_whatever_the_reads(
            text in proptest::collection::vec(prop_oneof![4 => 0x20u8..0x7f, 1 => Just(b'\n'), 1 => Just(b'\r')], 0..4000),
            cuts in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let mut tail = LineTail::default();
            let (mut at, mut i) = (0, 0);
            while at < text.len() {
                let end = (at + cuts[i % cuts.len()]).min(text.len());
                tail.push(&text[at..end]);
                at = end;
                i += 1;
            }
            tail.finish();
            prop_assert_eq!(tail.lines(), lines_of(&text));
        }
    }

    #[test]
    fn a_line_without_end_is_cut_not_kept_whole() {
        let mut tail = LineTail::default();
        tail.push(&vec![b'x'; 3 * TAIL_LINE_BYTES]);
        tail.push(b"y\nlast");
        tail.finish();
        let lines = tail.lines();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), TAIL_LINE_BYTES);
        assert_eq!(lines[1], "last");
    }

    #[test]
    fn the_log_rotates_an_old_one_at_the_first_write_and_past_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        std::fs::write(&path, "from the engine before\n").unwrap();
        let mut log = LogFile::open(&path);
        log.write(b"one\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\n");
        assert_eq!(std::fs::read_to_string(path.with_extension("log.1")).unwrap(), "from the engine before\n");
        log.written = LOG_ROTATE_BYTES;
        log.write(b"two\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        assert_eq!(std::fs::read_to_string(path.with_extension("log.1")).unwrap(), "one\n");
    }
}
