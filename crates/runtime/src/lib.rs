//! Process plumbing the agent and the controller share, so both binaries start, log, read their
//! files, serve their admin port, treat poisoned locks and stop the same way.

pub mod admin;
pub mod connections;
pub mod errors;
pub mod http_port;
pub mod open_files;
pub mod sync;

use std::path::{Path, PathBuf};
use std::time::Duration;

use backon::ExponentialBuilder;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("reading {flag} {}", path.display())]
    ReadFile {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {} is empty", path.display())]
    EmptyFile { flag: &'static str, path: PathBuf },
}

/// Logs to stderr at `RUST_LOG`'s levels, `info` when it is unset or unreadable.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
}

/// A text file named by a command-line flag (a PEM, a token): read whole, and an error that
/// names the flag and the path.
pub fn read_flag_file(path: &Path, flag: &'static str) -> Result<String, RuntimeError> {
    let text = std::fs::read_to_string(path).map_err(|source| RuntimeError::ReadFile {
        flag,
        path: path.to_owned(),
        source,
    })?;
    if text.trim().is_empty() {
        return Err(RuntimeError::EmptyFile { flag, path: path.to_owned() });
    }
    Ok(text)
}

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (a service manager, the kubelet).
    Terminate,
}

/// Waits for SIGINT or SIGTERM. Where SIGTERM cannot be watched, SIGINT alone still works.
pub async fn stop_signal() -> StopSignal {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => StopSignal::Interrupt,
            _ = term.recv() => StopSignal::Terminate,
        },
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}); stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            StopSignal::Interrupt
        }
    }
}

/// Retry delays from `min` doubling to `max`, jittered so many retries do not fall in step,
/// and never giving up: the preset every retry loop here starts from.
pub fn backoff(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default().with_min_delay(min).with_max_delay(max).with_factor(2.0).with_jitter()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn flag_files_say_which_flag_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = read_flag_file(&missing, "--tls-cert").unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, " \n").unwrap();
        assert!(read_flag_file(&empty, "--client-ca").unwrap_err().to_string().contains("--client-ca"));
        let good = dir.path().join("good.pem");
        std::fs::write(&good, "-----BEGIN X-----\n").unwrap();
        assert_eq!(read_flag_file(&good, "--x").unwrap(), "-----BEGIN X-----\n");
    }

    #[test]
    fn the_backoff_stays_within_its_bounds_and_does_not_end() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = backoff(min, max).without_max_times().build().take(50).collect();
        assert_eq!(delays.len(), 50, "never gives up");
        // Jitter adds up to one more delay on top.
        assert!(delays.iter().all(|d| *d >= min && *d <= max * 2), "{delays:?}");
    }
}
