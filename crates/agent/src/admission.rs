//! Backpressure in front of every engine: the serving port, its queue, and the circuit breaker.

pub mod framing;
pub mod policy;
pub mod proxy;
pub mod queue;
pub mod routes;
pub mod tap;

pub use policy::{Rejection, default_max_concurrent};
pub use proxy::{Access, ClientTimeouts, ModelProxy, listen};
pub use queue::{Admission, Limits};
