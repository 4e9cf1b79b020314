//! The request path: forwarding byte for byte, enforce mode, the official clients as callers,
//! overload shedding, and hostile or broken peers on either side.

pub mod clients;
mod enforce;
mod faults;
mod forwarding;
mod overload;
