//! `metalkube-agent join BUNDLE`: a Mac joins the fleet. The bundle from `kubectl metalkube
//! enroll` becomes key material in the state directory and a service definition that runs
//! `metalkube-agent serve` with it, started at once unless asked not to.

use std::path::{Path, PathBuf};

use metalkube_api::bundle::parse_bundle;

use crate::AgentError;
use crate::enrollment::EnrollmentFiles;
use crate::service::{self, Definition, Host, Scope, Target};

pub struct JoinOptions {
    pub bundle: PathBuf,
    pub scope: Scope,
    /// Start (or restart) the service once it is written.
    pub start: bool,
    /// Default: the scope's (`Host::default_state_dir`).
    pub state_dir: Option<PathBuf>,
    /// llama-server to pin in the definition; default: the one on PATH now, if any.
    pub engine: Option<PathBuf>,
}

/// What `join` did, for the message it prints.
pub struct Joined {
    pub node_name: String,
    pub files: EnrollmentFiles,
    pub definition: Definition,
    pub engine: Option<PathBuf>,
    pub started: bool,
}

pub fn join(options: JoinOptions) -> Result<Joined, AgentError> {
    let target = Target::host().ok_or_else(|| {
        AgentError::Service(format!("{} has no service manager metalkube knows (macOS or Linux)", std::env::consts::OS))
    })?;
    if options.scope == Scope::System && !nix::unistd::geteuid().is_root() {
        return Err(AgentError::Service(
            "--system installs a machine-wide service and writes where only root may: run it with sudo".to_owned(),
        ));
    }
    let text = std::fs::read_to_string(&options.bundle).map_err(|source| AgentError::File {
        what: "reading the bundle",
        path: options.bundle.clone(),
        source,
    })?;
    let bundle = parse_bundle(&text, &options.bundle.display().to_string())?;
    let host = Host::current(target, options.scope);
    let state_dir = match options.state_dir {
        Some(dir) => dir,
        None => host.default_state_dir()?,
    };
    let files = EnrollmentFiles::new(absolute(&state_dir)?);
    files.install(&bundle)?;
    let engine = options.engine.or_else(|| crate::context::find_on_path("llama-server"));
    let definition = enrolled_definition(&host, &files, engine.as_deref())?;
    if options.start {
        service::install(&host, &definition)?;
    } else {
        service::write_definition(&definition)?;
    }
    Ok(Joined { node_name: bundle.agent.node_name, files, definition, engine, started: options.start })
}

/// The service definition of the agent enrolled in `files` (which `join` wrote), running this
/// very binary: the definition names it by its path (`std::env::current_exe`), so the binary
/// should stay where it was when it joined.
pub fn enrolled_definition(
    host: &Host,
    files: &EnrollmentFiles,
    engine: Option<&Path>,
) -> Result<Definition, AgentError> {
    let settings = files.load_settings()?;
    let program = std::env::current_exe().map_err(|source| AgentError::File {
        what: "finding this binary",
        path: PathBuf::from("metalkube-agent"),
        source,
    })?;
    service::definition(host, &service::serve_command(&program, &settings, files, engine))
}

/// The service runs from `/`, so every path it is given must be absolute.
pub fn absolute(path: &Path) -> Result<PathBuf, AgentError> {
    std::path::absolute(path).map_err(|source| AgentError::File {
        what: "making the path absolute",
        path: path.to_owned(),
        source,
    })
}
