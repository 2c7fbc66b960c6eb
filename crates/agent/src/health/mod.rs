//! The health stage: the pulse (a timed trivial completion sent straight to the engine) and the
//! grader that turns pulses into a grade and a restart decision.

pub mod attribution;
pub mod evidence;
pub mod grader;
pub mod lifecycle;
pub mod pulse;
pub mod restart_cure;
