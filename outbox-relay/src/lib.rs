//! stub (temporary wiring on feat/logical until main lands the relay skeleton)
pub mod source;
