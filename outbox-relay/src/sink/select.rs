//! Which sink a relay runs: the one its configuration names (`sink = "kafka"`, …).

use std::sync::Arc;

use crate::config::RelayConfig;
use crate::sink::kafka::{KafkaSink, SharedProducer};
use crate::sink::nats::{NatsConnection, NatsSink};
use crate::sink::rabbitmq::{RabbitmqConnection, RabbitmqSink};
use crate::sink::redis::{RedisConnection, RedisSink};
use crate::sink::traced::Traced;
use crate::sink::{Sink, SinkError, SinkKind};

/// Builds the sink the configuration names (no connection is made yet; see
/// [`Sink::check_connection`]), with producer spans when `telemetry.enabled`
/// ([`crate::telemetry`]).
pub fn from_config(config: &RelayConfig) -> Result<Box<dyn Sink>, SinkError> {
    from_config_sharing(config, &SharedClient::None)
}

/// A broker client the tables of one relay share ([`crate::RelayGroup`]).
///
/// - Kafka: one idempotent producer and one idle probe for every table ([`SharedProducer`]).
/// - NATS and Redis: one connection for every table ([`NatsConnection`], [`RedisConnection`],
///   see [`crate::sink::shared`]), the idle probes included. Each table keeps its own order,
///   in-flight count and failure flag; a failure any table sees replaces the connection once,
///   and every table with records on the old one fails them and re-sends them in order on the
///   new one (a table with nothing in flight just moves over).
/// - RabbitMQ: one AMQP connection for every table ([`RabbitmqConnection`]), each table on a
///   confirm channel of its own, the idle probes included. A failed table closes its own
///   channel in order (the broker answers the close only once the channel has routed
///   everything published on it) before it re-sends; the connection is replaced only when it
///   is dead, so one table's channel-level error does not disturb the others (see
///   [`crate::sink::rabbitmq`]).
///
/// See docs/operations.md, "Many tables per relay".
#[derive(Clone)]
pub enum SharedClient {
    /// Nothing shared: every table builds its own client.
    None,
    /// One Kafka producer.
    Kafka(Arc<SharedProducer>),
    /// One NATS connection.
    Nats(Arc<NatsConnection>),
    /// One Redis connection.
    Redis(Arc<RedisConnection>),
    /// One RabbitMQ connection.
    Rabbitmq(Arc<RabbitmqConnection>),
}

impl SharedClient {
    /// The client the configuration's sink lets the tables share, if any (nothing connects).
    pub fn for_config(config: &RelayConfig) -> Result<Self, SinkError> {
        Ok(match config.sink {
            SinkKind::Kafka => SharedClient::Kafka(SharedProducer::new(config.kafka.clone())?),
            SinkKind::Nats => SharedClient::Nats(NatsConnection::new(config.nats.clone())),
            SinkKind::Redis => SharedClient::Redis(RedisConnection::new(config.redis.clone())?),
            SinkKind::Rabbitmq => {
                SharedClient::Rabbitmq(RabbitmqConnection::new(config.rabbitmq.clone())?)
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
        (SinkKind::Nats, SharedClient::Nats(connection)) => Box::new(connection.sink()?),
        (SinkKind::Nats, _) => Box::new(NatsSink::new(config.nats.clone())?),
        (SinkKind::Redis, SharedClient::Redis(connection)) => Box::new(connection.sink()),
        (SinkKind::Redis, _) => Box::new(RedisSink::new(config.redis.clone())?),
        (SinkKind::Rabbitmq, SharedClient::Rabbitmq(connection)) => Box::new(connection.sink()),
        (SinkKind::Rabbitmq, _) => Box::new(RabbitmqSink::new(config.rabbitmq.clone())?),
    };
    Ok(Traced::wrap(sink, config.telemetry.enabled))
}
