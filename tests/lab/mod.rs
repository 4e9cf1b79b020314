//! The lab: the simulated backdoored model as a real upstream.

mod drift_eval;
mod sim;
