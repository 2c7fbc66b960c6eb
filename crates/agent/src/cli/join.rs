//! `metalkube-agent join BUNDLE`: its flags, and what it prints of what `install::join` did.

use std::path::PathBuf;

use metalkube_agent::install::join::{JoinOptions, join};
use metalkube_agent::install::service::Scope;

use crate::cli::service::ServiceOptions;

#[derive(clap::Args)]
pub struct JoinArgs {
    /// The bundle `kubectl metalkube enroll` wrote for this Mac.
    bundle: PathBuf,
    #[command(flatten)]
    service: ServiceOptions,
    /// Write the files and the service definition, but start nothing.
    #[arg(long)]
    no_start: bool,
}

/// Joins, then says what was written and whether the service runs.
pub fn run(args: JoinArgs) -> anyhow::Result<()> {
    let scope = args.service.scope();
    let joined = join(JoinOptions {
        bundle: args.bundle,
        scope,
        start: !args.no_start,
        state_dir: args.service.state_dir,
        engine: args.service.engine,
    })?;
    println!("MetalNode {}: key material in {}", joined.node_name, joined.files.tls_dir().display());
    println!("service definition: {}", joined.definition.path.display());
    if let Some(log) = &joined.definition.log_path {
        println!("log: {}", log.display());
    }
    match &joined.engine {
        Some(engine) => println!("engine: {}", engine.display()),
        None => println!(
            "engine: llama-server is not on PATH; install it, then `metalkube-agent service install --engine PATH`"
        ),
    }
    let install = format!("metalkube-agent service install{}", if scope == Scope::System { " --system" } else { "" });
    if joined.started {
        println!("started; the controller connects to it once the MetalNode is in the cluster");
    } else if joined.unchanged {
        println!(
            "service definition unchanged: a running agent serves the new certificate without a restart \
             (its engines keep serving); `{install}` (re)starts it"
        );
    } else {
        println!("not started (--no-start); start it with `{install}`");
    }
    Ok(())
}
