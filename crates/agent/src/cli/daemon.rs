//! The agent's life under `run` and `serve`: the async runtime, logging, the open-files limit,
//! the HTTP port, and the stop. Each mode starts its own part (`run::start`, `serve::start`);
//! what follows is the same for both.

use anyhow::Context;
use metalkube_agent::http_port;

use crate::cli::LOG_TARGET;
use crate::cli::run::RunArgs;
use crate::cli::serve::ServeArgs;
use crate::cli::started::Started;

/// The commands that run the agent itself (on the async runtime).
pub enum Daemon {
    Run(RunArgs),
    Serve(ServeArgs),
}

/// Runs the agent until a stop signal, or until the mode's work ends.
pub fn run(daemon: Daemon) -> anyhow::Result<()> {
    let worker_threads = match &daemon {
        Daemon::Run(args) => args.common.worker_threads,
        Daemon::Serve(args) => args.common.worker_threads,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(worker_threads))
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(live(daemon))
}

async fn live(daemon: Daemon) -> anyhow::Result<()> {
    metalkube_runtime::init_logging();
    // Before anything opens a descriptor in earnest: engines, serving ports and clients all
    // draw on this one limit, which a shell or launchd sets far below what the OS allows.
    let open_files = metalkube_runtime::open_files::raise_open_files_limit();
    if open_files.error.is_some() || open_files.is_low() {
        tracing::warn!(target: LOG_TARGET, "{}", open_files.describe());
    } else {
        tracing::info!(target: LOG_TARGET, "{}", open_files.describe());
    }
    let Started { agent, listener, http_options, work } = match daemon {
        Daemon::Run(args) => crate::cli::run::start(args).await?,
        Daemon::Serve(args) => crate::cli::serve::start(args).await?,
    };
    agent.context().metrics.process.set_open_files_limit(&open_files);
    let scheme = if http_options.tls.is_some() { "https" } else { "http" };
    tracing::info!(target: LOG_TARGET, "agent HTTP on {scheme}://{}/ (healthz, readyz, metrics, api/v1/models)", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(http_port::serve_with(agent.clone(), listener, http_options, async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|stop| *stop).await;
    }));

    tokio::select! {
        signal = metalkube_runtime::stop_signal() => tracing::info!(target: LOG_TARGET, ?signal, "stopping engines"),
        res = work => match res {
            Ok(Err(e)) => tracing::error!(target: LOG_TARGET, "{e:#}"),
            Ok(Ok(())) => {}
            Err(e) => tracing::error!(target: LOG_TARGET, "agent task failed: {e}"),
        },
    }
    agent.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}
