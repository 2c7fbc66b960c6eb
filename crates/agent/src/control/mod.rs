//! The control stage: where desired models come from. The controller's gRPC API (mTLS, with
//! certificates reloaded as they change), the desired state persisted for static stability, and
//! the standalone models directory.

pub mod desired_store;
pub mod grpc;
pub mod grpc_tls;
pub mod models_dir;
