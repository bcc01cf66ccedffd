//! # outbox-relay
//!
//! Publishes committed outbox events from PostgreSQL to Kafka — by polling the outbox table or by
//! tailing it through logical replication — with an idempotent producer, acknowledging the source
//! only for the contiguous prefix of events Kafka has acknowledged.
//!
//! Data flows one way: [`source`] → [`route`] → [`sink`] → [`ack`] → source position. The
//! [`relay`] module runs that loop; the `outbox-relay` binary wraps it in a CLI ([`cli`]).
//!
//! Module dependencies point one way too: the shared data lives in modules that import none of
//! the others — [`config`] (settings), [`stats`] (live figures), [`sink`] (what became of a
//! record) — the code that uses it imports it, and only this crate root and the binary import
//! the pipeline, [`relay`] (checked by `tests/module_dependencies.rs`).
//!
//! Guarantees: every committed event is published at least once; nothing from a rolled-back
//! transaction is ever published; events of one aggregate reach their partition in commit order;
//! duplicates happen only after a failure, are bounded by the unacknowledged batch, and carry the
//! same event id (header `id`) so consumers can drop them; failures are reported, never skipped.

pub mod ack;
pub mod admin;
pub mod cli;
pub mod commands;
pub mod config;
pub mod failure;
pub mod faults;
pub mod leader;
pub mod metrics;
pub mod park;
pub mod relay;
pub mod route;
pub mod shard;
pub mod sink;
pub mod source;
pub mod stats;
pub mod status;
pub mod table;
pub mod telemetry;

pub use config::{RelayConfig, SourceKind};
pub use relay::{Relay, RelayError, RelayGroup};
pub use stats::RelayStats;
