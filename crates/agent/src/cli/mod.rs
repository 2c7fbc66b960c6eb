//! The binary's subcommands, a file each: its flags (clap's structs, whose doc comments are the
//! `--help` text) beside what it starts. `run` and `serve` start the agent itself and share its
//! flags (`agent_args`) and its life on the async runtime (`daemon`); `join`, `service` and
//! `calibrate` are one-shot commands.

pub mod agent_args;
pub mod calibrate;
pub mod daemon;
pub mod join;
pub mod run;
pub mod serve;
pub mod service;
pub mod started;

/// The target of the binary's log lines: the crate's name, as when they were all written from
/// `main.rs`, so that log filters and searches written for them keep finding them.
const LOG_TARGET: &str = "metalkube_agent";
