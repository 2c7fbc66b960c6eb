//! `metalkube-agent join BUNDLE`: a Mac joins the fleet. The bundle from `kubectl metalkube
//! enroll` becomes key material in the state directory and a service definition that runs
//! `metalkube-agent serve` with it, started at once unless asked not to.

use std::path::{Path, PathBuf};

use metalkube_api::bundle::parse_bundle;

use crate::install::InstallError;
use crate::install::enrollment::EnrollmentFiles;
use crate::install::service::{self, Definition, Host, Scope, Target};

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
    /// The service definition was already there, as it is now.
    pub unchanged: bool,
}

pub fn join(options: JoinOptions) -> Result<Joined, InstallError> {
    let target = Target::host().ok_or_else(|| {
        InstallError::Service(format!(
            "{} has no service manager metalkube knows (macOS or Linux)",
            std::env::consts::OS
        ))
    })?;
    if options.scope == Scope::System && !nix::unistd::geteuid().is_root() {
        return Err(InstallError::Service(
            "--system installs a machine-wide service and writes where only root may: run it with sudo".to_owned(),
        ));
    }
    let text = std::fs::read_to_string(&options.bundle).map_err(|source| InstallError::File {
        what: "reading the bundle",
        path: options.bundle.clone(),
        source,
    })?;
    // `sudo join` without --system: the key material would be root's in the user's home, and
    // the user's own agent could not read it.
    if options.scope == Scope::User && nix::unistd::geteuid().is_root() && std::env::var_os("SUDO_USER").is_some() {
        return Err(InstallError::Service(
            "join under sudo without --system would install a per-user agent owned by root: run it without \
             sudo as the user the agent should run as, or pass --system for a machine-wide service"
                .to_owned(),
        ));
    }
    let bundle = parse_bundle(&text, &options.bundle.display().to_string())?;
    // Checked before anything is replaced: a bad bundle must not take the place of working keys.
    check_bundle_tls(&bundle)?;
    let host = Host::current(target, options.scope);
    let state_dir = match options.state_dir {
        Some(dir) => dir,
        None => host.default_state_dir()?,
    };
    let files = EnrollmentFiles::new(absolute(&state_dir)?);
    files.install(&bundle)?;
    let engine = options.engine.or_else(|| crate::context::find_on_path("llama-server"));
    let definition = enrolled_definition(&host, &files, engine.as_deref())?;
    // A renewal with the same definition: the running agent picks the new files up by itself
    // (it watches them), so its engines keep serving; a restart is only for a changed service.
    let unchanged = std::fs::read_to_string(&definition.path).is_ok_and(|old| old == definition.contents);
    let started = options.start && !unchanged;
    if started {
        service::install(&host, &definition)?;
    } else if !unchanged {
        service::write_definition(&definition)?;
    }
    Ok(Joined { node_name: bundle.agent.node_name, files, definition, engine, started, unchanged })
}

/// The bundle's key, certificate and client CA make a working TLS setup, and the certificate
/// is current.
fn check_bundle_tls(bundle: &metalkube_api::bundle::AgentBundle) -> Result<(), InstallError> {
    let pem = crate::tls::TlsPem {
        cert_pem: bundle.tls.certificate.clone(),
        key_pem: bundle.tls.private_key.clone(),
        client_ca_pem: bundle.tls.client_ca.clone(),
    };
    crate::tls::server_config(&pem)?;
    let expiry = crate::tls::certificate_expiry_unix(&bundle.tls.certificate)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if expiry <= i64::try_from(now).unwrap_or(i64::MAX) {
        return Err(InstallError::Service(format!(
            "the bundle's certificate expired (at {expiry}, Unix time): enroll the Mac again with --renew"
        )));
    }
    Ok(())
}

/// The service definition of the agent enrolled in `files` (which `join` wrote), running this
/// very binary: the definition names it by its path (`std::env::current_exe`), so the binary
/// should stay where it was when it joined.
pub fn enrolled_definition(
    host: &Host,
    files: &EnrollmentFiles,
    engine: Option<&Path>,
) -> Result<Definition, InstallError> {
    let settings = files.load_settings()?;
    let program = std::env::current_exe().map_err(|source| InstallError::File {
        what: "finding this binary",
        path: PathBuf::from("metalkube-agent"),
        source,
    })?;
    service::definition(host, &service::serve_command(&program, &settings, files, engine))
}

/// The service runs from `/`, so every path it is given must be absolute.
pub fn absolute(path: &Path) -> Result<PathBuf, InstallError> {
    std::path::absolute(path).map_err(|source| InstallError::File {
        what: "making the path absolute",
        path: path.to_owned(),
        source,
    })
}
