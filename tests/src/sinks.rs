//! The brokers a relay can publish to, as the end-to-end suite drives them: what a relay process
//! needs in its environment to use one, what must exist before it publishes, and how to read a
//! destination back from the start (as [`Consumed`] records, so one [`crate::Verdict`] judges
//! every broker alike).
//!
//! Each broker's part lives in a module of its own (`sinks/<broker>.rs`); this enum only
//! dispatches.

use std::time::Duration;

use anyhow::Result;

use crate::broker::{Consumed, consume};

pub mod nats;
pub mod rabbitmq;
pub mod redis;

/// A broker the guarantee suite (`tests/tests/sink_guarantees.rs`) runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkUnderTest {
    /// The Kafka-protocol broker of [`crate::services`](mod@crate::services).
    Kafka,
    /// NATS JetStream ([`nats`]).
    Nats,
    /// Redis Streams at `REDIS_URL` ([`redis`]).
    Redis,
    /// RabbitMQ (AMQP 0-9-1) at `AMQP_URL` ([`rabbitmq`]).
    Rabbitmq,
}

impl SinkUnderTest {
    /// `OUTBOX_SINK` and the broker's connection settings for a relay process.
    pub fn relay_env(self) -> Vec<(&'static str, String)> {
        match self {
            SinkUnderTest::Kafka => vec![("OUTBOX_SINK", "kafka".to_owned())],
            SinkUnderTest::Nats => nats::relay_env(),
            SinkUnderTest::Redis => redis::relay_env(),
            SinkUnderTest::Rabbitmq => rabbitmq::relay_env(),
        }
    }

    /// Settings under which the sink refuses, for good, every record whose payload is larger
    /// than `bytes` (a poison event the relay must park per aggregate).
    pub fn size_limit_env(self, bytes: usize) -> Vec<(&'static str, String)> {
        match self {
            SinkUnderTest::Kafka => vec![
                (
                    "OUTBOX_KAFKA__PROPERTIES__MESSAGE_MAX_BYTES",
                    bytes.to_string(),
                ),
                ("OUTBOX_KAFKA__PROPERTIES__BATCH_SIZE", bytes.to_string()),
            ],
            SinkUnderTest::Nats => vec![("OUTBOX_NATS__MAX_MESSAGE_BYTES", bytes.to_string())],
            SinkUnderTest::Redis => redis::size_limit_env(bytes),
            SinkUnderTest::Rabbitmq => rabbitmq::size_limit_env(bytes),
        }
    }

    /// Creates what `destination` needs before the relay publishes to it, for a destination
    /// named after a [`crate::writers::Workload`] (which already made its Kafka topic).
    pub async fn prepare(self, destination: &str) -> Result<()> {
        match self {
            SinkUnderTest::Kafka => {
                let _ = destination;
                Ok(())
            }
            SinkUnderTest::Nats => nats::prepare(destination).await,
            SinkUnderTest::Redis => redis::prepare(destination).await,
            SinkUnderTest::Rabbitmq => rabbitmq::prepare(destination).await,
        }
    }

    /// Reads `destination` back from its start until at least `at_least` records arrived and
    /// then nothing new for `quiet`, or until `timeout`; in the broker's order (per Kafka
    /// partition), duplicates included.
    pub async fn consume(
        self,
        destination: &str,
        at_least: usize,
        quiet: Duration,
        timeout: Duration,
    ) -> Result<Vec<Consumed>> {
        match self {
            SinkUnderTest::Kafka => consume(&[destination], at_least, quiet, timeout).await,
            SinkUnderTest::Nats => nats::consume(destination, at_least, quiet, timeout).await,
            SinkUnderTest::Redis => redis::consume(destination, at_least, quiet, timeout).await,
            SinkUnderTest::Rabbitmq => {
                rabbitmq::consume(destination, at_least, quiet, timeout).await
            }
        }
    }
}
