//! `metalkube-agent service print|install|uninstall`: its flags (also the service flags `join`
//! takes), and the service definition it prints or hands to the service manager.

use std::path::PathBuf;

use anyhow::Context;
use metalkube_agent::install::enrollment::EnrollmentFiles;
use metalkube_agent::install::join::{absolute, enrolled_definition};
use metalkube_agent::install::service::{self, Host, Scope, Target};

#[derive(clap::Args)]
pub struct ServiceArgs {
    /// print: write the definition to stdout; install: write it and (re)start the service;
    /// uninstall: stop the service and remove its definition.
    #[arg(value_enum)]
    action: ServiceAction,
    #[command(flatten)]
    service: ServiceOptions,
    /// Service manager to write for (print only): macos (launchd) or linux (systemd).
    /// Default: this machine's.
    #[arg(long, value_parser = str::parse::<Target>)]
    target: Option<Target>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ServiceAction {
    Print,
    Install,
    Uninstall,
}

#[derive(clap::Args)]
pub struct ServiceOptions {
    /// A machine-wide service started at boot, as root (a LaunchDaemon; a system unit). Default:
    /// the user's own, started at login (a LaunchAgent; a user unit).
    #[arg(long)]
    pub system: bool,
    /// Where the key material and settings are kept; default: /Library/Application
    /// Support/metalkube (macOS) or /var/lib/metalkube (Linux) with --system, else
    /// $XDG_STATE_HOME/metalkube or ~/.local/state/metalkube.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// llama-server the service runs; default: the one on PATH now. A service does not get the
    /// shell's PATH, so the path is written into the definition.
    #[arg(long)]
    pub engine: Option<PathBuf>,
}

impl ServiceOptions {
    pub fn scope(&self) -> Scope {
        if self.system { Scope::System } else { Scope::User }
    }
}

/// Prints, installs or uninstalls the service definition of the agent that joined.
pub fn run(args: ServiceArgs) -> anyhow::Result<()> {
    let host_target = Target::host().context("this OS has no service manager metalkube knows (macOS or Linux)");
    let target = match args.target {
        Some(target) => target,
        None => host_target?,
    };
    let host = Host::current(target, args.service.scope());
    if let ServiceAction::Uninstall = args.action {
        let path = service::uninstall(&host)?;
        println!("stopped; removed {}", path.display());
        return Ok(());
    }
    let state_dir = match args.service.state_dir {
        Some(dir) => dir,
        None => host.default_state_dir()?,
    };
    let files = EnrollmentFiles::new(absolute(&state_dir)?);
    let engine = args.service.engine.or_else(|| metalkube_agent::context::find_on_path("llama-server"));
    let definition = enrolled_definition(&host, &files, engine.as_deref())?;
    match args.action {
        ServiceAction::Print => print!("{}", definition.contents),
        _ => {
            service::install(&host, &definition)?;
            println!("installed {} and started it", definition.path.display());
        }
    }
    Ok(())
}
