//! Generated types and stubs of `proto/metalkube/agent/v1/agent.proto`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("metalkube.agent.v1");
    }
}

pub use agent::v1::*;

mod convert;
mod report;
pub mod watch;

pub use report::WireError;
pub use watch::ReadEvent;
