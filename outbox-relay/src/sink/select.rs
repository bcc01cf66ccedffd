//! Which sink a relay runs: the one its configuration names (`sink = "kafka"`, …).

use std::sync::Arc;

use crate::config::RelayConfig;
use crate::sink::kafka::{KafkaSink, SharedProducer};
use crate::sink::nats::{self, NatsSink};
use crate::sink::rabbitmq::{self, RabbitmqSink};
use crate::sink::redis::{self, RedisSink};
use crate::sink::traced::Traced;
use crate::sink::{Sink, SinkError, SinkKind};

/// Builds the sink the configuration names (no connection is made yet; see
/// [`Sink::check_connection`]), with producer spans when `telemetry.enabled`
/// ([`crate::telemetry`]).
pub fn from_config(config: &RelayConfig) -> Result<Box<dyn Sink>, SinkError> {
    from_config_sharing(config, &SharedClient::None)
}

/// A broker client the tables of one relay share ([`crate::RelayGroup`]): whatever the number
/// of tables, the relay holds one connection per broker.
///
/// - Kafka: one idempotent producer and one idle probe for every table ([`SharedProducer`]).
/// - NATS: one client ([`crate::sink::nats::SharedConnection`]; the client is multiplexed).
/// - Redis: one multiplexed connection ([`crate::sink::redis::SharedConnection`]); each table's
///   batches still go out one at a time, each an ordered pipeline of atomic appends.
/// - RabbitMQ: one AMQP connection with one confirm-mode channel per table
///   ([`crate::sink::rabbitmq::SharedConnection`]), so publisher confirms stay per table.
///
/// Each table's sink keeps its own in-flight count, delivery results and stop after a failure.
/// A failure that condemns the connection itself has it replaced once for every table: the
/// table that saw generation `g` fail asks for `g` to be replaced, the first such request
/// reconnects and the others find the new connection; each table re-sends from its first
/// unacknowledged event, as after any failure (see each sink's docs and docs/operations.md,
/// "Many tables per relay").
#[derive(Clone)]
pub enum SharedClient {
    /// Nothing shared: every table builds its own client (a single-table relay).
    None,
    /// One Kafka producer.
    Kafka(Arc<SharedProducer>),
    /// One NATS connection.
    Nats(Arc<nats::SharedConnection>),
    /// One Redis connection.
    Redis(Arc<redis::SharedConnection>),
    /// One RabbitMQ connection.
    Rabbitmq(Arc<rabbitmq::SharedConnection>),
}

impl SharedClient {
    /// The client the configuration's sink lets the tables share (nothing connects).
    pub fn for_config(config: &RelayConfig) -> Result<Self, SinkError> {
        Ok(match config.sink {
            SinkKind::Kafka => SharedClient::Kafka(SharedProducer::new(config.kafka.clone())?),
            SinkKind::Nats => SharedClient::Nats(nats::SharedConnection::new(config.nats.clone())?),
            SinkKind::Redis => {
                SharedClient::Redis(redis::SharedConnection::new(config.redis.clone())?)
            }
            SinkKind::Rabbitmq => {
                SharedClient::Rabbitmq(rabbitmq::SharedConnection::new(config.rabbitmq.clone())?)
            }
        })
    }
}

/// [`from_config`], through `shared` when it is a client of the configured sink.
pub fn from_config_sharing(
    config: &RelayConfig,
    shared: &SharedClient,
) -> Result<Box<dyn Sink>, SinkError> {
    let sink: Box<dyn Sink> = match (config.sink, shared) {
        (SinkKind::Kafka, SharedClient::Kafka(producer)) => Box::new(producer.sink()),
        (SinkKind::Kafka, _) => Box::new(KafkaSink::new(config.kafka.clone())?),
        (SinkKind::Nats, SharedClient::Nats(shared)) => Box::new(shared.sink()),
        (SinkKind::Redis, SharedClient::Redis(shared)) => Box::new(shared.sink()),
        (SinkKind::Rabbitmq, SharedClient::Rabbitmq(shared)) => Box::new(shared.sink()),
        (SinkKind::Nats, _) => Box::new(NatsSink::new(config.nats.clone())?),
        (SinkKind::Redis, _) => Box::new(RedisSink::new(config.redis.clone())?),
        (SinkKind::Rabbitmq, _) => Box::new(RabbitmqSink::new(config.rabbitmq.clone())?),
    };
    Ok(Traced::wrap(sink, config.telemetry.enabled))
}
