//! The RabbitMQ sink: AMQP 0-9-1 through [`lapin`], one channel in publisher-confirm mode per
//! table, the tables of a relay sharing one connection.
//!
//! **Client.** `lapin` is the AMQP 0-9-1 client of the Rust ecosystem that is maintained and
//! complete (publisher confirms, `basic.return`, TLS, connection-blocked notices); `amiquip` is
//! synchronous and unmaintained, and the other crates are wrappers around `lapin`. It is built
//! with `native-tls`, the OpenSSL the relay already links for PostgreSQL and Kafka.
//!
//! **Mapping.** Every record is published to one exchange (`rabbitmq.exchange`, default
//! `outbox`, declared durable and of type `topic` unless `rabbitmq.declare_exchange = false`)
//! with the destination name as its routing key (`outbox.event.<aggregatetype>` by default), so
//! consumers bind a queue per event type (`outbox.event.order`) or for all of them
//! (`outbox.event.#`). With `exchange = ""` (the default exchange) a record goes to the queue
//! named like its destination. The record's headers (`id`, `eventType`, `schemaVersion`,
//! `traceparent`, `ce_*`, …) become AMQP headers (long strings), and the key (the aggregate id)
//! travels in the header [`KEY_HEADER`] (`aggregateId`). The message properties are:
//! `message_id` = the event id, `type` = the event type, `timestamp` = the event's creation time
//! (seconds), `content_type` = the record's `content-type` header or `application/json`,
//! `app_id` = `outbox-relay`, `delivery_mode` = 2 (persistent). An event without a payload is an
//! empty body.
//!
//! **Durability.** The channel is in confirm mode and every message is persistent and
//! `mandatory`: a record is [`Outcome::Delivered`] only on the broker's `basic.ack`, which
//! RabbitMQ sends once every queue the message was routed to has taken it (written to disk for
//! durable classic queues, replicated to a majority for quorum queues). A `basic.nack` is a
//! transient failure. A message no queue is bound for comes back with `basic.return`
//! (`NO_ROUTE`) before its ack: that stops the relay loudly ("declare a queue bound to the
//! exchange"), because acknowledging it would lose it.
//!
//! **Order.** Each table publishes on a channel of its own: RabbitMQ keeps a channel's publish
//! order into every queue, and a table's records are published in the relay's order. After a
//! failure the relay [`Sink::recreate`]s the table's sink: the old channel's outstanding
//! confirms are awaited (bounded by the delivery timeout), the old channel is closed —
//! RabbitMQ answers the close only once the channel has handled what was published on it —
//! and the next records go over a new channel, from the first unconfirmed event. Once a batch
//! failed at enqueue time (a closed channel, no connection), nothing more is published until
//! that recreate, so no later record can go out on a new channel ahead of the failed ones. The
//! delivery offset reported is the publish's sequence number on its channel (partition 0).
//! Every wait on the broker (publish, confirm, channel open and close) is bounded by the
//! delivery or connect timeout, so a dead connection the client has not noticed yet fails the
//! records rather than holding them.
//!
//! **Many tables, one connection.** The tables of one relay share one AMQP connection
//! ([`RabbitmqConnection`], see [`crate::sink::shared`]), each with its own confirm channel,
//! order, in-flight count and failure flag. The connection is replaced (retired, then reopened
//! by the next table that needs it) only when it is dead, or when a table's channel close went
//! unanswered: a channel-level error of one table (a body above the broker's limit, a missing
//! exchange) closes that table's channel only and leaves the others publishing. A table whose
//! channel belongs to a retired connection fails what it would publish while records of it are
//! still in flight there (their confirms fail or time out on their own), and after its
//! recreate opens a channel on the new connection; with nothing in flight it moves over at
//! once. A single-table relay has a connection of its own of the same kind, so the failure
//! path is the same code whatever the number of tables. The connection is named
//! [`connection_name`] (`outbox-relay-<pid>`).
//!
//! **Health.** [`Sink::watch`] opens (and closes) a channel on the shared connection every
//! second while the relay is idle (opening the connection when there is none), so `/readyz`
//! reports a broker that stopped answering.
//!
//! **Duplicates.** RabbitMQ does not deduplicate: a record re-sent after a failure whose first
//! copy was routed is delivered twice, with the same `message_id` (the event id), by which a
//! consumer drops it. Their number is bounded by the in-flight window, as for Kafka.
//!
//! **Refusals.** A record larger than `rabbitmq.max_message_size`, or with a destination or
//! header name longer than 255 bytes, is refused before it is sent ([`Outcome::Rejected`], then
//! parked); a body the broker itself finds too large closes the channel with
//! `PRECONDITION_FAILED`, which makes the unconfirmed records up to the largest one suspects
//! that the relay sends one at a time to find the one to park. A missing exchange
//! (`NOT_FOUND`), missing permissions (`ACCESS_REFUSED`) and unroutable messages stop the relay
//! with the operator's fix; a closed connection or channel, a missed heartbeat or a timed-out
//! confirm is retried.
//!
//! **Residual risk.** When the broker does not answer the close of a failed channel (a
//! resource alarm blocks the connection), its connection is retired and abandoned after the
//! delivery timeout (for every table: they move to the new one as after a lost connection);
//! records it had handed to the kernel may then still be routed after the new connection's
//! (duplicates that can arrive out of order). A connection cut from under the
//! relay cannot be closed in order at all: what the broker had already read from it is routed
//! by its channel while the relay backs off (at least 200 ms) before it reconnects. A `basic.nack` of one record while a
//! later one of the channel is acked (an internal queue error) lets the later one through
//! first; the earlier one follows when it is re-sent.

use crate::sink::{published_within, record_probe};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind, PublisherConfirm};

use crate::config::{RabbitmqSettings, redact_url};
use crate::route::OutboundRecord;
use crate::sink::shared::{Generation, SharedConnection};
use crate::sink::{
    Delivered, DeliveryError, DeliveryFault, ErrorClass, Fenced, PendingBatch, Sink, SinkError,
    SinkKind,
};

/// The broker's name in this sink's errors.
const RABBITMQ: &str = "RabbitMQ";

/// The AMQP header that carries the record's key (the aggregate id).
pub const KEY_HEADER: &str = "aggregateId";

/// The fix named when a message comes back unroutable.
const NO_ROUTE_FIX: &str = "declare a queue bound to the exchange for this routing key (outbox-relay topics ensure --sink rabbitmq), then restart the relay";

/// Why a record was not confirmed, in the client's terms.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RabbitError {
    /// The client or the broker failed (a closed connection or channel, a protocol error).
    #[error("{0}")]
    Client(lapin::Error),
    /// The broker answered `basic.nack`.
    #[error("the broker refused to take the message (basic.nack)")]
    Nack,
    /// The message came back with `basic.return`: no queue is bound for its routing key.
    #[error("the message was returned as unroutable: {code} {text}")]
    Returned {
        /// The reply code (312 `NO_ROUTE`).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The broker did not confirm within `rabbitmq.delivery_timeout`.
    #[error("not confirmed within the delivery timeout")]
    TimedOut,
    /// No connection could be made.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Refused before sending: the body is larger than `rabbitmq.max_message_size`.
    #[error("the message body is {size} bytes, above rabbitmq.max_message_size ({max} bytes)")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Refused before sending: a routing key or header name longer than an AMQP short string.
    #[error("{what} is {len} bytes, above AMQP's limit of 255")]
    TooLong {
        /// What is too long (`the destination`, `header name …`).
        what: String,
        /// Its length.
        len: usize,
    },
    /// The channel's connection was replaced (after it died, or was abandoned) while records
    /// of this table were still in flight on it: later records wait for the relay to re-send
    /// those first.
    #[error("the shared connection was replaced while records were in flight on it")]
    Replaced,
    /// Confirm mode was off (never expected: the sink turns it on before publishing).
    #[error("the channel is not in confirm mode")]
    NotConfirmed,
}

/// The AMQP reply code of a protocol error the broker sent, if it is one.
fn reply(error: &lapin::Error) -> Option<(&AMQPErrorKind, &str)> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some((e.kind(), e.get_message().as_str())),
        _ => None,
    }
}

/// Whether the broker closed the channel because a message body was above its
/// `max_message_size` (RabbitMQ: `PRECONDITION_FAILED - message size N is larger than
/// configured max size M`).
fn is_broker_too_large(error: &RabbitError) -> bool {
    match error {
        RabbitError::Client(e) => {
            matches!(
                reply(e),
                Some((AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE), _))
            ) || matches!(
                reply(e),
                Some((AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED), text))
                    if text.contains("message size")
            )
        }
        _ => false,
    }
}

/// Classifies a sink error: see the [module docs](self) and [`ErrorClass`].
pub fn classify(error: &RabbitError) -> ErrorClass {
    match error {
        RabbitError::TooLarge { .. } | RabbitError::TooLong { .. } => ErrorClass::Record,
        RabbitError::Returned { .. } => ErrorClass::Stop(NO_ROUTE_FIX),
        RabbitError::Nack
        | RabbitError::TimedOut
        | RabbitError::Connect(_)
        | RabbitError::Replaced
        | RabbitError::NotConfirmed => ErrorClass::Retry,
        e if is_broker_too_large(e) => ErrorClass::Record,
        RabbitError::Client(e) => classify_client(e),
    }
}

fn classify_client(error: &lapin::Error) -> ErrorClass {
    use lapin::ErrorKind as K;
    if let Some((kind, text)) = reply(error) {
        return match kind {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                if text.contains("Login was refused") =>
            {
                ErrorClass::Stop(
                    "fix the user and password in rabbitmq.url (OUTBOX_RABBITMQ__URL), then restart the relay",
                )
            }
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => ErrorClass::Stop(
                "declare the exchange (durable, type topic) or set rabbitmq.declare_exchange = true (outbox-relay topics ensure --sink rabbitmq), then restart the relay",
            ),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => ErrorClass::Stop(
                "grant the relay's RabbitMQ user configure (to declare the exchange) and write permissions on the exchange in its vhost (rabbitmqctl set_permissions), then restart the relay",
            ),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => ErrorClass::Stop(
                "the exchange exists with other properties than the relay declares (durable, type topic): delete it, or set rabbitmq.declare_exchange = false to use it as it is; then restart the relay",
            ),
            AMQPErrorKind::Soft(AMQPSoftError::NOROUTE) => ErrorClass::Stop(NO_ROUTE_FIX),
            AMQPErrorKind::Hard(
                AMQPHardError::CONNECTIONFORCED
                | AMQPHardError::INTERNALERROR
                | AMQPHardError::RESOURCEERROR
                | AMQPHardError::CHANNELERROR,
            )
            | AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED | AMQPSoftError::NOCONSUMERS) => {
                ErrorClass::Retry
            }
            _ => ErrorClass::Unlisted,
        };
    }
    match error.kind() {
        K::IOError(_)
        | K::InvalidChannel(_)
        | K::InvalidChannelState(..)
        | K::InvalidConnectionState(_)
        | K::MissingHeartbeatError
        | K::ChannelsLimitReached
        | K::RuntimeShutdownError(_) => ErrorClass::Retry,
        K::SerialisationError(_) => ErrorClass::Record,
        K::AuthProviderError(_) => {
            ErrorClass::Stop("fix the credentials in rabbitmq.url, then restart the relay")
        }
        _ => ErrorClass::Unlisted,
    }
}

/// A stable name for an error: the AMQP reply name (`NOT_FOUND`, `NO_ROUTE`, …) or the sink's
/// own (`NACK`, `TIMED_OUT`, `MESSAGE_TOO_LARGE`, `IO_ERROR`, …).
pub fn error_name(error: &RabbitError) -> String {
    match error {
        RabbitError::Nack => "NACK".into(),
        RabbitError::Returned { .. } => "NO_ROUTE".into(),
        RabbitError::TimedOut => "TIMED_OUT".into(),
        RabbitError::Connect(_) => "CONNECT".into(),
        RabbitError::TooLarge { .. } => "MESSAGE_TOO_LARGE".into(),
        RabbitError::TooLong { .. } => "NAME_TOO_LONG".into(),
        RabbitError::NotConfirmed => "NOT_CONFIRMED".into(),
        RabbitError::Replaced => "CONNECTION_REPLACED".into(),
        RabbitError::Client(e) => match (reply(e), e.kind()) {
            (Some((kind, _)), _) => reply_name(kind).into(),
            (None, lapin::ErrorKind::IOError(_)) => "IO_ERROR".into(),
            (None, lapin::ErrorKind::MissingHeartbeatError) => "MISSED_HEARTBEAT".into(),
            (None, lapin::ErrorKind::InvalidChannelState(..)) => "CHANNEL_CLOSED".into(),
            (None, lapin::ErrorKind::InvalidConnectionState(_)) => "CONNECTION_CLOSED".into(),
            (None, lapin::ErrorKind::SerialisationError(_)) => "SERIALISATION".into(),
            (None, _) => "_OTHER".into(),
        },
    }
}

/// The AMQP name of a reply code, as RabbitMQ spells it in its reply texts.
fn reply_name(kind: &AMQPErrorKind) -> &'static str {
    use AMQPHardError as H;
    use AMQPSoftError as S;
    match kind {
        AMQPErrorKind::Soft(S::CONTENTTOOLARGE) => "CONTENT_TOO_LARGE",
        AMQPErrorKind::Soft(S::NOROUTE) => "NO_ROUTE",
        AMQPErrorKind::Soft(S::NOCONSUMERS) => "NO_CONSUMERS",
        AMQPErrorKind::Soft(S::ACCESSREFUSED) => "ACCESS_REFUSED",
        AMQPErrorKind::Soft(S::NOTFOUND) => "NOT_FOUND",
        AMQPErrorKind::Soft(S::RESOURCELOCKED) => "RESOURCE_LOCKED",
        AMQPErrorKind::Soft(S::PRECONDITIONFAILED) => "PRECONDITION_FAILED",
        AMQPErrorKind::Hard(H::CONNECTIONFORCED) => "CONNECTION_FORCED",
        AMQPErrorKind::Hard(H::INVALIDPATH) => "INVALID_PATH",
        AMQPErrorKind::Hard(H::FRAMEERROR) => "FRAME_ERROR",
        AMQPErrorKind::Hard(H::SYNTAXERROR) => "SYNTAX_ERROR",
        AMQPErrorKind::Hard(H::COMMANDINVALID) => "COMMAND_INVALID",
        AMQPErrorKind::Hard(H::CHANNELERROR) => "CHANNEL_ERROR",
        AMQPErrorKind::Hard(H::UNEXPECTEDFRAME) => "UNEXPECTED_FRAME",
        AMQPErrorKind::Hard(H::RESOURCEERROR) => "RESOURCE_ERROR",
        AMQPErrorKind::Hard(H::NOTALLOWED) => "NOT_ALLOWED",
        AMQPErrorKind::Hard(H::NOTIMPLEMENTED) => "NOT_IMPLEMENTED",
        AMQPErrorKind::Hard(H::INTERNALERROR) => "INTERNAL_ERROR",
    }
}

impl DeliveryError for RabbitError {
    fn kind(&self) -> String {
        error_name(self)
    }
}

/// The broker-neutral form of an error: its class, its name and its description.
pub fn fault(error: &RabbitError) -> DeliveryFault {
    DeliveryFault {
        class: classify(error),
        name: error_name(error),
        detail: error.to_string(),
    }
}

/// What became of one record published to RabbitMQ, with the client's error.
pub type Outcome = crate::sink::Outcome<RabbitError>;

/// The AMQP form of a record: routing key, properties (headers included) and body. Refused
/// (with the error) when it cannot be published as it is.
pub fn message(
    record: &OutboundRecord,
    max_message_size: usize,
) -> Result<(ShortString, BasicProperties), RabbitError> {
    let body = record.payload.as_ref().map_or(0, Vec::len);
    if body > max_message_size {
        return Err(RabbitError::TooLarge {
            size: body,
            max: max_message_size,
        });
    }
    let routing_key =
        ShortString::try_new(record.topic.as_str()).map_err(|_| RabbitError::TooLong {
            what: "the destination (routing key)".into(),
            len: record.topic.len(),
        })?;
    let mut headers = FieldTable::default();
    let header = |name: &str| {
        record
            .headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .and_then(|v| ShortString::try_new(v).ok())
    };
    for (name, value) in &record.headers {
        let key = ShortString::try_new(name.as_str()).map_err(|_| RabbitError::TooLong {
            what: format!(
                "header name `{}…`",
                name.chars().take(32).collect::<String>()
            ),
            len: name.len(),
        })?;
        headers.insert(key, AMQPValue::LongString(LongString::from(value.clone())));
    }
    if let Some(p) = crate::faults::provenance() {
        headers.insert(
            crate::faults::PROVENANCE_HEADER.into(),
            AMQPValue::LongString(LongString::from(p.into_bytes())),
        );
    }
    headers.insert(
        KEY_HEADER.into(),
        AMQPValue::LongString(LongString::from(record.key.as_bytes())),
    );
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_app_id("outbox-relay".into())
        .with_content_type(header("content-type").unwrap_or_else(|| "application/json".into()))
        .with_headers(headers);
    if let Some(id) = header("id") {
        properties = properties.with_message_id(id);
    }
    if let Some(t) = header("eventType") {
        properties = properties.with_type(t);
    }
    if let Some(ms) = record.timestamp_ms.and_then(|ms| u64::try_from(ms).ok()) {
        properties = properties.with_timestamp(ms / 1000);
    }
    Ok((routing_key, properties))
}

/// The name the relay's AMQP connections carry (`connection_name` client property):
/// `outbox-relay-<pid>`.
pub fn connection_name() -> String {
    format!("outbox-relay-{}", std::process::id())
}

/// One table's channel in confirm mode on a generation of the shared connection.
struct Link {
    /// The generation of [`RabbitmqConnection`] the channel belongs to.
    generation: u64,
    connection: Arc<Connection>,
    channel: Channel,
    /// Publishes on this channel so far (the last delivery tag).
    published: Arc<std::sync::atomic::AtomicU64>,
}

impl Link {
    /// Whether the channel and its connection are both open (as far as the client knows).
    fn open(&self) -> bool {
        self.channel.status().connected() && self.connection.status().connected()
    }
}

/// The AMQP connection the tables of one relay publish on (see [`crate::sink::shared`]), each
/// on a confirm channel of its own: opened by the first table that needs it, and replaced only
/// when it is dead (a channel-level error of one table closes that table's channel and leaves
/// the others alone). A single-table relay has one of its own, so the failure path is the same
/// code whatever the number of tables.
pub struct RabbitmqConnection {
    settings: RabbitmqSettings,
    connection: SharedConnection<Arc<Connection>>,
}

impl RabbitmqConnection {
    /// A connection for tables publishing with `settings` (nothing connects yet); fails for
    /// settings the relay cannot use.
    pub fn new(settings: RabbitmqSettings) -> Result<Arc<Self>, SinkError> {
        settings.validate().map_err(|e| SinkError::Config {
            broker: RABBITMQ,
            key: e.key,
            reason: e.reason,
        })?;
        Ok(Arc::new(Self {
            settings,
            connection: SharedConnection::default(),
        }))
    }

    /// A sink for one table, publishing on its own channel of this connection.
    pub fn sink(self: &Arc<Self>) -> RabbitmqSink {
        RabbitmqSink {
            settings: self.settings.clone(),
            shared: self.clone(),
            link: tokio::sync::Mutex::new(None),
            in_flight: Arc::new(AtomicUsize::new(0)),
            failed: std::sync::Mutex::new(None),
        }
    }

    /// Where the sink connects, without credentials.
    fn servers(&self) -> String {
        redact_url(self.settings.url.expose())
    }

    /// The current connection, or a new one when there is none or the current one is dead
    /// (it is then retired first). Bounded by the connect timeout.
    async fn current(&self) -> Result<Generation<Arc<Connection>>, RabbitError> {
        self.connection
            .get_or_open(
                |c: &Arc<Connection>| !c.status().connected(),
                || async { open_connection(&self.settings).await.map(Arc::new) },
            )
            .await
    }

    /// Whether generation `number` is still the connection tables are given.
    fn is_current(&self, number: u64) -> bool {
        self.connection
            .current()
            .is_some_and(|g| g.number == number)
    }

    /// Retires generation `number` if it is still the current one; a connection retired while
    /// still open is closed (in the background, bounded by the connect timeout), so nothing
    /// more goes out on it and every table with a channel on it moves to the next one.
    fn retire(&self, number: u64) {
        if let Some(old) = self.connection.retire(number)
            && old.status().connected()
        {
            let wait = self.settings.connect_timeout;
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(wait, old.close(200, "outbox-relay retires".into())).await;
            });
        }
    }

    /// A new confirm channel for one table on the current connection (opening or replacing
    /// the connection when needed), the exchange declared if configured; within the connect
    /// timeout.
    async fn channel(&self) -> Result<Link, RabbitError> {
        let settings = &self.settings;
        let generation = self.current().await?;
        let attempt = async {
            let channel = generation
                .connection
                .create_channel()
                .await
                .map_err(RabbitError::Client)?;
            if settings.declare_exchange && !settings.exchange.is_empty() {
                channel
                    .exchange_declare(
                        settings.exchange.as_str().into(),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(RabbitError::Client)?;
            }
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(RabbitError::Client)?;
            Ok(channel)
        };
        let channel = match tokio::time::timeout(settings.connect_timeout, attempt).await {
            Ok(result) => result?,
            Err(_) => return Err(no_answer(settings)),
        };
        Ok(Link {
            generation: generation.number,
            connection: generation.connection,
            channel,
            published: Arc::default(),
        })
    }

    /// A round trip on the current connection (a channel opened and closed), for the idle
    /// probe of every table sharing it.
    async fn probe(&self) -> Result<(), RabbitError> {
        let generation = self.current().await?;
        let channel = generation
            .connection
            .create_channel()
            .await
            .map_err(RabbitError::Client)?;
        channel
            .close(200, "probe".into())
            .await
            .map_err(RabbitError::Client)
    }
}

/// The error of an attempt that outlived `rabbitmq.connect_timeout`.
fn no_answer(settings: &RabbitmqSettings) -> RabbitError {
    RabbitError::Connect(format!(
        "no answer within rabbitmq.connect_timeout ({})",
        crate::config::duration::format(&settings.connect_timeout)
    ))
}

/// Opens a connection named [`connection_name`] within the connect timeout.
async fn open_connection(settings: &RabbitmqSettings) -> Result<Connection, RabbitError> {
    let attempt = async {
        let properties =
            lapin::ConnectionProperties::default().with_connection_name(connection_name().into());
        if settings.tls() {
            let cert_chain = match &settings.ca_path {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| RabbitError::Connect(format!("{}: {e}", path.display())))?,
                ),
                None => None,
            };
            let tls = lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain,
            };
            let runtime = lapin::runtime::default_runtime().map_err(RabbitError::Client)?;
            Connection::connect_with_config(settings.url.expose(), properties, tls, runtime).await
        } else {
            Connection::connect(settings.url.expose(), properties).await
        }
        .map_err(RabbitError::Client)
    };
    match tokio::time::timeout(settings.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(no_answer(settings)),
    }
}

/// The RabbitMQ sink of one table: its own confirm channel on the relay's shared
/// [`RabbitmqConnection`]. See the [module docs](self).
pub struct RabbitmqSink {
    settings: RabbitmqSettings,
    shared: Arc<RabbitmqConnection>,
    link: tokio::sync::Mutex<Option<Link>>,
    in_flight: Arc<AtomicUsize>,
    /// The failure a batch was refused with at enqueue time, until [`Sink::recreate`]: while
    /// the relay has not handled it, no later record may go out (over a new channel, it
    /// would overtake the failed ones the relay sends again).
    failed: std::sync::Mutex<Option<RabbitError>>,
}

/// Counts a published record as in flight until its outcome is known (or it is dropped).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Slot {
    Sent {
        confirm: PublisherConfirm,
        tag: u64,
        size: usize,
        _guard: InFlight,
    },
    Done(Outcome),
}

/// A batch published on the channel whose confirms are not all in yet.
pub struct Pending {
    slots: Vec<Slot>,
    deadline: tokio::time::Instant,
}

impl RabbitmqSink {
    /// A sink with a connection of its own (a single-table relay); checks the settings, no
    /// connection is made yet (see [`Sink::check_connection`]).
    pub fn new(settings: RabbitmqSettings) -> Result<Self, SinkError> {
        Ok(RabbitmqConnection::new(settings)?.sink())
    }

    /// Where the sink connects, without credentials.
    fn servers(&self) -> String {
        self.shared.servers()
    }

    /// Closes this table's channel in order: waits up to `wait` for its outstanding confirms,
    /// then closes the channel (RabbitMQ answers once the channel handled everything published
    /// on it) within the rest of `wait`. Returns whether everything was answered: a channel the
    /// broker or a dead connection closed already counts as answered, since the broker closes a
    /// channel only after what was published on it before. Every await is bounded by `wait`.
    async fn close(link: &Link, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let confirmed = tokio::time::timeout_at(deadline, link.channel.wait_for_confirms())
            .await
            .is_ok();
        let closed = tokio::time::timeout_at(
            deadline,
            link.channel.close(200, "outbox-relay closes".into()),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        confirmed && (closed || !link.open())
    }

    /// Closes this table's channel in order ([`RabbitmqSink::close`]); the connection is
    /// retired when it is dead, or when the channel's close was not answered in time (the old
    /// connection is then abandoned, see "Residual risk" in the [module docs](self)). Returns
    /// whether everything was answered.
    async fn close_link(&self, link: Link, wait: Duration) -> bool {
        let answered = Self::close(&link, wait).await;
        if !link.connection.status().connected() {
            self.shared.retire(link.generation);
        } else if !answered {
            tracing::warn!(
                servers = %self.servers(),
                "the old RabbitMQ channel did not close in time: its connection is abandoned"
            );
            self.shared.retire(link.generation);
        }
        answered
    }

    /// Records published and not yet answered (or dropped).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Publishes `records` in order on the channel without waiting for the confirms. See
    /// [`Sink::enqueue`].
    pub async fn enqueue(&self, records: &[OutboundRecord]) -> Pending {
        let deadline = tokio::time::Instant::now() + self.settings.delivery_timeout;
        let mut slots: Vec<Slot> = Vec::with_capacity(records.len());
        let mut poisoned: Vec<(&str, &str, usize)> = Vec::new();
        let mut stopped: Option<RabbitError> = self.failed.lock().ok().and_then(|f| f.clone());
        let mut guard = self.link.lock().await;
        for (i, r) in records.iter().enumerate() {
            if let Some(error) = &stopped {
                slots.push(Slot::Done(Outcome::Failed(error.clone())));
                continue;
            }
            if let Some(&(_, _, behind)) = poisoned
                .iter()
                .filter(|_| !crate::faults::mutant("park_without_blocking"))
                .find(|(t, k, _)| *t == r.topic && *k == r.key)
            {
                slots.push(Slot::Done(Outcome::Held { behind }));
                continue;
            }
            let (routing_key, properties) = match message(r, self.settings.max_message_size) {
                Ok(m) => m,
                Err(error) => {
                    poisoned.push((&r.topic, &r.key, i));
                    slots.push(Slot::Done(Outcome::Rejected(error)));
                    continue;
                }
            };
            // A channel that is closed, or whose connection is dead or was replaced, while
            // nothing of it is in flight (after a record it refused was sent alone, or another
            // table replaced the dead connection) is replaced at once: no earlier record can
            // follow the new channel's. With records in flight, or records that failed at
            // enqueue time (`stopped`, kept until the relay recreates the sink), it is not:
            // the records fail, and the relay recreates the sink first.
            if guard
                .as_ref()
                .is_some_and(|l| !l.open() || !self.shared.is_current(l.generation))
            {
                if self.in_flight() == 0 {
                    *guard = None;
                } else {
                    let error = match guard.as_ref() {
                        Some(l) if l.open() => RabbitError::Replaced,
                        _ => RabbitError::Client(
                            lapin::ErrorKind::InvalidConnectionState(
                                lapin::ConnectionState::Closed,
                            )
                            .into(),
                        ),
                    };
                    slots.push(Slot::Done(Outcome::Failed(error.clone())));
                    stopped = Some(error);
                    continue;
                }
            }
            if guard.is_none() {
                match self.shared.channel().await {
                    Ok(link) => *guard = Some(link),
                    Err(error) => {
                        tracing::warn!(servers = %self.servers(), %error, "cannot open a RabbitMQ channel");
                        slots.push(Slot::Done(Outcome::Failed(error.clone())));
                        stopped = Some(error);
                        continue;
                    }
                }
            }
            let Some(link) = guard.as_ref() else {
                continue;
            };
            let body = r.payload.as_deref().unwrap_or_default();
            // Bounded: on a connection the client has not yet found dead, handing the frames
            // to its I/O loop may never complete.
            let published = tokio::time::timeout_at(
                deadline,
                link.channel.basic_publish(
                    self.settings.exchange.as_str().into(),
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    properties,
                ),
            )
            .await
            .map_or(Err(RabbitError::TimedOut), |r| {
                r.map_err(RabbitError::Client)
            });
            match published {
                Ok(confirm) => {
                    let tag = link.published.fetch_add(1, Ordering::Relaxed) + 1;
                    slots.push(Slot::Sent {
                        confirm,
                        tag,
                        size: body.len(),
                        _guard: InFlight::new(&self.in_flight),
                    });
                }
                Err(error) => {
                    if classify(&error) == ErrorClass::Record {
                        poisoned.push((&r.topic, &r.key, i));
                        slots.push(Slot::Done(Outcome::Rejected(error)));
                    } else {
                        slots.push(Slot::Done(Outcome::Failed(error.clone())));
                        stopped = Some(error);
                    }
                }
            }
        }
        if let (Some(error), Ok(mut failed)) = (stopped, self.failed.lock()) {
            failed.get_or_insert(error);
        }
        Pending { slots, deadline }
    }
}

impl Pending {
    /// Waits for every confirm (until the batch's deadline); one outcome per record, in order.
    pub async fn wait(self) -> Vec<Outcome> {
        let Pending { slots, deadline } = self;
        let mut out: Vec<Outcome> = Vec::with_capacity(slots.len());
        let mut sizes: Vec<Option<usize>> = Vec::with_capacity(slots.len());
        for slot in slots {
            match slot {
                Slot::Done(o) => {
                    out.push(o);
                    sizes.push(None);
                }
                Slot::Sent {
                    confirm,
                    tag,
                    size,
                    _guard,
                } => {
                    let outcome = match tokio::time::timeout_at(deadline, confirm).await {
                        Err(_) => Outcome::Failed(RabbitError::TimedOut),
                        Ok(Ok(Confirmation::Ack(None))) => Outcome::Delivered(Delivered {
                            partition: 0,
                            offset: i64::try_from(tag).unwrap_or(i64::MAX),
                        }),
                        Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                            Outcome::Failed(RabbitError::Returned {
                                code: returned.reply_code,
                                text: returned.reply_text.to_string(),
                            })
                        }
                        Ok(Ok(Confirmation::Nack(_))) => Outcome::Failed(RabbitError::Nack),
                        Ok(Ok(Confirmation::NotRequested)) => {
                            Outcome::Failed(RabbitError::NotConfirmed)
                        }
                        Ok(Err(error)) => Outcome::Failed(RabbitError::Client(error)),
                    };
                    out.push(outcome);
                    sizes.push(Some(size));
                }
            }
        }
        mark_suspects(&mut out, &sizes);
        out
    }
}

/// After the broker closed the channel for a body above its `max_message_size`, every
/// unconfirmed record of the channel fails with that error, though only one is at fault: the
/// first one above the broker's limit. The records before it are within the limit, so it is
/// at or before the first of the largest failed records: the failed records up to that one
/// become [`Outcome::Suspect`] (the relay sends them one at a time and parks the one that fails
/// alone); the later ones stay [`Outcome::Failed`], to be re-sent normally.
fn mark_suspects(out: &mut [Outcome], sizes: &[Option<usize>]) {
    let too_large = |o: &Outcome| matches!(o, Outcome::Failed(e) if is_broker_too_large(e));
    let mut largest: Option<(usize, usize)> = None;
    for (i, o) in out.iter().enumerate() {
        if let (true, Some(size)) = (too_large(o), sizes[i])
            && largest.is_none_or(|(_, s)| size > s)
        {
            largest = Some((i, size));
        }
    }
    let Some((last, _)) = largest else { return };
    for o in out.iter_mut().take(last + 1) {
        if too_large(o)
            && let Outcome::Failed(e) = o
        {
            *o = Outcome::Suspect(e.clone());
        }
    }
}

#[async_trait::async_trait]
impl PendingBatch for Pending {
    fn rejected_now(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Done(Outcome::Rejected(_))))
            .map(|(i, _)| i)
            .collect()
    }

    fn accepted(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Sent { .. }))
            .map(|(i, _)| i)
            .collect()
    }

    async fn wait(self: Box<Self>) -> Vec<crate::sink::Outcome> {
        Pending::wait(*self)
            .await
            .into_iter()
            .map(|o| o.map_err(|e| fault(&e)))
            .collect()
    }
}

#[async_trait::async_trait]
impl Sink for RabbitmqSink {
    fn kind(&self) -> SinkKind {
        SinkKind::Rabbitmq
    }

    async fn check_connection(&self) -> Result<(), SinkError> {
        let mut guard = self.link.lock().await;
        if guard
            .as_ref()
            .is_some_and(|l| l.open() && self.shared.is_current(l.generation))
        {
            return Ok(());
        }
        match self.shared.channel().await {
            Ok(link) => {
                *guard = Some(link);
                Ok(())
            }
            Err(error) => match classify(&error) {
                ErrorClass::Stop(fix) => Err(SinkError::refused(
                    RABBITMQ,
                    &self.settings.exchange,
                    &fault(&error),
                    fix,
                )),
                _ => Err(SinkError::Unreachable {
                    broker: RABBITMQ,
                    servers: self.servers(),
                    detail: error.to_string(),
                }),
            },
        }
    }

    async fn enqueue(&self, records: &[OutboundRecord]) -> Box<dyn PendingBatch> {
        Box::new(RabbitmqSink::enqueue(self, records).await)
    }

    fn in_flight(&self) -> usize {
        RabbitmqSink::in_flight(self)
    }

    fn delivery_timeout(&self) -> Duration {
        self.settings.delivery_timeout
    }

    /// Closes this table's channel in order (its outstanding confirms awaited, then the
    /// close answered, all within the delivery timeout and at most 5 s); the connection is
    /// replaced only when it is dead or that close went unanswered. The next enqueue opens a
    /// new channel; a broker out of reach then fails those records (and the relay backs off),
    /// rather than failing the relay here.
    async fn recreate(&mut self) -> Result<(), SinkError> {
        if let Ok(failed) = self.failed.get_mut() {
            *failed = None;
        }
        if let Some(link) = self.link.get_mut().take() {
            let wait = self.settings.delivery_timeout.min(Duration::from_secs(5));
            self.close_link(link, wait).await;
        }
        Ok(())
    }

    fn purge(&self) -> usize {
        let held = self.in_flight();
        if let Ok(mut guard) = self.link.try_lock() {
            // Dropping the channel closes it: nothing more of this table is published on it.
            guard.take();
        }
        held
    }

    async fn fence(&self, wait: Duration) -> Fenced {
        let held = self.in_flight();
        let link = self.link.lock().await.take();
        let answered = match link {
            Some(link) => self.close_link(link, wait).await,
            None => true,
        };
        Fenced {
            held,
            unanswered: if answered { 0 } else { self.in_flight() },
        }
    }

    fn watch(
        &self,
        stats: Arc<crate::stats::RelayStats>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, SinkError> {
        let probe = self.shared.clone();
        Ok(Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                }
                let answer = if published_within(&stats, PROBE_INTERVAL) {
                    Ok(())
                } else {
                    tokio::time::timeout(PROBE_TIMEOUT, probe.probe())
                        .await
                        .unwrap_or(Err(RabbitError::TimedOut))
                };
                record_probe(
                    &stats,
                    &probe.servers().to_string(),
                    answer,
                    "RabbitMQ does not answer: reporting not ready until it does",
                    "RabbitMQ answers again",
                );
            }
        })))
    }
}

/// `topics ensure --sink rabbitmq`: declares the exchange (durable, type `topic`, unless
/// `rabbitmq.declare_exchange` is off) and, for each destination, a durable queue named like it
/// and bound to the exchange with the destination as binding key, so that no record the relay
/// publishes there is unroutable. Existing queues with the same properties are left as they
/// are; returns one line per destination (`declared <queue> …` or `FAILED <queue>: …`) and
/// fails if any could not be declared.
pub async fn ensure_queues(
    settings: &RabbitmqSettings,
    destinations: &[String],
) -> Result<Vec<String>, SinkError> {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    let shared = RabbitmqConnection::new(settings.clone())?;
    let unreachable = |error: RabbitError| SinkError::Unreachable {
        broker: RABBITMQ,
        servers: shared.servers(),
        detail: error.to_string(),
    };
    // Opening the relay's channel declares the exchange as the relay does.
    let link = shared.channel().await.map_err(unreachable)?;
    let connection = link.connection.clone();
    let mut lines = Vec::with_capacity(destinations.len());
    let mut failed: Option<(String, RabbitError)> = None;
    for destination in destinations {
        // A failed declaration closes the channel: each queue gets a channel of its own.
        let declared = async {
            let channel = connection.create_channel().await?;
            channel
                .queue_declare(
                    destination.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            if !settings.exchange.is_empty() {
                channel
                    .queue_bind(
                        destination.as_str().into(),
                        settings.exchange.as_str().into(),
                        destination.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            let _ = channel.close(200, "declared".into()).await;
            Ok::<(), lapin::Error>(())
        }
        .await;
        match declared {
            Ok(()) if settings.exchange.is_empty() => {
                lines.push(format!("declared {destination} (default exchange)"))
            }
            Ok(()) => lines.push(format!(
                "declared {destination} bound to {} with routing key {destination}",
                settings.exchange
            )),
            Err(error) => {
                lines.push(format!("FAILED   {destination}: {error}"));
                failed.get_or_insert((destination.clone(), RabbitError::Client(error)));
            }
        }
    }
    let _ = tokio::time::timeout(
        settings.connect_timeout,
        connection.close(200, "outbox-relay closes".into()),
    )
    .await;
    match failed {
        None => Ok(lines),
        Some((destination, error)) => Err(SinkError::Refused {
            broker: RABBITMQ,
            destination,
            name: error_name(&error),
            detail: error.to_string(),
            fix: "check the relay user's configure permission, or delete the queue declared with other properties".into(),
        }),
    }
}

/// How often an idle relay checks that RabbitMQ accepts a connection.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long that check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn broker(kind: AMQPErrorKind, text: &str) -> RabbitError {
        RabbitError::Client(
            lapin::ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into(),
        )
    }

    fn record(topic: &str, payload: &str) -> OutboundRecord {
        OutboundRecord {
            topic: topic.into(),
            key: "order-7".into(),
            payload: Some(payload.into()),
            headers: vec![
                (
                    "id".into(),
                    b"0190a0a0-0000-7000-8000-000000000001".to_vec(),
                ),
                ("eventType".into(), b"OrderPlaced".to_vec()),
                ("schemaVersion".into(), b"2".to_vec()),
                ("traceparent".into(), b"00-abc-def-01".to_vec()),
            ],
            timestamp_ms: Some(1_700_000_000_123),
        }
    }

    #[test]
    fn one_place_decides_retry_park_or_stop() {
        use AMQPSoftError as S;
        assert_eq!(classify(&RabbitError::Nack), ErrorClass::Retry);
        assert_eq!(classify(&RabbitError::TimedOut), ErrorClass::Retry);
        assert_eq!(
            classify(&RabbitError::Connect("refused".into())),
            ErrorClass::Retry
        );
        assert_eq!(
            classify(&RabbitError::TooLarge { size: 9, max: 8 }),
            ErrorClass::Record
        );
        assert_eq!(
            classify(&broker(
                AMQPErrorKind::Soft(S::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - message size 2000000 is larger than configured max size 1048576"
            )),
            ErrorClass::Record
        );
        assert!(matches!(
            classify(&RabbitError::Returned {
                code: 312,
                text: "NO_ROUTE".into()
            }),
            ErrorClass::Stop(fix) if fix.contains("topics ensure --sink rabbitmq")
        ));
        assert!(matches!(
            classify(&broker(
                AMQPErrorKind::Soft(S::NOTFOUND),
                "NOT_FOUND - no exchange 'outbox' in vhost '/'"
            )),
            ErrorClass::Stop(_)
        ));
        assert!(matches!(
            classify(&broker(AMQPErrorKind::Soft(S::ACCESSREFUSED), "ACCESS_REFUSED - access to exchange 'outbox' in vhost '/' refused for user 'relay'")),
            ErrorClass::Stop(fix) if fix.contains("permissions")
        ));
        assert!(matches!(
            classify(&broker(AMQPErrorKind::Soft(S::ACCESSREFUSED), "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN.")),
            ErrorClass::Stop(fix) if fix.contains("rabbitmq.url")
        ));
        assert!(matches!(
            classify(&broker(
                AMQPErrorKind::Soft(S::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'outbox'"
            )),
            ErrorClass::Stop(_)
        ));
        assert_eq!(
            classify(&broker(
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
                "CONNECTION_FORCED - broker forced connection closure"
            )),
            ErrorClass::Retry
        );
        let io = RabbitError::Client(
            lapin::ErrorKind::IOError(Arc::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )))
            .into(),
        );
        assert_eq!(classify(&io), ErrorClass::Retry);
        assert_eq!(error_name(&io), "IO_ERROR");
        assert_eq!(
            classify(&RabbitError::Client(
                lapin::ErrorKind::MissingHeartbeatError.into()
            )),
            ErrorClass::Retry
        );
        assert_eq!(
            classify(&broker(
                AMQPErrorKind::Hard(AMQPHardError::NOTIMPLEMENTED),
                "NOT_IMPLEMENTED"
            )),
            ErrorClass::Unlisted
        );
        assert_eq!(
            error_name(&broker(AMQPErrorKind::Soft(S::NOTFOUND), "NOT_FOUND - x")),
            "NOT_FOUND"
        );
    }

    #[test]
    fn headers_and_properties_carry_the_record() {
        let r = record("outbox.event.order", r#"{"total":5}"#);
        let (routing_key, p) = message(&r, 1024).unwrap();
        assert_eq!(routing_key.as_str(), "outbox.event.order");
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some("0190a0a0-0000-7000-8000-000000000001")
        );
        assert_eq!(
            p.kind().as_ref().map(ShortString::as_str),
            Some("OrderPlaced")
        );
        assert_eq!(p.timestamp(), &Some(1_700_000_000));
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        let headers = p.headers().as_ref().unwrap().inner();
        let text = |name: &str| match headers.get(name) {
            Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(text("id"), "0190a0a0-0000-7000-8000-000000000001");
        assert_eq!(text("eventType"), "OrderPlaced");
        assert_eq!(text("schemaVersion"), "2");
        assert_eq!(text("traceparent"), "00-abc-def-01");
        assert_eq!(text(KEY_HEADER), "order-7");
    }

    #[test]
    fn records_amqp_cannot_carry_are_refused_before_sending() {
        let big = record("outbox.event.order", &"x".repeat(2048));
        assert!(matches!(
            message(&big, 1024),
            Err(RabbitError::TooLarge {
                size: 2048,
                max: 1024
            })
        ));
        let long = record(&"t".repeat(256), "{}");
        assert!(matches!(
            message(&long, 1024),
            Err(RabbitError::TooLong { len: 256, .. })
        ));
        let mut odd = record("outbox.event.order", "{}");
        odd.headers.push(("h".repeat(300), b"v".to_vec()));
        let e = message(&odd, 1024).unwrap_err();
        assert_eq!(classify(&e), ErrorClass::Record);
    }

    #[test]
    fn a_broker_size_refusal_makes_suspects_up_to_the_largest_record() {
        let too_large = || {
            Outcome::Failed(broker(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - message size 900 is larger than configured max size 500",
            ))
        };
        let mut out = vec![
            Outcome::Delivered(Delivered {
                partition: 0,
                offset: 1,
            }),
            too_large(),
            too_large(),
            too_large(),
        ];
        let sizes = [Some(10), Some(20), Some(900), Some(30)];
        mark_suspects(&mut out, &sizes);
        assert!(matches!(out[0], Outcome::Delivered(_)));
        assert!(matches!(out[1], Outcome::Suspect(_)));
        assert!(matches!(out[2], Outcome::Suspect(_)));
        assert!(matches!(out[3], Outcome::Failed(_)));
    }
}
