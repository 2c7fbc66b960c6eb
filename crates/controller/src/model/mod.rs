//! The model group: one MetalModel's reconcile (IO only, in `reconcile`) over pure parts —
//! its inputs from the agents' reports, its Secrets, placement, status and conditions, its
//! Service and EndpointSlices, where the Service sends clients (`routing`: the router's pods or
//! the Macs), and the Events its changes make. `router_watch` follows the router's own Service;
//! `owned_watch` mirrors the Services and slices the reconciles write, so they compare before
//! writing; `store_ready` waits for those mirrors' first lists from many reconciles at once.

pub mod condition_names;
pub mod conditions;
pub mod endpoints;
pub mod events;
pub(crate) mod inputs;
pub mod owned_watch;
pub mod placement;
pub mod reconcile;
pub mod rollout;
pub mod router_watch;
pub mod routing;
pub(crate) mod secrets;
pub mod status;
pub mod store_ready;
