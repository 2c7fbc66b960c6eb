//! The model group: one MetalModel's reconcile (IO only, in `reconcile`) over pure parts —
//! its inputs from the agents' reports, its Secrets, placement, status and conditions, its
//! Service and EndpointSlices, and the Events its changes make.

pub mod condition_names;
pub mod conditions;
pub mod endpoints;
pub mod events;
pub(crate) mod inputs;
pub mod placement;
pub mod reconcile;
pub(crate) mod secrets;
pub mod status;
