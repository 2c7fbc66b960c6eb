//! metalkube-router: one address for a model served on many Macs.
//!
//! The pure core decides where a request goes (`picker`, counting the router's own `claims`),
//! what waits when every Mac is full (`fleet_queue`), when a Mac has stopped answering (`stall`),
//! what follows a failed attempt (`failover`), which model a body names (`catalog`), and what the
//! Envoy ext_proc messages say (`ext_proc_messages`, `ext_proc_stream`). `fleet` holds the shared
//! state around it; the edges follow the agents (`agent_watch`), serve the HTTP port
//! (`http_front`, `forward`) and count (`metrics`).
//!
//! Floors, top to bottom (imports point down): `http_front`, `ext_proc_service`, `cluster_nodes`; `forward`, `agent_watch`; `fleet`;
//! `targets`, the pure core, `metrics`, `answers`, `error`.

pub mod agent_watch;
pub mod answers;
pub mod catalog;
pub mod claims;
pub mod cluster_nodes;
pub mod error;
pub mod ext_proc_messages;
pub mod ext_proc_service;
pub mod ext_proc_stream;
pub mod failover;
pub mod fleet;
pub mod fleet_queue;
pub mod fleet_view;
pub mod forward;
pub mod http_front;
pub mod metrics;
pub mod models_list;
pub mod picker;
pub mod stall;
pub mod targets;
