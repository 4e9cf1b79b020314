//! The providers' wire formats: what each route's JSON answer and SSE events look like, read
//! into the capture accumulator. One file per provider family.

pub(crate) mod anthropic;
pub(crate) mod openai;
