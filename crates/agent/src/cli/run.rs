//! `metalkube-agent run`: standalone mode. Its flags, and its start: the agent serves the
//! MetalModel files of a directory, followed while it runs.

use std::path::PathBuf;

use anyhow::bail;
use metalkube_agent::control::models_dir::follow_models_dir;

use crate::cli::agent_args::{AgentArgs, bind_http};
use crate::cli::started::Started;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Directory of MetalModel YAML files; changes are picked up while running.
    #[arg(long, env = "METALKUBE_MODELS_DIR")]
    models_dir: PathBuf,
    /// Where `spec.auth` API keys are read from, as `<dir>/<secret name>/<key>` (the layout of a
    /// mounted Secret); default: `<models-dir>/secrets`. Changes are picked up while running.
    #[arg(long, env = "METALKUBE_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    #[command(flatten)]
    pub common: AgentArgs,
}

/// Binds the HTTP port (on the loopback interface unless `--listen` says otherwise), starts the
/// agent, and follows the models directory.
pub async fn start(args: RunArgs) -> anyhow::Result<Started> {
    if !args.models_dir.is_dir() {
        bail!("--models-dir {}: not a directory", args.models_dir.display());
    }
    let listener = bind_http(args.common.listen.as_deref(), &["127.0.0.1:9090"]).await?;
    let http_options = args.common.http_port_options(Vec::new());
    let agent = args.common.start_agent(None).await?;
    let secrets = args.secrets_dir.clone().unwrap_or_else(|| args.models_dir.join("secrets"));
    let work = tokio::spawn(follow_models_dir(args.models_dir.clone(), secrets, agent.clone()));
    let work: tokio::task::JoinHandle<anyhow::Result<()>> =
        tokio::spawn(async move { work.await?.map_err(anyhow::Error::from) });
    Ok(Started { agent, listener, http_options, work })
}
