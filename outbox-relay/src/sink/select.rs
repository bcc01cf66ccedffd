//! Which sink a relay runs: the one its configuration names (`sink = "kafka"`, …).

use crate::config::RelayConfig;
use crate::sink::kafka::KafkaSink;
use crate::sink::nats::NatsSink;
use crate::sink::rabbitmq::RabbitmqSink;
use crate::sink::redis::RedisSink;
use crate::sink::traced::Traced;
use crate::sink::{Sink, SinkError, SinkKind};

/// Builds the sink the configuration names (no connection is made yet; see
/// [`Sink::check_connection`]), with producer spans when `telemetry.enabled`
/// ([`crate::telemetry`]).
pub fn from_config(config: &RelayConfig) -> Result<Box<dyn Sink>, SinkError> {
    let sink: Box<dyn Sink> = match config.sink {
        SinkKind::Kafka => Box::new(KafkaSink::new(config.kafka.clone())?),
        SinkKind::Nats => Box::new(NatsSink::new(config.nats.clone())?),
        SinkKind::Redis => Box::new(RedisSink::new(config.redis.clone())?),
        SinkKind::Rabbitmq => Box::new(RabbitmqSink::new(config.rabbitmq.clone())?),
    };
    Ok(Traced::wrap(sink, config.telemetry.enabled))
}
