//! metalkube-router: one address for a model served on many Macs. The pure core decides where a
//! request goes (`picker`, counting the router's own `claims`), what waits when every Mac is full
//! (`fleet_queue`), when a Mac has stopped answering (`stall`) and what follows a failed attempt
//! (`failover`); the IO around it follows the agents' load and forwards requests.

pub mod catalog;
pub mod claims;
pub mod ext_proc_messages;
pub mod ext_proc_stream;
pub mod failover;
pub mod fleet_queue;
pub mod fleet_view;
pub mod models_list;
pub mod picker;
pub mod stall;
