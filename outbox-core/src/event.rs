//! The contract between a domain event type and the outbox.

use serde_json::Value;
use uuid::Uuid;

/// The header that carries an event's broker record key when it differs from its aggregate id
/// ([`OutboxEvent::message_key`], `#[outbox(key)]`, [`NewEvent::with_key`](crate::NewEvent::with_key)).
///
/// The relay keys records by the `aggregateid` column, or by this header's value when an event
/// has it (the header is published too). When the two differ, the record also carries the
/// aggregate id in [`HEADER_AGGREGATE_ID`](crate::inbox::HEADER_AGGREGATE_ID), which
/// [`EventMetadata::from_record`](crate::inbox::EventMetadata::from_record) prefers to the key.
pub const KEY_HEADER: &str = "outbox-key";

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

    /// The event id, when the event carries its own (e.g. a client-supplied idempotency key);
    /// `None` (the default) lets the outbox draw a time-ordered UUIDv7.
    ///
    /// The id is the row's primary key and the `id` header consumers dedupe on, so writing the
    /// same id twice fails the second transaction. Derived from a field with `#[outbox(id)]`.
    fn event_id(&self) -> Option<Uuid> {
        None
    }

    /// The broker record key, when it should differ from the aggregate id; `None` (the default)
    /// keys by the aggregate id.
    ///
    /// Written as the [`KEY_HEADER`] header. Records of one key share a partition, so choosing a
    /// key other than the aggregate id changes which events are ordered relative to each other.
    /// Derived from a field with `#[outbox(key)]`.
    fn message_key(&self) -> Option<String> {
        None
    }

    /// Extra headers published with the event, as (name, value) pairs; none by default.
    ///
    /// Names the relay sets itself (`id`, `eventType`, `schemaVersion`, `traceparent`,
    /// `ce_*`, …) are not copied by the relay. Derived from fields with
    /// `#[outbox(header = "name")]`.
    fn headers(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// A value usable as an event header or broker key: `#[outbox(header = "...")]` and
/// `#[outbox(key)]` fields must implement it.
///
/// Implemented for strings, integers, `bool`, `char`, [`Uuid`], and `Option` of these (`None`
/// omits the header, or keeps the aggregate id as the key). Implement it for your own types
/// (e.g. an id newtype) to use them as header fields.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be sent as an outbox header or key",
    label = "not convertible to a header value",
    note = "an #[outbox(header = \"...\")] or #[outbox(key)] field must be a string, an integer, \
            a bool, a char, a Uuid, an Option of one of these, or implement \
            outbox_core::HeaderValue"
)]
pub trait HeaderValue {
    /// The header text, or `None` to send no header.
    fn to_header_value(&self) -> Option<String>;
}

macro_rules! header_value_via_to_string {
    ($($ty:ty),* $(,)?) => {$(
        impl HeaderValue for $ty {
            fn to_header_value(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}

header_value_via_to_string!(
    str, String, bool, char, i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize, Uuid
);

impl HeaderValue for std::borrow::Cow<'_, str> {
    fn to_header_value(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl<T: HeaderValue + ?Sized> HeaderValue for &T {
    fn to_header_value(&self) -> Option<String> {
        (**self).to_header_value()
    }
}

impl<T: HeaderValue + ?Sized> HeaderValue for Box<T> {
    fn to_header_value(&self) -> Option<String> {
        (**self).to_header_value()
    }
}

impl<T: HeaderValue> HeaderValue for Option<T> {
    fn to_header_value(&self) -> Option<String> {
        self.as_ref().and_then(HeaderValue::to_header_value)
    }
}

/// A value usable as an aggregate sequence: the type of an `#[outbox(sequence)]` field.
///
/// Implemented for the integer types that fit in the `aggregate_seq` column (`bigint`) without
/// loss: `i8`…`i64`, `u8`…`u32`, their `NonZero` forms, and references to these. Implement it
/// for your own version type (e.g. a newtype over `i64`) to mark it as the sequence.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an outbox aggregate sequence",
    label = "not convertible to i64 without loss",
    note = "an #[outbox(sequence)] field is stored in the bigint column aggregate_seq: it must \
            be an integer of at most 64 signed or 32 unsigned bits, or implement \
            outbox_core::SequenceValue"
)]
pub trait SequenceValue {
    /// The sequence as stored in `aggregate_seq`.
    fn to_sequence(&self) -> i64;
}

macro_rules! sequence_value_via_from {
    ($($ty:ty),* $(,)?) => {$(
        impl SequenceValue for $ty {
            fn to_sequence(&self) -> i64 {
                i64::from(*self)
            }
        }
    )*};
}

sequence_value_via_from!(i8, i16, i32, i64, u8, u16, u32);

macro_rules! sequence_value_via_get {
    ($($ty:ty),* $(,)?) => {$(
        impl SequenceValue for $ty {
            fn to_sequence(&self) -> i64 {
                i64::from(self.get())
            }
        }
    )*};
}

sequence_value_via_get!(
    std::num::NonZeroI8,
    std::num::NonZeroI16,
    std::num::NonZeroI32,
    std::num::NonZeroI64,
    std::num::NonZeroU8,
    std::num::NonZeroU16,
    std::num::NonZeroU32,
);

impl<T: SequenceValue + ?Sized> SequenceValue for &T {
    fn to_sequence(&self) -> i64 {
        (**self).to_sequence()
    }
}

impl<T: SequenceValue + ?Sized> SequenceValue for Box<T> {
    fn to_sequence(&self) -> i64 {
        (**self).to_sequence()
    }
}

/// A value usable as an event id: the type of an `#[outbox(id)]` field.
///
/// Implemented for [`Uuid`] and `Option<Uuid>` (`None`: the outbox draws a UUIDv7).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an outbox event id",
    label = "not a Uuid",
    note = "an #[outbox(id)] field is the event's primary key: it must be a uuid::Uuid or an \
            Option<uuid::Uuid>"
)]
pub trait EventIdValue {
    /// The event id, or `None` to let the outbox choose one.
    fn to_event_id(&self) -> Option<Uuid>;
}

impl EventIdValue for Uuid {
    fn to_event_id(&self) -> Option<Uuid> {
        Some(*self)
    }
}

impl EventIdValue for Option<Uuid> {
    fn to_event_id(&self) -> Option<Uuid> {
        *self
    }
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

    /// Rebuilds the event from a payload written at `schema_version` (the record's
    /// `schemaVersion` header, 1 when absent): the hook for upcasting old payloads.
    ///
    /// The inbox ([`decode_record`](crate::inbox::decode_record)) calls this, not
    /// [`decode`](Self::decode). The default ignores the version and calls `decode`. Derived
    /// types get an upcasting version with `#[outbox(upcast = path)]`: a payload older than the
    /// type's current `schema_version` goes through `path(event_type, schema_version, payload)`
    /// first. Implement it by hand to do the same for a hand-written [`DecodeEvent`]; report a
    /// failed upcast as [`DecodeError::Upcast`].
    fn decode_versioned(
        event_type: &str,
        schema_version: i32,
        payload: &[u8],
    ) -> Result<Self, DecodeError> {
        let _ = schema_version;
        Self::decode(event_type, payload)
    }
}

/// The error an upcast function may return; anything convertible into it works, e.g. a `String`
/// or any `std::error::Error + Send + Sync`.
pub type UpcastError = Box<dyn std::error::Error + Send + Sync>;

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
    /// A payload of an older schema version could not be upcast to the current one.
    #[error(
        "payload of event type `{event_type}` could not be upcast from schema version {from} \
         to {to} for {target}: {source}"
    )]
    Upcast {
        /// The event type found on the record.
        event_type: String,
        /// The Rust type that was asked to decode it.
        target: &'static str,
        /// The record's schema version.
        from: i32,
        /// The type's current schema version.
        to: i32,
        /// Why the upcast function refused the payload.
        #[source]
        source: UpcastError,
    },
}
