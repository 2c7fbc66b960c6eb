//! The control stage: where desired models come from. The controller's gRPC API (mTLS, its
//! certificate in `tls`), the desired state persisted for static stability, and
//! the standalone models directory.

pub mod caller;
pub mod desired_store;
pub mod grpc;
pub mod models_dir;
