//! The health stage: turns pulses (taken with `metalkube_vitals::pulse`) into a grade and a
//! restart decision: the grader, the evidence beside a pulse, the lifecycle, and whether a restart cured;
//! `metrics` holds the series the supervisor publishes them in.

pub mod evidence;
pub mod grader;
pub mod lifecycle;
pub mod metrics;
pub mod restart_cure;
