//! The NATS JetStream sink (`sink = "nats"`), on the official `async-nats` client.
//!
//! Why `async-nats`: it is the NATS maintainers' own Rust client (the `nats` crate it replaced is
//! deprecated), released in step with the server, with JetStream publish acknowledgements,
//! headers, TLS (rustls), tokens, user/password and `.creds` files.
//!
//! How an [`OutboundRecord`] maps onto NATS:
//! - destination → **subject**: the record's topic is published as is (the default
//!   `outbox.event.<aggregatetype>` is already a dotted subject). A destination that is not a
//!   legal subject to publish to (an empty token, whitespace, non-ASCII, a `*`/`>` wildcard) is
//!   refused for good ([`ErrorClass::Record`]: the event is parked with the reason).
//! - key (aggregate id) → header **`Outbox-Key`** (NATS messages have no key).
//! - every record header (`id`, `eventType`, `schemaVersion`, `traceparent`, CloudEvents
//!   `ce_*`, …) → a NATS header of the same name; a value that is not UTF-8 or holds a line
//!   break is refused for good.
//! - the event id (`id` header) → also **`Nats-Msg-Id`**, so the stream's duplicate window drops
//!   a re-sent event (after a failure or a restart) and acknowledges it as a duplicate.
//! - payload → message body (a null payload is an empty body).
//!
//! What it guarantees the relay:
//! - [`Outcome::Delivered`] only for a JetStream publish acknowledgement: the stream stored the
//!   message (on `file` storage, and on every replica the stream requires); `offset` is the
//!   stream sequence, `partition` is 0. An acknowledgement flagged `duplicate` (the stream had
//!   the event already) is Delivered too, with the original sequence.
//! - Order: a batch is published in order on one connection, which the server processes in
//!   order, so per subject (and so per aggregate) the stream stores the events in the order
//!   they were enqueued. Nothing is ever retried alone: the first record that fails makes it
//!   and every later sent record of its batch [`Outcome::Failed`]; the relay then
//!   [`Sink::recreate`]s the sink (a new connection) and re-sends from the first
//!   unacknowledged event, in order. Re-sent events the stream already holds are dropped by
//!   `Nats-Msg-Id` while they are within the duplicate window (2 minutes by default), so the
//!   duplicates a consumer sees are bounded and carry the same `id`.
//! - A connection is never resumed: the client does not reconnect by itself (its queued
//!   publishes would overtake those the lost connection dropped), a lost connection fails the
//!   batches in flight at once, and no new connection is opened before [`Sink::recreate`].
//! - Many tables, one connection: the tables of one relay publish on one connection
//!   ([`NatsConnection`], see [`crate::sink::shared`]); each keeps its own order, in-flight count
//!   and failure flag. A table whose publish fails replaces the connection when it is
//!   recreated — once, however many tables saw the failure — which fails the acknowledgements
//!   every other table awaits on it at once; each of them then re-sends from its first
//!   unacknowledged event on the new connection, as after a lost connection. A table with
//!   nothing in flight moves to the new connection without failing anything (all it sent was
//!   acknowledged, so nothing can be overtaken). The idle probes of a shared connection ask
//!   JetStream on it rather than on connections of their own. A single-table relay has a
//!   connection of its own of the same kind, so the failure path is the same code.
//! - Refusals known before sending (subject, headers, larger than the server's
//!   `max_payload` or the stream's `max_msg_size`) are [`Outcome::Rejected`] at enqueue time
//!   and the later records of the same subject and key are [`Outcome::Held`], never sent. A
//!   size refusal by the server itself is [`Outcome::Suspect`] (the relay sends it alone,
//!   then parks it).
//! - No stream captures the subject (JetStream answers "no responders"): the relay stops with
//!   the fix ([`NO_STREAM_FIX`]). A permissions violation on publish stops it too. Timeouts and
//!   lost connections are retried for as long as it takes.
//!
//! Residual risk, documented rather than hidden: if the server refuses one message with a
//! transient error while it stores the next one of the same subject (a storage failure in the
//! middle of a pipelined batch), the re-sent earlier event lands after the later one.
//! Single-server and healthy-cluster operation never does this; `Outbox-Key` plus the event
//! order in the payload let a consumer detect it.

use crate::sink::{published_within, record_probe};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{ConnectErrorKind, HeaderMap, HeaderName, HeaderValue};
use tokio_util::sync::CancellationToken;

use crate::config::NatsSettings;
use crate::config::nats::subject_problem;
use crate::route::OutboundRecord;
use crate::sink::shared::{Generation, SharedConnection};
use crate::sink::{
    Delivered, DeliveryFault, ErrorClass, Fenced, Outcome, PendingBatch, Sink, SinkError, SinkKind,
};

/// The broker's name in this sink's errors.
const NATS: &str = "NATS";

/// The header carrying the record key (the aggregate id).
pub const KEY_HEADER: &str = "Outbox-Key";
/// The header JetStream deduplicates on (set to the event id).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The operator's fix when no JetStream stream captures a destination subject.
pub const NO_STREAM_FIX: &str = "create a JetStream stream covering the subject (outbox-relay topics ensure --sink nats), then restart the relay";
const CREDENTIALS_FIX: &str = "fix the relay's NATS credentials (nats.credentials_path, nats.token, nats.user/nats.password or the URL), then restart the relay";
const PERMISSIONS_FIX: &str = "allow the relay's NATS user to publish to the subject (and to $JS.API.> for stream lookups), then restart the relay";
const JETSTREAM_FIX: &str =
    "enable JetStream on the NATS server (and for the relay's account), then restart the relay";

/// Why a NATS publish did not get a stored acknowledgement, before classification
/// ([`classify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made (or it was lost before the record was sent).
    Connect(String),
    /// The server refused the relay's credentials.
    Auth(String),
    /// The server refused the publish (or a stream lookup) for lack of permission.
    Permissions(String),
    /// JetStream is not enabled on the server or for the account.
    JetStreamDisabled(String),
    /// No stream captures the subject.
    NoStream,
    /// The destination is not a subject one can publish to.
    InvalidSubject(String),
    /// A header name or value NATS cannot carry.
    InvalidHeader(String),
    /// The message is larger than the server's `max_payload` or the stream's `max_msg_size`.
    TooLarge(String),
    /// The stream refused it for its size after it was sent.
    StreamTooLarge(String),
    /// No acknowledgement within the delivery timeout.
    TimedOut,
    /// The connection broke while the acknowledgement was awaited.
    Disconnected,
    /// Another JetStream API error (its code and description).
    Api {
        /// The JetStream error code (`err_code`).
        code: u64,
        /// Its description.
        description: String,
    },
    /// Anything else the client reported.
    Other(String),
}

/// What the relay does about a [`Failure`]. See [`ErrorClass`].
pub fn classify(failure: &Failure) -> ErrorClass {
    match failure {
        Failure::Connect(_) | Failure::TimedOut | Failure::Disconnected => ErrorClass::Retry,
        Failure::Auth(_) => ErrorClass::Stop(CREDENTIALS_FIX),
        Failure::Permissions(_) => ErrorClass::Stop(PERMISSIONS_FIX),
        Failure::JetStreamDisabled(_) => ErrorClass::Stop(JETSTREAM_FIX),
        Failure::NoStream => ErrorClass::Stop(NO_STREAM_FIX),
        Failure::InvalidSubject(_)
        | Failure::InvalidHeader(_)
        | Failure::TooLarge(_)
        | Failure::StreamTooLarge(_) => ErrorClass::Record,
        Failure::Api { code, .. } => match *code {
            10054 => ErrorClass::Record,
            10059 => ErrorClass::Stop(NO_STREAM_FIX),
            10039 | 10076 => ErrorClass::Stop(JETSTREAM_FIX),
            // Stream or account limits reached (a full stream with `discard: new`, storage
            // exhausted): retried while it may clear, then a loud stop if it persists.
            10002 | 10023 | 10028 | 10047 | 10077 => ErrorClass::Unlisted,
            // Cluster hiccups: no quorum, leader moving.
            10008 | 10074 | 10075 => ErrorClass::Retry,
            _ => ErrorClass::Unlisted,
        },
        Failure::Other(_) => ErrorClass::Unlisted,
    }
}

/// The broker-neutral form of a failure: its class, a stable name and a description.
pub fn fault(failure: &Failure) -> DeliveryFault {
    let (name, detail) = match failure {
        Failure::Connect(d) => ("CONNECT", d.clone()),
        Failure::Auth(d) => ("AUTHORIZATION_VIOLATION", d.clone()),
        Failure::Permissions(d) => ("PERMISSIONS_VIOLATION", d.clone()),
        Failure::JetStreamDisabled(d) => ("JETSTREAM_NOT_ENABLED", d.clone()),
        Failure::NoStream => (
            "NO_STREAM",
            "no JetStream stream captures the subject (no responders)".to_owned(),
        ),
        Failure::InvalidSubject(d) => ("INVALID_SUBJECT", d.clone()),
        Failure::InvalidHeader(d) => ("INVALID_HEADER", d.clone()),
        Failure::TooLarge(d) => ("MAX_PAYLOAD_EXCEEDED", d.clone()),
        Failure::StreamTooLarge(d) => ("STREAM_MESSAGE_EXCEEDS_MAXIMUM", d.clone()),
        Failure::TimedOut => (
            "TIMED_OUT",
            "no acknowledgement from the stream within nats.delivery_timeout".to_owned(),
        ),
        Failure::Disconnected => (
            "DISCONNECTED",
            "the connection to the NATS server was lost before the stream acknowledged".to_owned(),
        ),
        Failure::Api { code, description } => {
            return DeliveryFault {
                class: classify(failure),
                name: format!("JS_{code}"),
                detail: description.clone(),
            };
        }
        Failure::Other(d) => ("_OTHER", d.clone()),
    };
    DeliveryFault {
        class: classify(failure),
        name: name.to_owned(),
        detail,
    }
}

/// The [`Failure`] of a JetStream publish error; `server_error` is the last error the server
/// sent on the connection (a permissions violation arrives that way, and the publish itself
/// only times out).
pub fn publish_failure(
    error: &jetstream::context::PublishError,
    server_error: Option<&str>,
) -> Failure {
    let permission = server_error
        .filter(|e| e.to_ascii_lowercase().contains("permissions violation"))
        .map(str::to_owned);
    match error.kind() {
        PublishErrorKind::StreamNotFound => Failure::NoStream,
        PublishErrorKind::MaxPayloadExceeded => Failure::TooLarge(error.to_string()),
        PublishErrorKind::TimedOut => permission.map_or(Failure::TimedOut, Failure::Permissions),
        PublishErrorKind::BrokenPipe => Failure::Disconnected,
        _ => {
            let api =
                std::error::Error::source(error).and_then(|s| s.downcast_ref::<jetstream::Error>());
            match api {
                Some(api) if api.error_code().0 == 10054 => {
                    Failure::StreamTooLarge(api.to_string())
                }
                Some(api) => Failure::Api {
                    code: api.error_code().0,
                    description: api.to_string(),
                },
                None => Failure::Other(error.to_string()),
            }
        }
    }
}

/// The [`Failure`] of a connection attempt.
pub fn connect_failure(error: &async_nats::ConnectError) -> Failure {
    match error.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            Failure::Auth(error.to_string())
        }
        _ => Failure::Connect(error.to_string()),
    }
}

/// The NATS headers of a record: every record header under its own name, `Outbox-Key` = the
/// key, `Nats-Msg-Id` = the `id` header (the event id), plus `extra` (name, value) pairs.
/// A name or value NATS cannot carry is a [`Failure::InvalidHeader`].
pub fn headers_of(record: &OutboundRecord, extra: &[(&str, &str)]) -> Result<HeaderMap, Failure> {
    let mut headers = HeaderMap::new();
    let mut add = |name: &str, value: &[u8]| -> Result<(), Failure> {
        let text = std::str::from_utf8(value).map_err(|_| {
            Failure::InvalidHeader(format!("header `{name}`: the value is not UTF-8"))
        })?;
        let name_ok: HeaderName = name
            .parse()
            .map_err(|e| Failure::InvalidHeader(format!("header name `{name}`: {e}")))?;
        let value_ok: HeaderValue = text
            .parse()
            .map_err(|e| Failure::InvalidHeader(format!("header `{name}`: {e}")))?;
        headers.append(name_ok, value_ok);
        Ok(())
    };
    for (name, value) in &record.headers {
        if name.eq_ignore_ascii_case(KEY_HEADER) || name.eq_ignore_ascii_case(MSG_ID_HEADER) {
            // The relay sets these itself.
            continue;
        }
        add(name, value)?;
    }
    add(KEY_HEADER, record.key.as_bytes())?;
    if let Some((_, id)) = record.headers.iter().find(|(n, _)| n == "id") {
        add(MSG_ID_HEADER, id)?;
    }
    for (name, value) in extra {
        add(name, value.as_bytes())?;
    }
    Ok(headers)
}

/// The bytes a message takes against `max_msg_size`: the header block as sent
/// (`NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`) plus the body.
fn message_size(headers: &HeaderMap, body: usize) -> usize {
    let block: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    10 + block + 2 + body
}

/// What the sink knows about the stream capturing a subject.
#[derive(Debug, Clone)]
struct StreamFacts {
    /// The stream's `max_msg_size`, when limited.
    max_message_size: Option<usize>,
}

/// One connection and what was learnt on it.
#[derive(Clone)]
struct Link {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Cancelled when the connection is lost: nothing more is sent on it, and the pending
    /// acknowledgements fail at once instead of at the deadline.
    lost: CancellationToken,
    streams: Arc<Mutex<HashMap<String, StreamFacts>>>,
}

/// The connection the tables of one relay publish on (see [`crate::sink::shared`]): opened by
/// the first table that publishes, replaced once when a table sees it fail, and the last error
/// the server reported on it.
pub struct NatsConnection {
    settings: NatsSettings,
    connection: SharedConnection<Link>,
    server_error: Arc<Mutex<Option<String>>>,
}

impl NatsConnection {
    /// A connection for tables publishing with `settings` (nothing connects yet).
    pub fn new(settings: NatsSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            connection: SharedConnection::default(),
            server_error: Arc::new(Mutex::new(None)),
        })
    }

    /// A sink for one table, publishing on this connection.
    pub fn sink(self: &Arc<Self>) -> Result<NatsSink, SinkError> {
        NatsSink::build(self.clone(), true)
    }

    /// The current connection, or a new one (replacing a lost one).
    async fn link(&self) -> Result<Generation<Link>, Failure> {
        self.connection
            .get_or_open(
                |l: &Link| l.lost.is_cancelled(),
                || open(&self.settings, Some(self.server_error.clone())),
            )
            .await
    }

    /// Drops generation `number` when it is still the current one and fails what is pending
    /// on it at once (every table using it re-sends in order on the next connection).
    fn retire(&self, number: u64) {
        if let Some(old) = self.connection.retire(number) {
            old.lost.cancel();
        }
    }
}

/// The NATS JetStream sink. See the [module docs](self).
pub struct NatsSink {
    settings: NatsSettings,
    connection: Arc<NatsConnection>,
    /// Whether other tables publish on [`NatsSink::connection`] too (then the idle probe uses it
    /// rather than a connection of its own).
    shared: bool,
    /// The generation of the connection this table publishes on, taken at its first publish
    /// after `new` or [`Sink::recreate`].
    generation: Mutex<Option<u64>>,
    /// Set once a record could not be sent or acknowledged (or the connection was lost, purged
    /// or fenced): nothing more is published until [`Sink::recreate`], so no later batch can
    /// reach the stream ahead of the records the relay is about to re-send.
    broken: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    server_error: Arc<Mutex<Option<String>>>,
}

impl NatsSink {
    /// Builds the sink (no connection is made yet; see [`Sink::check_connection`]). Fails for
    /// settings the relay cannot use.
    pub fn new(settings: NatsSettings) -> Result<Self, SinkError> {
        Self::build(NatsConnection::new(settings), false)
    }

    fn build(connection: Arc<NatsConnection>, shared: bool) -> Result<Self, SinkError> {
        let settings = connection.settings.clone();
        settings.validate().map_err(|e| SinkError::Config {
            broker: NATS,
            key: e.key,
            reason: e.reason,
        })?;
        Ok(Self {
            settings,
            server_error: connection.server_error.clone(),
            connection,
            shared,
            generation: Mutex::new(None),
            broken: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The connection to publish on: the one this table took, or the shared one when it has
    /// none (at start and after [`Sink::recreate`]). A lost connection is never replaced here
    /// while this table may have records on it: records published on a new connection while
    /// the relay has not yet re-sent what the lost one dropped would overtake them. A table
    /// with nothing in flight follows a replacement another table made at once (everything it
    /// sent before was acknowledged, so nothing can be overtaken).
    async fn connected(&self) -> Result<Link, Failure> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Failure::Disconnected);
        }
        let held = self.generation.lock().ok().and_then(|g| *g);
        if let Some(number) = held {
            match self.connection.connection.current() {
                Some(current) if current.number == number => {
                    if current.connection.lost.is_cancelled() {
                        self.broken.store(true, Ordering::Release);
                        return Err(Failure::Disconnected);
                    }
                    return Ok(current.connection);
                }
                _ if self.in_flight() > 0 => {
                    self.broken.store(true, Ordering::Release);
                    return Err(Failure::Disconnected);
                }
                _ => {}
            }
        }
        match self.connection.link().await {
            Ok(generation) => {
                if let Ok(mut held) = self.generation.lock() {
                    *held = Some(generation.number);
                }
                Ok(generation.connection)
            }
            Err(failure) => {
                self.broken.store(true, Ordering::Release);
                Err(failure)
            }
        }
    }

    /// Lets go of this table's connection; `retire` also replaces it (for every table).
    fn detach(&self, retire: bool) {
        let held = self.generation.lock().ok().and_then(|mut g| g.take());
        if let Some(number) = held
            && retire
        {
            self.connection.retire(number);
        }
    }

    fn server_error(&self) -> Option<String> {
        self.server_error.lock().ok().and_then(|e| e.clone())
    }

    /// What the stream capturing `subject` allows (looked up once per connection).
    async fn stream_for(&self, link: &Link, subject: &str) -> Result<StreamFacts, Failure> {
        if let Some(facts) = link
            .streams
            .lock()
            .ok()
            .and_then(|m| m.get(subject).cloned())
        {
            return Ok(facts);
        }
        use jetstream::context::GetStreamByNameErrorKind as K;
        let name = match self
            .bounded(link, link.js.stream_by_subject(subject))
            .await?
        {
            Ok(name) => name,
            Err(e) => {
                return Err(match e.kind() {
                    K::NotFound => Failure::NoStream,
                    K::InvalidSubject => {
                        Failure::InvalidSubject(format!("`{subject}` is not a NATS subject"))
                    }
                    K::JetStream(api) => api_failure(&api),
                    K::Request => {
                        let server = self.server_error();
                        match server.filter(|s| s.to_ascii_lowercase().contains("permissions")) {
                            Some(p) => Failure::Permissions(p),
                            None => Failure::Connect(format!("stream lookup failed: {e}")),
                        }
                    }
                });
            }
        };
        let stream = self
            .bounded(link, link.js.get_stream(&name))
            .await?
            .map_err(|e| Failure::Connect(format!("reading stream {name} failed: {e}")))?;
        let max = stream.cached_info().config.max_message_size;
        let facts = StreamFacts {
            max_message_size: usize::try_from(max).ok().filter(|m| *m > 0),
        };
        if let Ok(mut m) = link.streams.lock() {
            m.insert(subject.to_owned(), facts.clone());
        }
        Ok(facts)
    }

    /// A JetStream API request on `link`, given up when the connection is lost or after
    /// `nats.connect_timeout` (a lookup must not hold the batch for the whole delivery timeout).
    async fn bounded<T>(
        &self,
        link: &Link,
        request: impl std::future::Future<Output = T>,
    ) -> Result<T, Failure> {
        tokio::select! {
            answer = tokio::time::timeout(self.settings.connect_timeout, request) => {
                answer.map_err(|_| Failure::Connect(format!(
                    "JetStream did not answer a stream lookup within {:?}",
                    self.settings.connect_timeout
                )))
            }
            _ = link.lost.cancelled() => Err(Failure::Disconnected),
        }
    }

    fn failed_batch(records: &[OutboundRecord], failure: &Failure) -> Pending {
        Pending {
            slots: records
                .iter()
                .map(|_| Slot::Done(Outcome::Failed(fault(failure))))
                .collect(),
            deadline: tokio::time::Instant::now(),
            lost: CancellationToken::new(),
            server_error: None,
            broken: None,
        }
    }
}

fn api_failure(api: &jetstream::Error) -> Failure {
    match api.error_code().0 {
        10059 => Failure::NoStream,
        10039 | 10076 => Failure::JetStreamDisabled(api.to_string()),
        code => Failure::Api {
            code,
            description: api.to_string(),
        },
    }
}

/// Asks JetStream for the account's information (`$JS.API.INFO`): proves the connection works
/// and JetStream is enabled for the relay's account. `Err` holds the server's reason.
/// Why JetStream's account information could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JetStreamInfoError {
    /// JetStream answers that it is off for the account, or nobody answers the API subject.
    NotEnabled(String),
    /// JetStream answered with another error.
    Refused(String),
    /// No answer in time, or the connection failed: the server may be down, busy or stuck.
    NoAnswer(String),
}

impl std::fmt::Display for JetStreamInfoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotEnabled(d) | Self::Refused(d) | Self::NoAnswer(d) => f.write_str(d),
        }
    }
}

async fn account_info(link: &Link) -> Result<(), JetStreamInfoError> {
    use async_nats::client::RequestErrorKind;
    let reply = link
        .client
        .request("$JS.API.INFO", bytes::Bytes::new())
        .await
        .map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders => JetStreamInfoError::NotEnabled(
                "JetStream is not enabled (no responders for $JS.API.INFO)".to_owned(),
            ),
            RequestErrorKind::TimedOut => JetStreamInfoError::NoAnswer(format!(
                "JetStream did not answer $JS.API.INFO in time ({e})"
            )),
            _ => JetStreamInfoError::NoAnswer(e.to_string()),
        })?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
        .map_err(|e| JetStreamInfoError::Refused(format!("unreadable JetStream answer: {e}")))?;
    match answer.get("error") {
        // 503 / 10039: JetStream not enabled (for the account).
        Some(error)
            if error.get("code").and_then(serde_json::Value::as_u64) == Some(503)
                || error.to_string().to_lowercase().contains("not enabled") =>
        {
            Err(JetStreamInfoError::NotEnabled(error.to_string()))
        }
        Some(error) => Err(JetStreamInfoError::Refused(error.to_string())),
        None => Ok(()),
    }
}

/// The delay before a client reconnects by itself: never, in practice (see [`open`]).
const NEVER_RECONNECT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Connects with the settings; `server_error` (when given) keeps the last error the server
/// reports on the connection.
async fn open(
    settings: &NatsSettings,
    server_error: Option<Arc<Mutex<Option<String>>>>,
) -> Result<Link, Failure> {
    let lost = CancellationToken::new();
    let on_event = {
        let lost = lost.clone();
        move |event: async_nats::Event| {
            let lost = lost.clone();
            let server_error = server_error.clone();
            async move {
                match &event {
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        if !lost.is_cancelled() {
                            tracing::warn!(%event, "NATS connection lost: the pending publishes are re-sent on a new connection");
                        }
                        lost.cancel();
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(error = %e, "NATS server error");
                        if let Some(slot) = &server_error
                            && let Ok(mut slot) = slot.lock()
                        {
                            *slot = Some(e.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
    };
    install_tls_provider();
    let mut options = async_nats::ConnectOptions::new()
        .name("outbox-relay")
        .connection_timeout(settings.connect_timeout)
        .request_timeout(Some(settings.connect_timeout))
        // A lost connection is replaced by the relay (in order, from the first unacknowledged
        // event), never resumed by the client: a client that reconnected would send the
        // publishes still queued in it ahead of the ones the lost connection dropped (an
        // inversion the connection-cut test found). The client may reset its attempt count
        // (`max_reconnects` alone does not hold), so every attempt after the first connection
        // waits a year; the relay drops the client long before.
        .max_reconnects(1)
        .reconnect_delay_callback({
            let connected_once = Arc::new(AtomicBool::new(false));
            move |_attempt| {
                if connected_once.swap(true, Ordering::AcqRel) {
                    NEVER_RECONNECT
                } else {
                    Duration::ZERO
                }
            }
        })
        .event_callback(on_event);
    if let Some(path) = &settings.credentials_path {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| Failure::Auth(format!("cannot read nats.credentials_path {path}: {e}")))?;
    }
    if let Some(token) = &settings.token {
        options = options.token(token.expose().to_owned());
    }
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if settings.tls_required || settings.ca_path.is_some() {
        options = options.require_tls(true);
    }
    if let Some(ca) = &settings.ca_path {
        options = options.add_root_certificates(ca.into());
    }
    let urls = settings.urls();
    let client = tokio::time::timeout(settings.connect_timeout, options.connect(urls.as_slice()))
        .await
        .map_err(|_| Failure::Connect(format!("no answer within {:?}", settings.connect_timeout)))?
        .map_err(|e| connect_failure(&e))?;
    // The client reports a lost connection through an event channel that drops events when it
    // is full: its connection state, checked every 100 ms, is the backstop.
    {
        let (client, lost) = (client.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                if client.connection_state() != async_nats::connection::State::Connected {
                    tracing::warn!(
                        "NATS connection lost: the pending publishes are re-sent on a new connection"
                    );
                    lost.cancel();
                    return;
                }
            }
        });
    }
    let js = jetstream::ContextBuilder::new()
        .timeout(settings.delivery_timeout)
        .max_ack_inflight(100_000)
        .build(client.clone());
    Ok(Link {
        client,
        js,
        lost,
        streams: Arc::new(Mutex::new(HashMap::new())),
    })
}

/// Decrements the sink's in-flight count when its record is answered (or dropped).
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Slot {
    Sent(jetstream::context::PublishAckFuture, InFlight),
    Done(Outcome),
}

/// A batch published to JetStream whose acknowledgements are not all in yet.
pub struct Pending {
    slots: Vec<Slot>,
    deadline: tokio::time::Instant,
    lost: CancellationToken,
    server_error: Option<Arc<Mutex<Option<String>>>>,
    /// The sink's [`NatsSink::broken`] flag, set at the first failure.
    broken: Option<Arc<AtomicBool>>,
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
            .filter(|(_, s)| matches!(s, Slot::Sent(..)))
            .map(|(i, _)| i)
            .collect()
    }

    /// One outcome per record, in order. After the first sent record that is not
    /// acknowledged, every later sent record of the batch is [`Outcome::Failed`] too (the
    /// relay re-sends them in order; the stream drops those it already has).
    async fn wait(self: Box<Self>) -> Vec<Outcome> {
        let Pending {
            slots,
            deadline,
            lost,
            server_error,
            broken,
        } = *self;
        let mut out = Vec::with_capacity(slots.len());
        let mut first_failure: Option<DeliveryFault> = None;
        for slot in slots {
            let (ack, guard) = match slot {
                Slot::Done(o) => {
                    out.push(o);
                    continue;
                }
                Slot::Sent(ack, guard) => (ack, guard),
            };
            if let Some(f) = &first_failure {
                drop(guard);
                out.push(Outcome::Failed(f.clone()));
                continue;
            }
            let answer = tokio::select! {
                biased;
                answer = ack => answer.map_err(|e| {
                    let server = server_error.as_ref().and_then(|s| s.lock().ok().and_then(|e| e.clone()));
                    publish_failure(&e, server.as_deref())
                }),
                _ = lost.cancelled() => Err(Failure::Disconnected),
                _ = tokio::time::sleep_until(deadline) => Err(Failure::TimedOut),
            };
            // A failure marks the sink broken before the record stops counting in flight, so
            // the sink never takes "nothing in flight" for "everything acknowledged".
            if answer.is_err()
                && let Some(broken) = &broken
            {
                broken.store(true, Ordering::Release);
            }
            drop(guard);
            let outcome = match answer {
                Ok(ack) => Outcome::Delivered(Delivered {
                    partition: 0,
                    offset: i64::try_from(ack.sequence).unwrap_or(i64::MAX),
                }),
                Err(failure) => {
                    let f = fault(&failure);
                    first_failure = Some(DeliveryFault {
                        class: if f.class == ErrorClass::Record {
                            ErrorClass::Retry
                        } else {
                            f.class
                        },
                        ..f.clone()
                    });
                    if f.class == ErrorClass::Record {
                        // The stream's own verdict on this message: the relay sends it again
                        // alone before it parks it.
                        Outcome::Suspect(f)
                    } else {
                        Outcome::Failed(f)
                    }
                }
            };
            out.push(outcome);
        }
        out
    }
}

#[async_trait::async_trait]
impl Sink for NatsSink {
    fn kind(&self) -> SinkKind {
        SinkKind::Nats
    }

    /// Connects and asks JetStream for the account's information, within the connect timeout.
    async fn check_connection(&self) -> Result<(), SinkError> {
        let servers = self.settings.redacted_urls();
        let link = self.connected().await.map_err(|f| SinkError::Unreachable {
            broker: NATS,
            servers: servers.clone(),
            detail: fault(&f).detail,
        })?;
        match tokio::time::timeout(self.settings.connect_timeout, account_info(&link)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(JetStreamInfoError::NotEnabled(detail))) => Err(SinkError::Refused {
                broker: NATS,
                destination: String::new(),
                name: "JETSTREAM_NOT_ENABLED".into(),
                detail,
                fix: JETSTREAM_FIX.into(),
            }),
            Ok(Err(JetStreamInfoError::Refused(detail))) => Err(SinkError::Refused {
                broker: NATS,
                destination: String::new(),
                name: "JETSTREAM_ERROR".into(),
                detail,
                fix: "see the NATS server's log for why JetStream refuses the relay's account"
                    .into(),
            }),
            // A server that takes connections but whose JetStream does not answer (overloaded,
            // out of disk, restarting) is out of reach, not misconfigured.
            Ok(Err(JetStreamInfoError::NoAnswer(detail))) => Err(SinkError::Unreachable {
                broker: NATS,
                servers,
                detail,
            }),
            Err(_) => Err(SinkError::Unreachable {
                broker: NATS,
                servers,
                detail: "JetStream did not answer within nats.connect_timeout".into(),
            }),
        }
    }

    /// Publishes `records` in order without waiting for the acknowledgements.
    async fn enqueue(&self, records: &[OutboundRecord]) -> Box<dyn PendingBatch> {
        let link = match self.connected().await {
            Ok(link) => link,
            Err(failure) => return Box::new(Self::failed_batch(records, &failure)),
        };
        let deadline = tokio::time::Instant::now() + self.settings.delivery_timeout;
        let max_payload = link.client.server_info().max_payload;
        let mut slots = Vec::with_capacity(records.len());
        let mut poisoned: Vec<(&str, &str, usize)> = Vec::new();
        let mut stopped: Option<DeliveryFault> = None;
        let provenance = crate::faults::provenance();
        for (i, r) in records.iter().enumerate() {
            if let Some(f) = &stopped {
                slots.push(Slot::Done(Outcome::Failed(f.clone())));
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
            let prepared = self
                .prepare(&link, r, provenance.as_deref(), max_payload)
                .await;
            let (headers, body) = match prepared {
                Ok(p) => p,
                Err(failure) => {
                    let f = fault(&failure);
                    if f.class == ErrorClass::Record {
                        poisoned.push((&r.topic, &r.key, i));
                        slots.push(Slot::Done(Outcome::Rejected(f)));
                    } else {
                        stopped = Some(f.clone());
                        slots.push(Slot::Done(Outcome::Failed(f)));
                    }
                    continue;
                }
            };
            if link.lost.is_cancelled() {
                let f = fault(&Failure::Disconnected);
                stopped = Some(f.clone());
                slots.push(Slot::Done(Outcome::Failed(f)));
                continue;
            }
            let publish = jetstream::message::PublishMessage::build()
                .payload(body)
                .headers(headers);
            match link.js.send_publish(r.topic.clone(), publish).await {
                Ok(ack) => {
                    self.in_flight.fetch_add(1, Ordering::Relaxed);
                    slots.push(Slot::Sent(ack, InFlight(self.in_flight.clone())));
                }
                Err(e) => {
                    // A publish refused because the connection just closed is a lost connection,
                    // whatever the client calls it.
                    let failure = match publish_failure(&e, self.server_error().as_deref()) {
                        Failure::Other(_) if link.lost.is_cancelled() => Failure::Disconnected,
                        failure => failure,
                    };
                    let f = fault(&failure);
                    if f.class == ErrorClass::Record {
                        poisoned.push((&r.topic, &r.key, i));
                        slots.push(Slot::Done(Outcome::Rejected(f)));
                    } else {
                        stopped = Some(f.clone());
                        slots.push(Slot::Done(Outcome::Failed(f)));
                    }
                }
            }
        }
        if stopped.is_some() {
            self.broken.store(true, Ordering::Release);
        }
        Box::new(Pending {
            slots,
            deadline,
            lost: link.lost.clone(),
            server_error: Some(self.server_error.clone()),
            broken: Some(self.broken.clone()),
        })
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn delivery_timeout(&self) -> Duration {
        self.settings.delivery_timeout
    }

    /// Drops the connection (replacing it for every table that shares it, once however many
    /// of them fail); the next batch publishes on a new one, so the relay's re-sent events
    /// follow everything the old connection carried.
    async fn recreate(&mut self) -> Result<(), SinkError> {
        self.detach(true);
        if let Ok(mut e) = self.server_error.lock() {
            *e = None;
        }
        self.broken.store(false, Ordering::Release);
        Ok(())
    }

    /// Stops publishing at once; returns how many publishes were unanswered. With publishes
    /// unanswered the connection is dropped (for every table sharing it: they re-send theirs
    /// in order), so none of them can still go out.
    fn purge(&self) -> usize {
        let held = self.in_flight();
        self.broken.store(true, Ordering::Release);
        self.detach(held > 0);
        held
    }

    /// Waits up to `wait` for a round trip on the connection (the server answers it after it
    /// has read every publish sent before it, this table's and the others'), then lets go of
    /// the connection; when no answer came, the connection is dropped (for every table sharing
    /// it), so nothing left in the client's buffer can go out later. A publish the server read
    /// but had not stored yet may still be stored afterwards: a duplicate at most, dropped by
    /// `Nats-Msg-Id` when the next leader re-sends it first.
    async fn fence(&self, wait: Duration) -> Fenced {
        let held = self.in_flight();
        self.broken.store(true, Ordering::Release);
        let number = self.generation.lock().ok().and_then(|mut g| g.take());
        let link = self
            .connection
            .connection
            .current()
            .filter(|g| Some(g.number) == number);
        let mut unanswered = 0;
        if let Some(generation) = link {
            // Always, even with no acknowledgement awaited: publishes of an abandoned window may
            // still sit in the client's write buffer, and the answer proves the server has read
            // them before the relay lets go of its source.
            if !matches!(
                tokio::time::timeout(wait, account_info(&generation.connection)).await,
                Ok(Ok(_))
            ) {
                unanswered = held;
                self.connection.retire(generation.number);
            }
        }
        Fenced { held, unanswered }
    }

    fn watch(
        &self,
        stats: Arc<crate::stats::RelayStats>,
        shutdown: CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, SinkError> {
        if self.shared {
            return Ok(Some(watch_shared(self.connection.clone(), stats, shutdown)));
        }
        Ok(Some(watch_server(self.settings.clone(), stats, shutdown)))
    }
}

impl NatsSink {
    /// Checks a record against what NATS and the stream accept and builds its headers and body.
    async fn prepare(
        &self,
        link: &Link,
        r: &OutboundRecord,
        provenance: Option<&str>,
        max_payload: usize,
    ) -> Result<(HeaderMap, bytes::Bytes), Failure> {
        subject_problem(&r.topic, false).map_err(Failure::InvalidSubject)?;
        let extra: Vec<(&str, &str)> = provenance
            .map(|p| vec![(crate::faults::PROVENANCE_HEADER, p)])
            .unwrap_or_default();
        let headers = headers_of(r, &extra)?;
        let body = bytes::Bytes::from(r.payload.clone().unwrap_or_default());
        let size = message_size(&headers, body.len());
        if size > max_payload {
            return Err(Failure::TooLarge(format!(
                "the message takes {size} bytes, more than the server's max_payload of {max_payload}"
            )));
        }
        let cap = self.settings.max_message_bytes;
        if cap > 0 && size > cap {
            return Err(Failure::TooLarge(format!(
                "the message takes {size} bytes, more than nats.max_message_bytes = {cap}"
            )));
        }
        let stream = self.stream_for(link, &r.topic).await?;
        if let Some(max) = stream.max_message_size
            && size > max
        {
            return Err(Failure::TooLarge(format!(
                "the message takes {size} bytes, more than the stream's max_msg_size of {max}"
            )));
        }
        Ok((headers, body))
    }
}

/// What `topics ensure --sink nats` did for one stream or subject, as a printed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The stream was created.
    Created(String),
    /// The stream existed and was left alone.
    Exists(String),
    /// A destination subject is captured by this stream.
    Captured {
        /// The subject.
        subject: String,
        /// The stream capturing it.
        stream: String,
    },
}

/// `topics ensure --sink nats`: creates the stream of [`crate::config::NatsStreamSettings`]
/// (name, subjects, storage, duplicate window, replicas) unless it exists (then it is left
/// alone), and checks that every subject in `destinations` is captured by some stream. An error
/// names the first destination no stream captures, or why the stream could not be created.
pub async fn ensure_stream(
    settings: &NatsSettings,
    destinations: &[String],
) -> Result<Vec<Ensured>, String> {
    settings.validate().map_err(|e| e.to_string())?;
    let link = open(settings, None).await.map_err(|f| {
        format!(
            "cannot connect to NATS at {}: {}",
            settings.redacted_urls(),
            fault(&f).detail
        )
    })?;
    let wanted = &settings.stream;
    let mut done = Vec::new();
    match link.js.get_stream(&wanted.name).await {
        Ok(_) => done.push(Ensured::Exists(wanted.name.clone())),
        Err(_) => {
            let config = jetstream::stream::Config {
                name: wanted.name.clone(),
                subjects: wanted.subject_list(),
                storage: if wanted.storage == "memory" {
                    jetstream::stream::StorageType::Memory
                } else {
                    jetstream::stream::StorageType::File
                },
                duplicate_window: wanted.duplicate_window,
                num_replicas: wanted.replicas,
                ..Default::default()
            };
            link.js
                .create_stream(config)
                .await
                .map_err(|e| format!("creating stream {} failed: {e}", wanted.name))?;
            done.push(Ensured::Created(wanted.name.clone()));
        }
    }
    for subject in destinations {
        subject_problem(subject, false).map_err(|e| format!("destination {e}"))?;
        let stream = link.js.stream_by_subject(subject.as_str()).await.map_err(|_| {
            format!(
                "no stream captures `{subject}`: add it to nats.stream.subjects (or route it under {})",
                wanted.subjects
            )
        })?;
        done.push(Ensured::Captured {
            subject: subject.clone(),
            stream,
        });
    }
    link.lost.cancel();
    Ok(done)
}

/// How often an idle relay checks the server, and how long it waits for an answer.
pub const SERVER_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// See [`SERVER_PROBE_INTERVAL`].
pub const SERVER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps [`crate::stats::RelayStats::sink_reachable`] (the sink's reachability, whatever the
/// broker) current while the relay is idle: every [`SERVER_PROBE_INTERVAL`] without a published
/// event, a JetStream account request on a connection of its own (same settings, never
/// publishing) must answer within [`SERVER_PROBE_TIMEOUT`]. Stops when `shutdown` fires.
pub fn watch_server(
    settings: NatsSettings,
    stats: Arc<crate::stats::RelayStats>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut link: Option<Link> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SERVER_PROBE_INTERVAL) => {}
            }
            let answer: Result<(), String> = if published_within(&stats, SERVER_PROBE_INTERVAL) {
                Ok(())
            } else {
                if link.as_ref().is_some_and(|l| l.lost.is_cancelled()) {
                    link = None;
                }
                if link.is_none() {
                    let mut quick = settings.clone();
                    quick.connect_timeout = SERVER_PROBE_TIMEOUT;
                    link = open(&quick, None).await.ok();
                }
                match &link {
                    None => Err("cannot connect".to_owned()),
                    Some(l) => {
                        match tokio::time::timeout(SERVER_PROBE_TIMEOUT, account_info(l)).await {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("no answer".to_owned()),
                        }
                    }
                }
            };
            record_probe(
                &stats,
                &settings.redacted_urls(),
                answer,
                "NATS server does not answer: reporting not ready until it does",
                "NATS server answers again",
            );
        }
    })
}

/// [`watch_server`] for a table sharing its connection: the probe asks JetStream on the shared
/// connection (opening it when no table has yet), so the relay holds one connection to the
/// server however many tables it relays.
fn watch_shared(
    connection: Arc<NatsConnection>,
    stats: Arc<crate::stats::RelayStats>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SERVER_PROBE_INTERVAL) => {}
            }
            let answer: Result<(), String> = if published_within(&stats, SERVER_PROBE_INTERVAL) {
                Ok(())
            } else {
                match tokio::time::timeout(SERVER_PROBE_TIMEOUT, async {
                    let generation = connection.link().await.map_err(|f| fault(&f).detail)?;
                    account_info(&generation.connection)
                        .await
                        .map_err(|e| e.to_string())
                })
                .await
                {
                    Ok(answer) => answer,
                    Err(_) => Err("no answer".to_owned()),
                }
            };
            record_probe(
                &stats,
                &connection.settings.redacted_urls(),
                answer,
                "NATS server does not answer: reporting not ready until it does",
                "NATS server answers again",
            );
        }
    })
}

/// Makes rustls's `ring` provider the process's default unless one is installed already (by
/// an embedding service, or an earlier connection). The NATS client connects with rustls, and
/// with more than one provider compiled into the binary (other dependencies bring `aws-lc-rs`)
/// rustls cannot pick one by itself: the first TLS connection would panic.
fn install_tls_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that speaks enough of the NATS protocol to be connected to (INFO, PONG) and
    /// never answers anything else: a JetStream that hangs.
    async fn silent_server() -> std::net::SocketAddr {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let info = format!(
                        "INFO {{\"server_id\":\"silent\",\"version\":\"2.10.0\",\"proto\":1,\"headers\":true,\"max_payload\":1048576,\"host\":\"127.0.0.1\",\"port\":{}}}\r\n",
                        addr.port()
                    );
                    if write.write_all(info.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line.starts_with("PING") && write.write_all(b"PONG\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_jetstream_that_does_not_answer_is_out_of_reach_not_disabled() {
        let addr = silent_server().await;
        let sink = NatsSink::new(NatsSettings {
            url: crate::config::Secret::new(format!("nats://{addr}")),
            connect_timeout: Duration::from_millis(500),
            ..Default::default()
        })
        .unwrap();
        let link = sink
            .connected()
            .await
            .expect("the silent server takes connections");
        assert!(
            matches!(
                account_info(&link).await,
                Err(JetStreamInfoError::NoAnswer(_))
            ),
            "no answer is not a refusal"
        );
        match sink.check_connection().await {
            Err(SinkError::Unreachable { detail, .. }) => {
                assert!(detail.contains("did not answer"), "{detail}")
            }
            other => panic!("a silent JetStream must be unreachable (retried): {other:?}"),
        }
    }

    fn record(topic: &str, headers: &[(&str, &[u8])]) -> OutboundRecord {
        OutboundRecord {
            topic: topic.into(),
            key: "acct-1".into(),
            payload: Some("{}".into()),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.to_vec()))
                .collect(),
            timestamp_ms: None,
        }
    }

    #[test]
    fn one_place_decides_retry_park_or_stop() {
        assert_eq!(classify(&Failure::TimedOut), ErrorClass::Retry);
        assert_eq!(classify(&Failure::Disconnected), ErrorClass::Retry);
        assert_eq!(
            classify(&Failure::Connect("refused".into())),
            ErrorClass::Retry
        );
        assert_eq!(
            classify(&Failure::TooLarge("big".into())),
            ErrorClass::Record
        );
        assert_eq!(
            classify(&Failure::InvalidSubject("a..b".into())),
            ErrorClass::Record
        );
        assert_eq!(
            classify(&Failure::InvalidHeader("x".into())),
            ErrorClass::Record
        );
        assert_eq!(
            classify(&Failure::NoStream),
            ErrorClass::Stop(NO_STREAM_FIX)
        );
        assert!(NO_STREAM_FIX.contains("outbox-relay topics ensure --sink nats"));
        assert!(matches!(
            classify(&Failure::Auth("x".into())),
            ErrorClass::Stop(_)
        ));
        assert!(matches!(
            classify(&Failure::Permissions("x".into())),
            ErrorClass::Stop(_)
        ));
        let api = |code| Failure::Api {
            code,
            description: String::new(),
        };
        assert_eq!(classify(&api(10054)), ErrorClass::Record);
        assert_eq!(classify(&api(10059)), ErrorClass::Stop(NO_STREAM_FIX));
        assert_eq!(classify(&api(10077)), ErrorClass::Unlisted);
        assert_eq!(classify(&api(10008)), ErrorClass::Retry);
        assert_eq!(classify(&api(99999)), ErrorClass::Unlisted);
        assert_eq!(fault(&api(10077)).name, "JS_10077");
        assert_eq!(fault(&Failure::NoStream).name, "NO_STREAM");
    }

    #[test]
    fn client_errors_map_to_failures() {
        use jetstream::context::PublishError;
        let server = Some("Permissions Violation for Publish to \"outbox.event.x\"");
        assert_eq!(
            publish_failure(&PublishError::new(PublishErrorKind::StreamNotFound), None),
            Failure::NoStream
        );
        assert_eq!(
            publish_failure(&PublishError::new(PublishErrorKind::TimedOut), None),
            Failure::TimedOut
        );
        assert!(matches!(
            publish_failure(&PublishError::new(PublishErrorKind::TimedOut), server),
            Failure::Permissions(_)
        ));
        assert_eq!(
            publish_failure(&PublishError::new(PublishErrorKind::BrokenPipe), None),
            Failure::Disconnected
        );
        assert!(matches!(
            publish_failure(
                &PublishError::new(PublishErrorKind::MaxPayloadExceeded),
                None
            ),
            Failure::TooLarge(_)
        ));
    }

    #[test]
    fn headers_carry_key_event_id_and_every_record_header() {
        let r = record(
            "outbox.event.account",
            &[
                ("id", b"0190c3c4-0000-7000-8000-000000000001"),
                ("eventType", b"BalanceChanged"),
                (
                    "traceparent",
                    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
                ("Outbox-Key", b"spoofed"),
            ],
        );
        let h = headers_of(&r, &[("outbox-failpoint-provenance", "p")]).unwrap();
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get(KEY_HEADER).as_deref(), Some("acct-1"));
        assert_eq!(
            get(MSG_ID_HEADER).as_deref(),
            Some("0190c3c4-0000-7000-8000-000000000001")
        );
        assert_eq!(get("id"), get(MSG_ID_HEADER));
        assert_eq!(get("eventType").as_deref(), Some("BalanceChanged"));
        assert!(get("traceparent").is_some());
        assert_eq!(get("outbox-failpoint-provenance").as_deref(), Some("p"));
        assert_eq!(h.get_all(KEY_HEADER).count(), 1, "the key is the relay's");
        assert!(
            message_size(&h, 2) > 2 + "acct-1".len(),
            "headers count against max_msg_size"
        );
        let bad = record("s", &[("id", b"x"), ("note", b"line\r\nbreak")]);
        assert!(matches!(
            headers_of(&bad, &[]),
            Err(Failure::InvalidHeader(_))
        ));
        let binary = record("s", &[("blob", &[0xff, 0xfe])]);
        assert!(matches!(
            headers_of(&binary, &[]),
            Err(Failure::InvalidHeader(_))
        ));
    }
}
