//! metalkube-controller's pure cores: where replicas go, and what conditions say. The reconciler
//! around them (kube runtime, agent streams) is IO that calls these functions.

pub mod conditions;
pub mod placement;
