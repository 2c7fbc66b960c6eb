//! Why joining the fleet, or managing the agent's service, failed: the bundle, the files written
//! into the state directory, and the service manager's commands.

use std::path::PathBuf;

use crate::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// What the host, the scope or the bundle rules out, said for the person at the terminal.
    #[error("service: {0}")]
    Service(String),
    #[error("`{command}` failed{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    ServiceCommand {
        command: String,
        detail: String,
        #[source]
        source: Option<std::io::Error>,
    },
    /// A file or directory of the bundle, the state directory or the service (`what` says
    /// which, and what was being done).
    #[error("{what} {}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bundle or the settings kept from it do not parse.
    #[error(transparent)]
    Bundle(#[from] metalkube_api::ApiError),
    /// The bundle's key material makes no working TLS setup.
    #[error(transparent)]
    Tls(#[from] TlsError),
}
