//! Where events go: the [`Sink`] interface every broker implements, what became of each record
//! in terms every broker shares ([`Outcome`], [`DeliveryFault`]) and the relay's classes of
//! delivery failure ([`ErrorClass`]). The Kafka producer lives in [`kafka`].
//!
//! What every sink promises the relay (the pump relies on nothing else):
//! - [`Outcome::Delivered`] only once the broker confirmed the record durably (Kafka: `acks=all`);
//! - records of one destination and key are enqueued in order and never overtake each other,
//!   across the sink's own retries too;
//! - a record refused for good at enqueue time is [`Outcome::Rejected`] and the later records
//!   with its destination and key are [`Outcome::Held`], never sent;
//! - after a failure the relay [`Sink::recreate`]s the sink and sends again from the first
//!   unacknowledged event: nothing the old client still held may be delivered after that.

use std::time::Duration;

use crate::failure::ErrorKind;
use crate::route::OutboundRecord;

pub mod kafka;
pub mod nats;
pub mod rabbitmq;
pub mod redis;
pub mod select;
pub mod shared;
pub mod traced;

pub use crate::config::SinkKind;

/// A sink problem that is not one record's verdict: bad settings, a client that cannot be
/// built, a broker out of reach, or records the broker refuses until an operator acts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The configuration is refused before any connection is made.
    #[error("invalid {broker} setting `{key}`: {reason}")]
    Config {
        /// The broker.
        broker: &'static str,
        /// The setting's name.
        key: String,
        /// Why.
        reason: String,
    },
    /// The broker's client could not be built (a missing certificate file, …).
    #[error("could not create the {broker} client")]
    Create {
        /// The broker.
        broker: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The broker refuses the relay's records in a way retrying cannot fix (permissions, a
    /// missing destination, an error that persists): the relay stops and says what the
    /// operator must do.
    #[error("{broker} refuses the records for `{destination}` with {name} ({detail}): {fix}")]
    Refused {
        /// The broker.
        broker: &'static str,
        /// The destination (topic, subject, exchange, stream) of the first refused record.
        destination: String,
        /// The broker's name for the error (e.g. `TOPIC_AUTHORIZATION_FAILED`).
        name: String,
        /// The client's description of the error.
        detail: String,
        /// What the operator must do about it.
        fix: String,
    },
    /// The broker did not answer within the connect timeout.
    #[error("{broker} at `{servers}` is unreachable: {detail}")]
    Unreachable {
        /// The broker.
        broker: &'static str,
        /// Where the relay looked for it (credentials removed).
        servers: String,
        /// The client's error and what it last reported (TLS, authentication, name resolution…).
        detail: String,
    },
}

impl SinkError {
    /// What kind of failure this is ([`crate::failure`]): an invalid setting, a client that
    /// cannot be built, a broker refusing the records for good, or an unreachable broker.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SinkError::Config { .. } => ErrorKind::Config,
            SinkError::Create { .. } => ErrorKind::Setup,
            SinkError::Refused { .. } => ErrorKind::Refused,
            SinkError::Unreachable { .. } => ErrorKind::Unavailable,
        }
    }

    /// The loud stop for a fault of class [`ErrorClass::Stop`] (or an unlisted fault that
    /// persisted), naming the fault and the operator's fix.
    pub fn refused(
        broker: &'static str,
        destination: &str,
        fault: &DeliveryFault,
        fix: impl Into<String>,
    ) -> Self {
        SinkError::Refused {
            broker,
            destination: destination.to_owned(),
            name: fault.name.clone(),
            detail: fault.detail.clone(),
            fix: fix.into(),
        }
    }
}

/// One record's failure in broker-neutral terms: the sink classified its client's error when
/// it reported the outcome, so the pump decides without knowing the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFault {
    /// What the relay does about it.
    pub class: ErrorClass,
    /// The broker's stable name for the error (`MSG_SIZE_TOO_LARGE`, `NO_ROUTE`, …).
    pub name: String,
    /// The client's description.
    pub detail: String,
}

impl std::fmt::Display for DeliveryFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl DeliveryError for DeliveryFault {
    fn kind(&self) -> String {
        self.name.clone()
    }
}

/// What [`Sink::fence`] dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fenced {
    /// Records the client held when the fence began (queued, or on the wire).
    pub held: usize,
    /// Records still unanswered when the wait ended (dropped; a broker may still append them).
    pub unanswered: usize,
}

/// A batch handed to a sink whose outcomes are not all known yet.
#[async_trait::async_trait]
pub trait PendingBatch: Send {
    /// Records refused for good when they were enqueued (their outcome is known already), by
    /// index in the batch.
    fn rejected_now(&self) -> Vec<usize>;
    /// Records handed to the broker's client whose verdict is still to come, by index (the
    /// others were refused, held or not sent at enqueue time).
    fn accepted(&self) -> Vec<usize>;
    /// Waits for the broker's verdict on every record: one outcome per record, in order. A
    /// record not confirmed within the sink's delivery timeout is [`Outcome::Failed`].
    async fn wait(self: Box<Self>) -> Vec<Outcome>;
}

/// A broker the relay publishes to. See the [module docs](self) for what every implementation
/// guarantees.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// Which broker this is.
    fn kind(&self) -> SinkKind;
    /// Proves the broker is reachable and the credentials work, within the connect timeout.
    async fn check_connection(&self) -> Result<(), SinkError>;
    /// Hands `records` to the broker's client in order without waiting for the broker, so
    /// several batches can be in flight. A record refused for good on the spot is
    /// [`Outcome::Rejected`] and the later records with its destination and key are
    /// [`Outcome::Held`]; after a transient failure nothing further of the batch is sent.
    async fn enqueue(&self, records: &[OutboundRecord]) -> Box<dyn PendingBatch>;
    /// [`Sink::enqueue`], then [`PendingBatch::wait`].
    async fn send_batch(&self, records: &[OutboundRecord]) -> Vec<Outcome> {
        self.enqueue(records).await.wait().await
    }
    /// Records handed to the client and not yet answered.
    fn in_flight(&self) -> usize;
    /// How long the broker may take to confirm a record before it counts as failed (the
    /// broker's `delivery_timeout` setting); bounds the wait of [`Sink::fence`] too.
    fn delivery_timeout(&self) -> Duration;
    /// Replaces the client with a fresh one after a failure: nothing the old one still held can
    /// be delivered out of order after the relay resumes.
    async fn recreate(&mut self) -> Result<(), SinkError>;
    /// Drops every record the client holds without waiting for the broker; returns how many
    /// there were. A record already on the wire may still be written (a duplicate at most).
    fn purge(&self) -> usize;
    /// Fences the client before the relay lets go of its source: drops what is not yet sent,
    /// waits up to `wait` for what is on the wire to be answered, drops the rest. The sink is
    /// [`Sink::recreate`]d afterwards.
    async fn fence(&self, wait: Duration) -> Fenced;
    /// Starts the idle reachability probe that keeps
    /// [`crate::stats::RelayStats::sink_reachable`] current for `/readyz`, if this broker has
    /// one; it stops when `shutdown` fires.
    fn watch(
        &self,
        stats: std::sync::Arc<crate::stats::RelayStats>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, SinkError>;
}

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

/// What became of one record of a batch, whatever the broker; `E` is the error (a
/// [`DeliveryFault`] once the sink has classified it).
#[derive(Debug, Clone)]
pub enum Outcome<E = DeliveryFault> {
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

impl<E> Outcome<E> {
    /// The same outcome with its error converted (a sink classifying its client's error).
    pub fn map_err<F>(self, f: impl FnOnce(E) -> F) -> Outcome<F> {
        match self {
            Outcome::Delivered(d) => Outcome::Delivered(d),
            Outcome::Rejected(e) => Outcome::Rejected(f(e)),
            Outcome::Held { behind } => Outcome::Held { behind },
            Outcome::Suspect(e) => Outcome::Suspect(f(e)),
            Outcome::Failed(e) => Outcome::Failed(f(e)),
        }
    }
}

/// A broker client's delivery error, as telemetry reports it.
pub trait DeliveryError: std::fmt::Display {
    /// A short stable name for the kind of error (an error code's name), `_OTHER` when the
    /// client has none.
    fn kind(&self) -> String;
}

/// What the relay does about a record the broker did not accept. The broker's sink is the one
/// place that decides it (for Kafka, [`kafka::classify`]) and reports it in [`DeliveryFault`].
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

/// Whether this relay acknowledged an event within the last `interval`: those acknowledgements
/// prove the broker answers, so an idle probe ([`Sink::watch`]) skips its own request.
pub fn published_within(stats: &crate::stats::RelayStats, interval: Duration) -> bool {
    use std::sync::atomic::Ordering;
    let last = stats.last_published_ms.load(Ordering::Relaxed);
    last > 0 && chrono::Utc::now().timestamp_millis() - last < interval.as_millis() as i64
}

/// Records an idle probe's answer in [`crate::stats::RelayStats::sink_reachable`] (what
/// `/readyz` reports) and logs only the changes: `down` once when the broker stops answering,
/// `up` once when it answers again, each naming `servers` (credentials already removed).
pub fn record_probe<E: std::fmt::Display>(
    stats: &crate::stats::RelayStats,
    servers: &str,
    answer: Result<(), E>,
    down: &str,
    up: &str,
) {
    use std::sync::atomic::Ordering;
    let was = stats.sink_reachable.swap(answer.is_ok(), Ordering::Relaxed);
    match (was, answer) {
        (true, Err(error)) => tracing::warn!(servers = %servers, %error, "{down}"),
        (false, Ok(())) => tracing::info!(servers = %servers, "{up}"),
        _ => {}
    }
}
