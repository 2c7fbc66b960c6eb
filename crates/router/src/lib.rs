//! metalkube-router: one address for a model served on many Macs. The pure core decides where a
//! request goes (`picker`); the IO around it follows the agents' load and forwards requests.

pub mod claims;
pub mod failover;
pub mod fleet_queue;
pub mod picker;
