//! Every concern's error in one type, for a caller that drives several of the agent's entry
//! points and wants one `Result`. Each stage returns its own enum, defined where it is raised;
//! `?` lifts it here unchanged: every variant is transparent, so the message and the causes are
//! the stage's own.
//!
//! Where each concern's error lives:
//! - downloads and the model cache: `engine::download::DownloadError`;
//! - the model file (source, GGUF, digest, missing): `engine::model_file::ModelFileError`;
//! - the engine process: `engine::process::ProcessError`; a port pool: `engine::ports::NoFreePort`;
//! - a request body the serving port refuses: `serving::inspect::RequestRefusal`;
//! - the serving port's listener: `supervisor::prepare::ServingPortError`;
//! - the agent's start (shared context): `context::ContextError`;
//! - the certificate: `tls::TlsError`;
//! - what is desired: `control::models_dir::ModelsDirError` (with API key files),
//!   `control::desired_store::DesiredStoreError`, `control::grpc::GrpcError`;
//! - joining a fleet and the OS service: `install::InstallError`;
//! - a name that would leave its directory: `confined_path::PathOutside`, held by the others.
//!
//! The ones that never leave their stage are not variants here: a refusal goes from the serving
//! port's inspection to the client, and a model file, download, engine process or serving port
//! error from the engine stage to the supervisor, which reports it on the model.

use crate::context::ContextError;
use crate::control::desired_store::DesiredStoreError;
use crate::control::grpc::GrpcError;
use crate::control::models_dir::ModelsDirError;
use crate::install::InstallError;
use crate::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Starting the agent (`Agent::start`): its HTTP client, the model download client.
    #[error(transparent)]
    Start(#[from] ContextError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    #[error(transparent)]
    DesiredStore(#[from] DesiredStoreError),
    #[error(transparent)]
    ModelsDir(#[from] ModelsDirError),
    #[error(transparent)]
    Install(#[from] InstallError),
}
