//! Where events go: Kafka.

pub mod kafka;
