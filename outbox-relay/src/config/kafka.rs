//! The `[kafka]` settings: where the producer connects and which librdkafka properties it may
//! be given.

use std::collections::BTreeMap;
use std::time::Duration;

use super::RedactedMap;

/// Producer settings. `Debug` redacts secret properties ([`super::is_secret_key`]).
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// How long a record may take to be acknowledged before it counts as failed. The relay
    /// enforces it itself, for a whole produce queue at once; librdkafka's own `delivery.timeout.ms` is infinite, because librdkafka times records out
    /// one by one and a later record of the same partition could then still be delivered.
    #[serde(with = "super::duration")]
    pub delivery_timeout: Duration,
    /// How long start-up waits for the cluster's metadata before reporting it unreachable.
    #[serde(with = "super::duration")]
    pub connect_timeout: Duration,
    /// Any other librdkafka producer property (TLS, SASL, `linger.ms`, `compression.type`, …).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap_servers: "localhost:9092".to_owned(),
            delivery_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            properties: BTreeMap::new(),
        }
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("properties", &RedactedMap(&self.properties))
            .finish()
    }
}

/// A producer property that contradicts a guarantee the relay depends on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Kafka setting `{key}`: {reason}")]
pub struct KafkaPropertyError {
    /// The property name.
    pub key: String,
    /// Why it is refused.
    pub reason: String,
}

impl KafkaSettings {
    /// Refuses an empty `bootstrap_servers` and every user property that would weaken
    /// idempotence, `acks=all`, gap-less delivery or the relay's own delivery timeout. Whatever
    /// passes can be handed to librdkafka with the relay's guarantees set on top.
    pub fn check(&self) -> Result<(), KafkaPropertyError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(KafkaPropertyError {
                key: "bootstrap.servers".into(),
                reason: "must not be empty".into(),
            });
        }
        for (key, value) in &self.properties {
            let refused = match key.as_str() {
                "enable.idempotence" if value != "true" => Some("the relay requires idempotence"),
                "acks" | "request.required.acks" if !matches!(value.as_str(), "all" | "-1") => {
                    Some("the relay requires acks=all")
                }
                "max.in.flight.requests.per.connection" | "max.in.flight"
                    if value.parse::<u32>().map(|n| n > 5).unwrap_or(true) =>
                {
                    Some("idempotent ordering needs at most 5 in-flight requests")
                }
                "enable.gapless.guarantee" if value != "true" => Some(
                    "the relay requires it: a failed batch must not leave a gap that later batches of the partition fill",
                ),
                "bootstrap.servers" => Some("set it through its own setting"),
                "delivery.timeout.ms" | "message.timeout.ms" => Some(
                    "set kafka.delivery_timeout instead: the relay times out a whole produce queue at once, so a timed-out record never lets a later record of its partition through",
                ),
                _ => None,
            };
            if let Some(reason) = refused {
                return Err(KafkaPropertyError {
                    key: key.clone(),
                    reason: reason.into(),
                });
            }
        }
        Ok(())
    }
}
