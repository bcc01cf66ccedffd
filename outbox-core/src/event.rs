//! The contract between a domain event type and the outbox.

use serde_json::Value;

/// A domain event that can be written to the outbox.
///
/// Usually derived with `#[derive(OutboxEvent)]` (see the crate docs); implement it by hand when
/// the event's metadata is only known at run time.
///
/// Guarantee to the relay and to consumers: the values returned here become the row's Debezium
/// columns (`aggregatetype`, `aggregateid`, `type`, `payload`) and from there the Kafka topic
/// (`outbox.event.<aggregate_type>` by default), the record key (the aggregate id) and the value
/// (the payload JSON). Events of one aggregate share a key, hence a partition, hence an order.
pub trait OutboxEvent {
    /// The aggregate type, e.g. `"account"`; routes the event to `outbox.event.account` by default.
    fn aggregate_type(&self) -> &str;

    /// The aggregate instance this event belongs to; becomes the Kafka record key.
    fn aggregate_id(&self) -> String;

    /// The event type name, e.g. `"AccountOpened"`; stored in the `type` column and sent as the
    /// `eventType` / `ce_type` headers.
    fn event_type(&self) -> &str;

    /// Version of this event type's payload schema (starts at 1). Sent as a header so consumers
    /// can upcast old payloads.
    fn schema_version(&self) -> i32 {
        1
    }

    /// A fixed topic for this event, overriding the relay's routing template.
    ///
    /// Splitting one aggregate's events across topics gives up their relative order: Kafka orders
    /// records only within one partition of one topic.
    fn topic(&self) -> Option<&str> {
        None
    }

    /// The position of this event in its aggregate's stream (the aggregate version after the
    /// event), if the service tracks one. Stored in `aggregate_seq` and sent as the
    /// `outbox-aggregate-seq` header so consumers can detect gaps and reordering.
    fn aggregate_sequence(&self) -> Option<i64> {
        None
    }

    /// The JSON payload stored in the `payload` column and published as the record value.
    fn to_payload(&self) -> Result<Value, serde_json::Error>;
}

/// A type that can be rebuilt from a published outbox event: the consumer-side half of the
/// contract that `#[derive(OutboxEvent)]` generates alongside [`OutboxEvent`].
pub trait DecodeEvent: Sized {
    /// Whether records of this event type decode into `Self`.
    fn accepts(event_type: &str) -> bool;

    /// Rebuilds the event from its type name and payload JSON.
    ///
    /// Fails with [`DecodeError::UnknownEventType`] when `event_type` is not one of this type's
    /// events, and with [`DecodeError::Payload`] when the payload does not match its shape.
    fn decode(event_type: &str, payload: &[u8]) -> Result<Self, DecodeError>;
}

/// Why a record could not be decoded into a typed event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record's event type is not one that the target type knows.
    #[error("unknown event type `{event_type}` for {target}")]
    UnknownEventType {
        /// The event type found on the record.
        event_type: String,
        /// The Rust type that was asked to decode it.
        target: &'static str,
    },
    /// The payload is not valid JSON for the event type.
    #[error("payload of event type `{event_type}` does not match {target}: {source}")]
    Payload {
        /// The event type found on the record.
        event_type: String,
        /// The Rust type that was asked to decode it.
        target: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}
