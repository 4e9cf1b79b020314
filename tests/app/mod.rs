//! The composition root: live reload, and shutdown under one grace.

mod reload;
mod shutdown;
