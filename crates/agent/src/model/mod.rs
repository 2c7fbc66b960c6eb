//! The ground floor: a model in the words every stage shares. What is desired of it
//! (`DesiredModel`, who may use its port, its hub token), and what is known of it now: its health
//! report (`ModelReport`, written by the supervisor), its load (`ServingLoad`, written by the
//! serving port), the evidence client traffic gives the pulse, and why an engine was restarted.
//! Every stage imports from here; nothing here imports a stage.

pub mod api_keys;
pub mod desired;
pub mod fault;
pub mod hub_token;
pub mod load;
pub mod report;

pub use desired::DesiredModel;
pub use fault::FaultReason;
pub use hub_token::Token;
pub use load::{Load, ServingLoad, TrafficEvidence};
pub use report::{ModelReport, ModelView};
