//! Before an engine starts: its model file (downloaded into the cache if need be, phase
//! `Downloading` meanwhile), its share of the memory budget, and the serving port clients use.

use std::time::Instant;

use metalkube_api::Phase;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::{Command, DOWNLOAD_REPORT_EVERY, RunEnd, Supervisor};
use crate::engine::model_file::{ModelLocation, ResolvedModel, check_model, locate};
use crate::engine::ports::NoFreePort;

/// Why the serving port the spec asks for is not listening.
#[derive(Debug, thiserror::Error)]
pub(super) enum ServingPortError {
    /// The spec names no port, and the agent's range (`--serving-ports`) has none free.
    #[error(transparent)]
    NoFreePort(#[from] NoFreePort),
    #[error("cannot listen on serving port {addr} (set spec.admission.servingPort to a free port)")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The serving port's listener task, stopped when dropped.
pub(super) struct Serving {
    port: u16,
    /// Whether the port came from the agent's range (and goes back to it).
    pooled: bool,
    stop: watch::Sender<bool>,
    /// The accept loop; it ends, closing the listener, once `stop` turns true.
    accepting: Option<JoinHandle<()>>,
}

impl Serving {
    /// Stops accepting and waits until the listening socket is closed, so that the port can be
    /// bound again at once (an edit reverted). Connections already accepted finish the request
    /// they are serving, then close.
    async fn close(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.accepting.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Supervisor {
    /// Takes this model's share of the memory budget, waiting (Pending, saying for what) while
    /// the models already holding memory leave too little. A command ends the wait.
    pub(super) async fn wait_for_memory(&mut self, need: u64) -> Result<(), RunEnd> {
        let mut releases = self.ctx.memory.releases();
        loop {
            let short = match self.ctx.memory.reserve(&self.key(), need) {
                Ok(()) => return Ok(()),
                Err(short) => short,
            };
            let message = short.to_string();
            if self.report.borrow().last_error.as_deref() != Some(message.as_str()) {
                tracing::warn!("{message}");
            }
            self.report.send_modify(|r| r.last_error = Some(message));
            self.set_phase(Phase::Pending);
            tokio::select! {
                changed = releases.changed() => {
                    if changed.is_err() {
                        return Err(RunEnd::Stop);
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Stop) => return Err(RunEnd::Stop),
                    Some(Command::Update(d)) => return Err(RunEnd::Restart(d)),
                },
            }
        }
    }

    /// The model's file, checked: a local path, or a download into the cache (phase
    /// `Downloading` with live progress while bytes move; commands are still heard, and a
    /// download cut by one resumes next time).
    pub(super) async fn resolve_model(&mut self) -> Result<ResolvedModel, RunEnd> {
        let ctx = self.ctx.clone();
        let location =
            locate(&self.desired, &ctx.downloads).map_err(|e| RunEnd::start_failed("locating the model file", &e))?;
        let (path, known_sha256, other_shard_bytes) = match location {
            ModelLocation::Local(path) => (path, None, 0),
            ModelLocation::Remote(fetch) => {
                let downloading = !fetch.cached();
                if downloading {
                    self.set_phase(Phase::Downloading);
                }
                let progress = fetch.progress();
                let run = fetch.run();
                tokio::pin!(run);
                let mut tick = tokio::time::interval(DOWNLOAD_REPORT_EVERY);
                let result = loop {
                    tokio::select! {
                        result = &mut run => break result,
                        _ = tick.tick(), if downloading => {
                            let now = progress.snapshot(Instant::now());
                            self.ctx.metrics.downloads.set_progress(&self.key(), Some(&now));
                            self.report.send_modify(|r| r.download = Some(now));
                        }
                        cmd = self.commands.recv() => {
                            self.end_download();
                            return Err(match cmd {
                                None | Some(Command::Stop) => RunEnd::Stop,
                                Some(Command::Update(d)) => RunEnd::Restart(d),
                            });
                        }
                    }
                };
                self.end_download();
                match result {
                    Ok(fetched) => {
                        for t in &fetched.transfers {
                            self.ctx.metrics.downloads.downloaded(t.received_bytes, t.resumed_at.len() as u64);
                        }
                        self.cache_lease = Some(fetched.lease);
                        (fetched.path, fetched.sha256, fetched.other_shard_bytes)
                    }
                    Err(e) => return Err(RunEnd::start_failed("downloading the model file", &e)),
                }
            }
        };
        let mut resolved = check_model(&self.desired, path, known_sha256)
            .await
            .map_err(|e| RunEnd::start_failed("reading the model file", &e))?;
        resolved.memory_bytes = resolved.memory_bytes.map(|m| m + other_shard_bytes);
        Ok(resolved)
    }

    pub(super) fn end_download(&self) {
        self.ctx.metrics.downloads.set_progress(&self.key(), None);
        self.report.send_if_modified(|r| r.download.take().is_some());
    }

    /// Whether the port listening is the one the spec asks for (any port of the agent's range
    /// when it names none).
    fn serving_port_matches(&self) -> bool {
        match (&self.serving, self.desired.spec.admission.serving_port) {
            (Some(serving), Some(wanted)) => serving.port == wanted,
            (Some(serving), None) => serving.pooled,
            (None, _) => false,
        }
    }

    /// Listens on the serving port the spec asks for. A port already listening stays until the
    /// new one is bound, and is closed after; when the new one cannot be bound, the old one keeps
    /// serving and the error is returned (it is the only port clients have).
    pub(super) async fn open_serving_port(&mut self) -> Result<(), ServingPortError> {
        if self.serving_port_matches() {
            return Ok(());
        }
        let (port, pooled) = match self.desired.spec.admission.serving_port {
            Some(p) => (p, false),
            None => (self.ctx.serving_ports.acquire()?, true),
        };
        let addr = std::net::SocketAddr::new(self.ctx.config.serving_host, port);
        let listener = match crate::serving::listen(addr) {
            Ok(l) => l,
            Err(e) => {
                if pooled {
                    self.ctx.serving_ports.quarantine(port);
                }
                return Err(ServingPortError::Listen { addr, source: e });
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        let accepting = Some(tokio::spawn(self.proxy.clone().serve(listener, stop_rx).in_current_span()));
        // Reported once the old port is closed: whoever reads the new port in the report finds
        // the old one refusing connections (both take requests in between).
        if let Some(old) = self.serving.replace(Serving { port, pooled, stop, accepting }) {
            let old_port = old.port;
            self.retire(old).await;
            tracing::info!(%addr, old_port, "serving port moved");
        } else {
            tracing::info!(%addr, "serving port open");
        }
        self.report.send_modify(|r| r.serving_port = Some(port));
        Ok(())
    }

    /// A spec edit of `servingPort` while the port listens: moved now, with no engine restart.
    /// A port that cannot be bound leaves the old one serving, and says so in `last_error`
    /// until the spec names a port that can be (or the old one again).
    pub(super) async fn move_serving_port(&mut self) {
        if self.serving.is_none() {
            // Nothing listens yet: the next engine start opens the port the spec names.
            return;
        }
        match self.open_serving_port().await {
            Ok(()) => {
                if let Some(error) = self.serving_port_error.take() {
                    self.report.send_if_modified(|r| {
                        let ours = r.last_error.as_ref() == Some(&error);
                        if ours {
                            r.last_error = None;
                        }
                        ours
                    });
                }
            }
            Err(e) => {
                let current = self.serving.as_ref().map(|s| s.port).unwrap_or_default();
                let message = format!("{}; still serving on port {current}", metalkube_runtime::errors::chain(&e));
                tracing::error!("{message}");
                self.serving_port_error = Some(message.clone());
                self.report.send_modify(|r| r.last_error = Some(message));
            }
        }
    }

    /// Closes a port that is no longer this model's, and gives a port of the agent's range back
    /// once nothing listens on it.
    async fn retire(&self, serving: Serving) {
        let (port, pooled) = (serving.port, serving.pooled);
        serving.close().await;
        if pooled {
            self.ctx.serving_ports.release(port);
        }
    }

    pub(super) async fn close_serving_port(&mut self) {
        if let Some(serving) = self.serving.take() {
            self.report.send_modify(|r| r.serving_port = None);
            self.retire(serving).await;
        }
    }
}
