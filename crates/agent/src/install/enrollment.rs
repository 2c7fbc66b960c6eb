//! What `metalkube-agent join` keeps in the agent's state directory, and where:
//!
//! ```text
//! <state-dir>/            0700
//!   agent.yaml            0600  the bundle's settings (kind AgentSettings), for `service`
//!   tls/                  0700
//!     agent.crt           0600  the agent's serving certificate
//!     agent.key           0600  its private key
//!     client-ca.crt       0600  the CA of the controller's client certificate
//! ```
//!
//! Each file is replaced whole (written beside it, then renamed over it), so a running agent
//! that reloads its certificate never reads half a file.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use metalkube_api::bundle::{AgentBundle, AgentSettings, parse_settings, render_settings};

use crate::install::InstallError;

/// The paths of an enrolled agent's files under its state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentFiles {
    state_dir: PathBuf,
}

impl EnrollmentFiles {
    pub fn new(state_dir: PathBuf) -> Self {
        Self { state_dir }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("tls")
    }

    pub fn certificate(&self) -> PathBuf {
        self.tls_dir().join("agent.crt")
    }

    pub fn private_key(&self) -> PathBuf {
        self.tls_dir().join("agent.key")
    }

    pub fn client_ca(&self) -> PathBuf {
        self.tls_dir().join("client-ca.crt")
    }

    pub fn settings(&self) -> PathBuf {
        self.state_dir.join("agent.yaml")
    }

    /// Writes the bundle's key material and settings, readable by the owner alone.
    pub fn install(&self, bundle: &AgentBundle) -> Result<(), InstallError> {
        private_dir(&self.state_dir)?;
        private_dir(&self.tls_dir())?;
        // The key before the certificate: an agent that reloads on the certificate's change
        // then finds the matching key already in place.
        write_private(&self.private_key(), &bundle.tls.private_key)?;
        write_private(&self.certificate(), &bundle.tls.certificate)?;
        write_private(&self.client_ca(), &bundle.tls.client_ca)?;
        write_private(&self.settings(), &render_settings(&bundle.agent))
    }

    /// The settings a former `join` kept.
    pub fn load_settings(&self) -> Result<AgentSettings, InstallError> {
        let path = self.settings();
        let text = std::fs::read_to_string(&path).map_err(|source| InstallError::File {
            what: "reading the agent's settings (run `metalkube-agent join BUNDLE` first)",
            path: path.clone(),
            source,
        })?;
        Ok(parse_settings(&text, &path.display().to_string())?)
    }
}

/// The state directory of a user's agent: `$XDG_STATE_HOME/metalkube`, else
/// `~/.local/state/metalkube`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("metalkube");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/metalkube"),
        None => std::env::temp_dir().join("metalkube"),
    }
}

/// Creates `dir` (and its parents) and makes it the owner's alone, also when it existed.
fn private_dir(dir: &Path) -> Result<(), InstallError> {
    let err = |what, source| InstallError::File { what, path: dir.to_owned(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| err("creating the directory", e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| err("making the directory private (0700)", e))
}

/// Replaces `path` with `contents`, mode 0600 from the first byte written.
fn write_private(path: &Path, contents: &str) -> Result<(), InstallError> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = path.with_file_name(format!(".{file_name}.new"));
    let err = |what, source| InstallError::File { what, path: path.to_owned(), source };
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| err("creating", e))?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| err("writing", e))?;
    std::fs::rename(&temp, path).map_err(|e| err("replacing", e))
}
