//! Where committed events come from, and the delivery contract every source honours.
//!
//! A [`Source`] hands the relay committed events in publish order and is told which of them Kafka
//! has acknowledged. The contract, for every implementation:
//!
//! - **Committed only.** An event is returned only after its transaction committed; nothing from a
//!   rolled-back transaction is ever returned.
//! - **Per-aggregate order.** Events of one aggregate are returned in commit order.
//! - **No loss.** An event stays due until [`Source::acknowledge`] has made its acknowledgement
//!   durable; after a crash or [`Source::rewind`], every unacknowledged event is returned again.
//! - **Acknowledgement is a prefix.** The relay acknowledges only a contiguous prefix of what it
//!   received (see [`crate::ack`]); a source may rely on that.
//!
//! Duplicates follow from this contract and are bounded by what was in flight at a crash: the
//! relay guarantees at-least-once delivery and every record carries its stable event id.

pub mod logical;
pub mod polling;
pub mod row_marks;

use crate::failure::ErrorKind;
use async_trait::async_trait;
use outbox_core::StoredEvent;
use tokio_util::sync::CancellationToken;

/// An event handed to the relay, with what the source needs to acknowledge it later.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEvent {
    /// The committed event.
    pub event: StoredEvent,
    /// Where it sits in the source's stream; opaque to the relay.
    pub position: Position,
    /// Why this committed row or message is not a valid event (e.g. `headers` that are not a
    /// JSON object), `None` for a valid one. `event` then holds what could be read. The relay
    /// never publishes such an event: it parks it with this reason and holds its aggregate
    /// behind it, like a poison event, so nothing is skipped and nothing stalls the others.
    pub defect: Option<String>,
}

impl SourceEvent {
    /// A valid event at `position`.
    pub fn new(event: StoredEvent, position: Position) -> Self {
        Self {
            event,
            position,
            defect: None,
        }
    }

    /// A committed row or message that could not be decoded: parked, never published.
    pub fn malformed(malformed: outbox_core::MalformedEvent, position: Position) -> Self {
        Self {
            event: *malformed.salvaged,
            position,
            defect: Some(format!("malformed outbox event: {}", malformed.reason)),
        }
    }

    /// A decoding result at `position`: valid or malformed.
    pub fn decoded(
        decoded: Result<StoredEvent, outbox_core::MalformedEvent>,
        position: Position,
    ) -> Self {
        match decoded {
            Ok(event) => Self::new(event, position),
            Err(m) => Self::malformed(m, position),
        }
    }
}

/// A source-specific position, carried from [`Source::next_batch`] to [`Source::acknowledge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// A row of the outbox table (polling source); acknowledged by its event id.
    Row,
    /// A change in the write-ahead log (logical-replication source).
    Wal {
        /// LSN of the commit of the event's transaction.
        commit_lsn: u64,
        /// LSN just past the commit record: what may be confirmed to the slot once the whole
        /// transaction is acknowledged.
        end_lsn: u64,
        /// Whether this is the last event of its transaction.
        last_in_transaction: bool,
    },
}

/// A failure of a source: which source, its typed cause (the [`std::error::Error::source`] of
/// this error) and the cause's [`ErrorKind`], which decides what the relay does
/// ([`crate::failure::decide`]).
#[derive(Debug, thiserror::Error)]
#[error("the {source_name} source failed")]
pub struct SourceError {
    source_name: &'static str,
    kind: ErrorKind,
    #[source]
    cause: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl SourceError {
    /// A failure of the source `source_name` (`polling` or `logical`) caused by `cause`.
    pub fn new(
        source_name: &'static str,
        kind: ErrorKind,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            source_name,
            kind,
            cause: cause.into(),
        }
    }

    /// A statement of the source `source_name` failed ([`ErrorKind::Unavailable`]: the source
    /// resumes from its durable position).
    pub fn database(source_name: &'static str, error: sqlx::Error) -> Self {
        Self::new(source_name, ErrorKind::Unavailable, error)
    }

    /// `polling` or `logical`.
    pub fn source_name(&self) -> &'static str {
        self.source_name
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// A stream of committed outbox events. See the [module docs](self) for the delivery contract.
#[async_trait]
pub trait Source: Send {
    /// `polling` or `logical`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Waits for committed events and returns between 1 and `max` of them in publish order, or
    /// an empty batch once `shutdown` is cancelled.
    async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SourceEvent>, SourceError>;

    /// Returns up to `max` further committed events that are available right now, without
    /// waiting (an empty batch when there are none), while earlier batches are still
    /// unacknowledged. Sources that cannot do that keep the default, which turns pipelining off.
    async fn poll_batch(&mut self, max: usize) -> Result<Vec<SourceEvent>, SourceError> {
        let _ = max;
        Ok(Vec::new())
    }

    /// Asks the source to cut each batch once its payloads reach about `bytes` (always
    /// returning at least one event). Called once, before the first batch; a source that cannot
    /// cut by size keeps the default and the relay bounds its window by bytes on its own.
    fn limit_batch_bytes(&mut self, bytes: usize) {
        let _ = bytes;
    }

    /// Records that `delivered` — a contiguous prefix, in order, of the events returned since
    /// the last acknowledge or rewind — has been acknowledged by Kafka. The record may become
    /// durable in the background ([`row_marks`]); until it is, those events are neither returned
    /// again nor counted as done (no slot confirmation past them), and a crash publishes them
    /// again. [`Source::flush`] waits for it.
    async fn acknowledge(&mut self, delivered: &[SourceEvent]) -> Result<(), SourceError>;

    /// Waits until every acknowledgement made so far is durable (before a clean stop).
    async fn flush(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// Forgets every event returned but not acknowledged: the next [`Source::next_batch`]
    /// resumes from the durable position and returns them again.
    async fn rewind(&mut self) -> Result<(), SourceError>;
}
