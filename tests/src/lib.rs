//! Test harness for end-to-end tests against a real PostgreSQL and a real Kafka-protocol broker,
//! shared with the benchmark (`outbox-bench`) and the fault harness (`outbox-chaos`).
//!
//! Connection settings come from the environment first (`DATABASE_URL`,
//! `KAFKA_BOOTSTRAP_SERVERS`, as written by `scripts/services.sh up`); with the `docker` feature
//! and no settings, PostgreSQL and Redpanda are started with testcontainers instead.
//!
//! Every test gets its own database and its own topic names, so tests run in parallel against one
//! server and one broker without seeing each other.

pub use outbox_relay::{Relay, RelayConfig};

pub mod adapters;
pub mod admin;
pub mod broker;
pub mod certs;
pub mod database;
#[cfg(feature = "demo")]
pub mod demo;
pub mod in_process;
pub mod ledger;
pub mod relay_process;
pub mod services;
pub mod sinks;
pub mod tables;
pub mod writers;

pub use admin::{admin_addr, http_get, http_get_with_token, metric, wait_for_status};
pub use broker::{
    Consumed, consume, consume_committed, consume_from, create_topic, create_topic_on,
};
pub use database::{TestDb, replace_database, unique, unpublished, wait_drained};
pub use in_process::{InProcessRelay, relay_config};
pub use ledger::{Ledger, Verdict};
pub use relay_process::{CliOutput, RelayProcess, relay_binary, relay_cli, relay_cli_on};
pub use services::{Services, init_logging, services};
pub use sinks::SinkUnderTest;
