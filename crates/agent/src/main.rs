//! metalkube-agent, the binary: reads the command line and hands each subcommand to its file in
//! `cli/`, where its flags and its start-up are. `run` and `serve` are the agent itself, on the
//! async runtime (`cli/daemon.rs`, which also starts logging); `join`, `service` and
//! `calibrate` are one-shot commands.

mod cli;

use clap::{Parser, Subcommand};
use metalkube_calibrate::CalibrateArgs;

use crate::cli::daemon::Daemon;
use crate::cli::join::JoinArgs;
use crate::cli::run::RunArgs;
use crate::cli::serve::ServeArgs;
use crate::cli::service::ServiceArgs;

#[derive(Parser)]
#[command(name = "metalkube-agent", version, about = "Supervises llama-server, grades its pulse, reports health")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the MetalModel YAML files in a directory, with no cluster (standalone mode).
    Run(RunArgs),
    /// Serve what the controller asks for over gRPC (mTLS), and keep serving it through a
    /// controller outage.
    Serve(ServeArgs),
    /// Join the fleet: install the bundle from `kubectl metalkube enroll` (key material into the
    /// state directory) and run `serve` with it as a service (launchd on macOS, systemd on Linux).
    Join(JoinArgs),
    /// Print, install or uninstall the service definition of an agent that has joined.
    Service(ServiceArgs),
    /// Drive a load through a model and measure its pulse against the latency users see and the
    /// indicators an incident tried first; suggest pulse thresholds (report.json, report.html).
    Calibrate(CalibrateArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => cli::daemon::run(Daemon::Run(args)),
        Cmd::Serve(args) => cli::daemon::run(Daemon::Serve(args)),
        Cmd::Join(args) => cli::join::run(args),
        Cmd::Service(args) => cli::service::run(args),
        Cmd::Calibrate(args) => cli::calibrate::run(args),
    }
}
