//! Which sink a relay runs: the one its configuration names (`sink = "kafka"`, …).

use crate::config::RelayConfig;
use crate::sink::kafka::KafkaSink;
use crate::sink::nats::NatsSink;
use crate::sink::rabbitmq::RabbitmqSink;
use crate::sink::redis::RedisSink;
use crate::sink::{Sink, SinkError, SinkKind};

/// Builds the sink the configuration names (no connection is made yet; see
/// [`Sink::check_connection`]).
pub fn from_config(config: &RelayConfig) -> Result<Box<dyn Sink>, SinkError> {
    match config.sink {
        SinkKind::Kafka => Ok(Box::new(
            KafkaSink::new(config.kafka.clone())?.with_producer_spans(config.telemetry.enabled),
        )),
        SinkKind::Nats => Ok(Box::new(NatsSink::new(config.nats.clone())?)),
        SinkKind::Redis => Ok(Box::new(
            RedisSink::new(config.redis.clone())?.with_producer_spans(config.telemetry.enabled),
        )),
        SinkKind::Rabbitmq => Ok(Box::new(RabbitmqSink::new(config.rabbitmq.clone())?)),
    }
}
