//! The laboratory: everything that measures the gateway rather than runs it. The labelled
//! development set, the attack suite, offline detection-quality evaluation, drift replays, and the simulated
//! backdoored model that demos, tests and benchmarks talk to. Nothing on the serving path
//! imports from here.

pub mod attacks;
pub mod devset;
pub mod drift_replay;
pub mod lm_training;
pub mod quality;
pub mod sim;
pub mod topic_slant;
