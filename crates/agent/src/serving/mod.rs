//! The serving stage: the port clients use, in front of every engine. Who may use it (API
//! keys), which paths pass, framing, the admission queue and its backpressure, the circuit
//! breaker, and the tap that reads timings from responses as they pass; `metrics` holds the
//! series they write, and `load_gauges` what the port answers endpoint pickers on `/metrics`.

pub mod body_budget;
pub mod crash_quarantine;
pub mod framing;
pub mod in_engine;
pub mod inspect;
pub mod listener;
pub mod load_gauges;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod queue;
pub mod request_shape;
pub mod responses;
pub mod routes;
pub mod slow_reader;
pub mod tap;
pub mod traffic;
pub mod upstream;

pub use policy::default_max_concurrent;
pub use proxy::{Access, ClientTimeouts, ModelProxy, listen};
pub use queue::{Admission, Limits};
