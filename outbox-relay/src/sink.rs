//! Where events go: what became of each produced record, in terms every broker shares, and the
//! relay's classes of delivery failure. The Kafka producer lives in [`kafka`].

pub mod kafka;

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

/// What became of one record of a batch, whatever the broker; `E` is its client's error.
#[derive(Debug, Clone)]
pub enum Outcome<E> {
    /// The broker acknowledged it.
    Delivered(Delivered),
    /// The broker (or its client) refused it for good: it must be parked, not retried.
    Rejected(E),
    /// Not sent because an earlier record of the same topic and key (the record at index
    /// `behind`) was rejected: it must be parked behind that one.
    Held {
        /// Index in the batch of the rejected record.
        behind: usize,
    },
    /// The produce request this record was part of failed with a record-level error
    /// ([`ErrorClass::Record`]) that may concern another record of the request: the relay sends
    /// it again alone before it decides (delivered, or [`Outcome::Rejected`] and parked).
    Suspect(E),
    /// A failure the window cannot get past (timeout, broker unavailable, a refusal that stops
    /// the relay, …): see [`ErrorClass`] for what the relay does.
    Failed(E),
}

/// A broker client's delivery error, as telemetry reports it.
pub trait DeliveryError: std::fmt::Display {
    /// A short stable name for the kind of error (an error code's name), `_OTHER` when the
    /// client has none.
    fn kind(&self) -> String;
}

/// What the relay does about a record the broker did not accept. The broker's sink is the one
/// place that decides it (for Kafka, [`kafka::classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (brokers down or slow, leadership moving, the producer's own fatal state):
    /// drop the in-flight window, recreate the producer and resume from the first
    /// unacknowledged event after a backoff, for as long as it takes.
    Retry,
    /// The broker refuses the record for what it is (its size, timestamp, contents or topic name).
    /// Refused when it is enqueued, the verdict is the record's own and it is parked; from a
    /// broker, the verdict covers a whole produce request, so the record is first sent again
    /// alone and parked only if it fails alone.
    Record,
    /// Nothing can be published until an operator acts (permissions, a missing topic, a broker
    /// that cannot take the relay's records): the relay stops with this fix.
    Stop(&'static str),
    /// An error this relay does not know: retried like [`ErrorClass::Retry`], but the relay
    /// stops with the error's name once it persists for [`UNLISTED_ERROR_ROUNDS`] rounds in a
    /// row with nothing delivered in between.
    Unlisted,
}

/// How many failed rounds in a row an [`ErrorClass::Unlisted`] error may cause before the relay
/// stops.
pub const UNLISTED_ERROR_ROUNDS: u32 = 5;
