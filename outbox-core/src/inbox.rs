//! The consumer side: typed decoding of relayed records and an **inbox** that applies each event
//! once.
//!
//! The relay publishes at least once (see the crate docs): after a crash, or when a consumer's
//! offsets are reset, a record can arrive again. The inbox makes that harmless. It lives in the
//! consumer's own database, and [`Inbox::deliver`] does, in **one** transaction of that database:
//!
//! 1. record the event id in the inbox table (`INSERT … ON CONFLICT DO NOTHING`): if it is already
//!    there, the event was applied before and nothing else happens;
//! 2. check the event's per-aggregate sequence (the `outbox-aggregate-seq` header) against the last
//!    one seen for that aggregate, and report a gap or an out-of-order delivery;
//! 3. run the caller's [`EventHandler`] with the open transaction, so the state change and the
//!    inbox row commit together — or neither does.
//!
//! A record that cannot be decoded (no `id` header, unknown event type, payload not matching the
//! event's shape, …) never reaches the handler; per [`MalformedPolicy`] it is logged and skipped,
//! or parked in the `<inbox>_parked` table with its reason and raw bytes.
//!
//! The inbox knows nothing of Kafka: it takes an [`IncomingRecord`] (topic, partition, offset, key,
//! value, headers). The rdkafka loop that feeds it and commits offsets after the database commit
//! is `outbox_core::consumer` (cargo feature `kafka`).
//!
//! ## Tables
//!
//! For an inbox named `inbox` (the default; any validated `schema.name` works):
//!
//! | table | one row per | purpose |
//! |---|---|---|
//! | `inbox` | consumer and event id | "applied once": the dedupe record |
//! | `inbox_sequences` | consumer, topic and aggregate id | last sequence seen, gap and out-of-order counts, highest purged sequence |
//! | `inbox_parked` | consumer and record position | records that could not be applied, with the reason |
//!
//! They are created by [`Inbox::migrate`], recorded in their own `_outbox_inbox_migrations`
//! history (never the application's migrations table), under an advisory lock, in one transaction.
//! Several consumers (each with its own consumer name) may share one inbox table.
//!
//! ## Purging
//!
//! The inbox table grows by one row per applied event. [`Inbox::purge_older_than`] deletes a
//! consumer's rows older than a given age; what that gives up, and what it keeps, is spelled out
//! there. Sequence and parked rows are never purged.

use std::fmt;
use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::IdentifierError;
use crate::event::{DecodeError, DecodeEvent};
use crate::migrate::{MigrationReport, begin_migration};
use crate::table::{Identifier, OutboxTable};

/// The newest inbox schema version this library creates.
pub const INBOX_SCHEMA_VERSION: i32 = 2;

/// How many inbox rows one statement of [`Inbox::purge_older_than`] deletes at most.
pub const PURGE_BATCH_ROWS: i64 = 10_000;

/// The header carrying the event id (Debezium's outbox router sets it too).
pub const HEADER_ID: &str = "id";
/// The header carrying the event type.
pub const HEADER_EVENT_TYPE: &str = "eventType";
/// The header carrying the payload schema version.
pub const HEADER_SCHEMA_VERSION: &str = "schemaVersion";
/// The header carrying the event's position in its aggregate's stream.
pub const HEADER_AGGREGATE_SEQ: &str = "outbox-aggregate-seq";
/// The header carrying the aggregate id when the record is keyed by something else (an event
/// with its own [`KEY_HEADER`](crate::KEY_HEADER)); absent when the key is the aggregate id.
pub const HEADER_AGGREGATE_ID: &str = "outbox-aggregate-id";
/// The W3C trace context header.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// The CloudEvents binary-mode event type header, used when `eventType` is absent.
pub const HEADER_CE_TYPE: &str = "ce_type";

/// Everything that can go wrong in the inbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// A configured name (schema, table, consumer) is not acceptable.
    #[error(transparent)]
    Identifier(#[from] IdentifierError),
    /// The consumer name is empty or too long.
    #[error("invalid consumer name `{0}`: must be 1 to 255 bytes")]
    ConsumerName(String),
    /// The database refused a statement; the transaction was rolled back (retryable).
    #[error("inbox database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The inbox tables were migrated by a newer version of this library.
    #[error(
        "inbox {table} is at schema version {found}, newer than this library's {known}: upgrade outbox-core"
    )]
    SchemaTooNew {
        /// The qualified inbox table name.
        table: String,
        /// The version recorded in the database.
        found: i32,
        /// The newest version this library knows.
        known: i32,
    },
    /// The handler failed; its transaction, including the inbox row, was rolled back, so the
    /// event is not marked as applied and may be delivered again.
    #[error("handler failed for event {event_id} ({event_type}): {source}")]
    Handler {
        /// The event id.
        event_id: Uuid,
        /// The event type.
        event_type: String,
        /// The handler's error.
        #[source]
        source: HandlerError,
    },
}

impl InboxError {
    /// Whether retrying the same record later may succeed (database errors, handler errors);
    /// configuration and schema errors are fatal.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Database(_) | Self::Handler { .. })
    }
}

/// The error a handler returns; any error type converts into it with `?` or `.into()`.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Applies one decoded event to the consumer's state.
///
/// Contract: `handle` runs inside the inbox's open transaction (`conn`); everything it writes
/// through `conn` commits together with the inbox row that marks the event as applied, or not at
/// all. So a handler is called **at most once per event id that commits** — a redelivered event
/// is recognised and never reaches it again — but it may be called again for an event whose
/// previous attempt failed (returned an error or lost its connection), because that attempt was
/// rolled back. A handler must therefore keep all its effects in `conn`; side effects elsewhere
/// (HTTP calls, other databases) are not covered by the inbox.
///
/// Dispatch by event type is a `match` on the decoded event (usually an enum deriving
/// `OutboxEvent`, whose variants are the event types).
pub trait EventHandler<E>: Send + Sync {
    /// Applies `event` through `conn`. An error rolls the whole delivery back.
    fn handle(
        &self,
        conn: &mut PgConnection,
        event: E,
        meta: &EventMetadata,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A record as it came off the broker, independent of the Kafka client library.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IncomingRecord {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Record key (the aggregate id for records published by the relay).
    pub key: Option<Vec<u8>>,
    /// Record value (the event payload JSON).
    pub payload: Option<Vec<u8>>,
    /// Headers in record order; a header may have no value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl IncomingRecord {
    /// The value of the last header named `name`, if it has one.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn header_str(&self, name: &str) -> Result<Option<&str>, EnvelopeError> {
        self.header(name)
            .map(|v| {
                std::str::from_utf8(v).map_err(|_| EnvelopeError::NotUtf8 {
                    header: name.to_owned(),
                })
            })
            .transpose()
    }
}

/// What the relay's headers say about an event, plus where the record was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMetadata {
    /// The event id (`id` header): the key the inbox dedupes on.
    pub event_id: Uuid,
    /// The event type (`eventType`, or CloudEvents `ce_type`).
    pub event_type: String,
    /// The aggregate id: the [`HEADER_AGGREGATE_ID`] header when the record has one (it was
    /// keyed by something else), otherwise the record key when it is UTF-8.
    pub aggregate_id: Option<String>,
    /// The event's position in its aggregate's stream (`outbox-aggregate-seq`), when the writer set
    /// one.
    pub aggregate_seq: Option<i64>,
    /// The payload schema version (`schemaVersion`, 1 when absent).
    pub schema_version: i32,
    /// The W3C `traceparent` captured when the event was written.
    pub traceparent: Option<String>,
    /// Topic the record was read from.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The per-aggregate sequence check, filled in by [`Inbox::record`] / [`Inbox::deliver`]
    /// ([`SequenceCheck::Unchecked`] before that).
    pub sequence: SequenceCheck,
}

impl EventMetadata {
    /// Reads the metadata from a record's key and headers. Fails with the reason when the `id`
    /// header is missing or not a UUID, the event type is missing, or a header is unreadable.
    ///
    /// Changed: the error used to be a `String`; it is now the typed [`EnvelopeError`], whose
    /// `Display` text is the former string (`error.to_string()` gives it back).
    pub fn from_record(record: &IncomingRecord) -> Result<Self, EnvelopeError> {
        let event_id = match record.header_str(HEADER_ID)? {
            Some(id) => Uuid::parse_str(id).map_err(|_| EnvelopeError::InvalidId {
                value: id.to_owned(),
            })?,
            None => return Err(EnvelopeError::MissingId),
        };
        let event_type = match record.header_str(HEADER_EVENT_TYPE)? {
            Some(t) => t,
            None => record
                .header_str(HEADER_CE_TYPE)?
                .ok_or(EnvelopeError::MissingEventType)?,
        };
        if event_type.is_empty() {
            return Err(EnvelopeError::EmptyEventType);
        }
        let aggregate_seq = record
            .header_str(HEADER_AGGREGATE_SEQ)?
            .map(|s| {
                s.parse::<i64>().map_err(|_| EnvelopeError::NotAnInteger {
                    header: HEADER_AGGREGATE_SEQ,
                    value: s.to_owned(),
                })
            })
            .transpose()?;
        let schema_version = record
            .header_str(HEADER_SCHEMA_VERSION)?
            .map(|s| {
                s.parse::<i32>().map_err(|_| EnvelopeError::NotAnInteger {
                    header: HEADER_SCHEMA_VERSION,
                    value: s.to_owned(),
                })
            })
            .transpose()?
            .unwrap_or(1);
        let aggregate_id = match record.header_str(HEADER_AGGREGATE_ID)? {
            Some(id) => Some(id.to_owned()),
            None => record
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(str::to_owned),
        };
        Ok(Self {
            event_id,
            event_type: event_type.to_owned(),
            aggregate_id,
            aggregate_seq,
            schema_version,
            traceparent: record.header_str(HEADER_TRACEPARENT)?.map(str::to_owned),
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            sequence: SequenceCheck::Unchecked,
        })
    }
}

/// Why a record's key and headers do not describe an outbox event (see
/// [`EventMetadata::from_record`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The record has no `id` header: it was not published by an outbox relay.
    #[error("no `id` header (not an outbox event?)")]
    MissingId,
    /// The `id` header is not a UUID.
    #[error("header `id` is not a UUID: `{value}`")]
    InvalidId {
        /// The header's text.
        value: String,
    },
    /// Neither an `eventType` nor a CloudEvents `ce_type` header.
    #[error("no `eventType` or `ce_type` header")]
    MissingEventType,
    /// The event type header is present but empty.
    #[error("the event type header is empty")]
    EmptyEventType,
    /// A header the inbox reads is not UTF-8.
    #[error("header `{header}` is not UTF-8")]
    NotUtf8 {
        /// The header's name.
        header: String,
    },
    /// A numeric header (`schemaVersion`, `outbox-aggregate-seq`) is not an integer.
    #[error("header `{header}` is not an integer: `{value}`")]
    NotAnInteger {
        /// The header's name.
        header: &'static str,
        /// The header's text.
        value: String,
    },
}

/// Why a record could not be turned into a typed event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Undecodable {
    /// Headers missing or unreadable (no event id, no event type, …).
    ///
    /// Changed: this used to carry a `String`; `error.to_string()` gives the same text.
    #[error(transparent)]
    Envelope(EnvelopeError),
    /// The event type is not one the target type knows.
    #[error("unknown event type `{0}`")]
    UnknownEventType(String),
    /// The record has no value.
    #[error("event {0} has a null payload")]
    NullPayload(Uuid),
    /// The payload does not match the event type's shape.
    #[error(transparent)]
    Payload(DecodeError),
}

/// Decodes `record` into its metadata and the typed event `E`.
///
/// Guarantee: succeeds only for a record with a UUID `id` header, an event type that `E`
/// [accepts](DecodeEvent::accepts), and a payload that decodes into it; never panics on any input.
/// The payload is decoded with [`DecodeEvent::decode_versioned`] and the record's `schemaVersion`,
/// so a type with an upcast hook reads payloads written by older versions of itself.
pub fn decode_record<E: DecodeEvent>(
    record: &IncomingRecord,
) -> Result<(EventMetadata, E), Undecodable> {
    let meta = EventMetadata::from_record(record).map_err(Undecodable::Envelope)?;
    if !E::accepts(&meta.event_type) {
        return Err(Undecodable::UnknownEventType(meta.event_type));
    }
    let payload = record
        .payload
        .as_deref()
        .ok_or(Undecodable::NullPayload(meta.event_id))?;
    let event = E::decode_versioned(&meta.event_type, meta.schema_version, payload)
        .map_err(Undecodable::Payload)?;
    Ok((meta, event))
}

/// How an event's per-aggregate sequence compares with the last one this consumer applied for the
/// same aggregate (same topic and key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Not checked yet.
    Unchecked,
    /// The record carries no sequence header, or no key.
    Unsequenced,
    /// The first event of this aggregate this consumer sees.
    First {
        /// Its sequence.
        seq: i64,
    },
    /// Exactly one above the last one seen.
    InOrder,
    /// Above the last one seen, but events in between were not (yet) seen: lost, filtered out, or
    /// to arrive later (out of order).
    Gap {
        /// The sequence that was expected.
        expected: i64,
        /// The sequence that arrived.
        got: i64,
    },
    /// Not above the last one seen, for an event id never applied before: delivered after a later
    /// event of the same aggregate.
    OutOfOrder {
        /// The highest sequence seen before.
        last: i64,
        /// The sequence that arrived.
        got: i64,
    },
}

impl SequenceCheck {
    /// Whether this is a gap or an out-of-order delivery.
    pub fn is_anomaly(&self) -> bool {
        matches!(self, Self::Gap { .. } | Self::OutOfOrder { .. })
    }
}

/// What [`Inbox::record`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// First time this event id is recorded (in the caller's transaction): apply it.
    New(SequenceCheck),
    /// The event id was recorded (and so applied) before: do nothing.
    Duplicate,
}

/// What [`Inbox::deliver`] did with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// The handler applied the event; its changes and the inbox row are committed.
    Applied {
        /// The event id.
        event_id: Uuid,
        /// The per-aggregate sequence check.
        sequence: SequenceCheck,
    },
    /// The event id was applied before; nothing changed.
    Duplicate {
        /// The event id.
        event_id: Uuid,
    },
    /// The record could not be decoded; it was logged and skipped, or parked.
    Malformed {
        /// Why.
        reason: String,
        /// Whether it was parked (`false`: skipped).
        parked: bool,
    },
    /// An event type this consumer does not handle, ignored by its configuration.
    Ignored {
        /// The event type.
        event_type: String,
    },
}

/// What happens to a record that cannot be decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MalformedPolicy {
    /// Log it at error level and move on; nothing is kept.
    Skip,
    /// Store it in the `<inbox>_parked` table with its reason and raw bytes, then move on.
    #[default]
    Park,
}

/// Where the inbox tables live: an optional schema and a base name (default `inbox`).
///
/// Guarantee: names are validated [`Identifier`]s and always quoted in SQL; the base name is at
/// most 53 bytes so the derived `<name>_sequences` and `<name>_parked` fit PostgreSQL's limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboxTable {
    schema: Option<Identifier>,
    name: Identifier,
}

impl Default for InboxTable {
    fn default() -> Self {
        Self {
            schema: None,
            name: Identifier::parse("inbox table name", "inbox")
                .unwrap_or_else(|_| unreachable!("`inbox` is a valid identifier")),
        }
    }
}

impl InboxTable {
    /// An inbox `name` in `schema` (or the connection's default schema when `None`).
    pub fn new(schema: Option<&str>, name: &str) -> Result<Self, IdentifierError> {
        let name = Identifier::parse("inbox table name", name)?;
        if name.as_str().len() > 53 {
            return Err(IdentifierError {
                what: "inbox table name",
                value: name.as_str().to_owned(),
                reason: "longer than 53 bytes (the inbox derives `<name>_sequences`)",
            });
        }
        Ok(Self {
            schema: schema
                .map(|s| Identifier::parse("inbox schema name", s))
                .transpose()?,
            name,
        })
    }

    /// Parses `name` or `schema.name`.
    pub fn parse(qualified: &str) -> Result<Self, IdentifierError> {
        match qualified.split_once('.') {
            Some((schema, name)) => Self::new(Some(schema), name),
            None => Self::new(None, qualified),
        }
    }

    fn qualify(&self, name: &str) -> String {
        match &self.schema {
            Some(s) => format!("{}.\"{name}\"", s.quoted()),
            None => format!("\"{name}\""),
        }
    }

    /// The quoted, possibly schema-qualified inbox table.
    pub fn qualified(&self) -> String {
        self.qualify(self.name.as_str())
    }

    /// The quoted table of per-aggregate sequences.
    pub fn sequences(&self) -> String {
        self.qualify(&format!("{}_sequences", self.name))
    }

    /// The quoted table of parked records.
    pub fn parked(&self) -> String {
        self.qualify(&format!("{}_parked", self.name))
    }

    fn history(&self) -> String {
        self.qualify("_outbox_inbox_migrations")
    }

    fn lock_key(&self) -> i64 {
        // Same stable hash as the outbox's own locks, with a purpose of its own.
        OutboxTable::new(
            self.schema.as_ref().map(Identifier::as_str),
            self.name.as_str(),
        )
        .map(|t| t.lock_key("inbox-migrate"))
        .unwrap_or(0x6f75_7462_6f78)
    }
}

impl fmt::Display for InboxTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// A record that was parked instead of applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedRecord {
    /// Row id in the parked table.
    pub id: i64,
    /// Where it was read.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Its event id, if the `id` header was readable.
    pub event_id: Option<Uuid>,
    /// Its event type, if readable.
    pub event_type: Option<String>,
    /// The raw key.
    pub key: Option<Vec<u8>>,
    /// The raw value.
    pub payload: Option<Vec<u8>>,
    /// Why it was parked.
    pub reason: String,
    /// When.
    pub parked_at: DateTime<Utc>,
}

/// A consumer's inbox: dedupe by event id, per-aggregate sequence checks and parking, all in the
/// consumer's own database.
///
/// Guarantee: through [`deliver`](Self::deliver), an event's handler effects are committed at
/// most once per consumer name, however often the record is delivered, and exactly once if it is
/// delivered until it succeeds.
#[derive(Debug, Clone)]
pub struct Inbox {
    table: InboxTable,
    consumer: String,
    on_malformed: MalformedPolicy,
    ignore_unknown_event_types: bool,
}

impl Inbox {
    /// An inbox in `table` for the consumer called `consumer`.
    ///
    /// The name identifies the *state* the inbox protects (one per read model or downstream
    /// table), not the Kafka group: keep it stable when the group id changes, or a replay through a
    /// new group would not be recognised as duplicates.
    pub fn new(table: InboxTable, consumer: impl Into<String>) -> Result<Self, InboxError> {
        let consumer = consumer.into();
        if consumer.is_empty() || consumer.len() > 255 {
            return Err(InboxError::ConsumerName(consumer));
        }
        Ok(Self {
            table,
            consumer,
            on_malformed: MalformedPolicy::default(),
            ignore_unknown_event_types: false,
        })
    }

    /// Sets what happens to records that cannot be decoded (default: [`MalformedPolicy::Park`]).
    pub fn with_malformed_policy(mut self, policy: MalformedPolicy) -> Self {
        self.on_malformed = policy;
        self
    }

    /// Ignores (instead of treating as malformed) records whose event type the consumer's event
    /// type does not accept — for a consumer that wants only some events of a topic.
    pub fn ignoring_unknown_event_types(mut self, ignore: bool) -> Self {
        self.ignore_unknown_event_types = ignore;
        self
    }

    /// The inbox tables.
    pub fn table(&self) -> &InboxTable {
        &self.table
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Creates the inbox tables or upgrades them to [`INBOX_SCHEMA_VERSION`].
    ///
    /// Guarantee: idempotent and safe to call concurrently; one transaction under an advisory
    /// lock, recorded in `_outbox_inbox_migrations`; refuses a schema newer than this library.
    pub async fn migrate(&self, conn: &mut PgConnection) -> Result<MigrationReport, InboxError> {
        let t = &self.table;
        let mut tx = conn.begin().await?;
        let history = t.history();
        let current = begin_migration(
            &mut tx,
            t.lock_key(),
            t.schema.as_ref(),
            &history,
            t.name.as_str(),
        )
        .await?;
        if current > INBOX_SCHEMA_VERSION {
            return Err(InboxError::SchemaTooNew {
                table: t.to_string(),
                found: current,
                known: INBOX_SCHEMA_VERSION,
            });
        }
        let mut applied = Vec::new();
        if current < 1 {
            for statement in self.v1() {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {history} (table_name, version, description) VALUES ($1, 1, $2)"
            )))
            .bind(t.name.as_str())
            .bind("create the inbox, sequence and parked tables")
            .execute(&mut *tx)
            .await?;
            tracing::info!(inbox = %t, version = 1, "applied inbox migration");
            applied.push(1);
        }
        if current < 2 {
            for statement in self.v2() {
                sqlx::query(AssertSqlSafe(statement))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {history} (table_name, version, description) VALUES ($1, 2, $2)"
            )))
            .bind(t.name.as_str())
            .bind("index the inbox by consumer and age, record the highest purged sequence")
            .execute(&mut *tx)
            .await?;
            tracing::info!(inbox = %t, version = 2, "applied inbox migration");
            applied.push(2);
        }
        tx.commit().await?;
        Ok(MigrationReport {
            applied,
            version: INBOX_SCHEMA_VERSION,
        })
    }

    fn v1(&self) -> Vec<String> {
        let inbox = self.table.qualified();
        let sequences = self.table.sequences();
        let parked = self.table.parked();
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {inbox} (
                    consumer        text        NOT NULL,
                    event_id        uuid        NOT NULL,
                    event_type      text        NOT NULL,
                    aggregate_id    text,
                    aggregate_seq   bigint,
                    topic           text        NOT NULL,
                    kafka_partition integer     NOT NULL,
                    kafka_offset    bigint      NOT NULL,
                    processed_at    timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (consumer, event_id)
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {sequences} (
                    consumer     text        NOT NULL,
                    topic        text        NOT NULL,
                    aggregate_id text        NOT NULL,
                    last_seq     bigint      NOT NULL,
                    gaps         bigint      NOT NULL DEFAULT 0,
                    out_of_order bigint      NOT NULL DEFAULT 0,
                    updated_at   timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (consumer, topic, aggregate_id)
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {parked} (
                    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    consumer        text        NOT NULL,
                    topic           text        NOT NULL,
                    kafka_partition integer     NOT NULL,
                    kafka_offset    bigint      NOT NULL,
                    event_id        uuid,
                    event_type      text,
                    record_key      bytea,
                    payload         bytea,
                    headers         jsonb       NOT NULL DEFAULT '[]'::jsonb,
                    reason          text        NOT NULL,
                    parked_at       timestamptz NOT NULL DEFAULT now(),
                    UNIQUE (consumer, topic, kafka_partition, kafka_offset)
                )"
            ),
        ]
    }

    /// Version 2: what [`purge_older_than`](Self::purge_older_than) needs. An index on
    /// `(consumer, processed_at)` so a purge finds old rows without scanning the table (built
    /// inside the migration's transaction, so it blocks writes to the inbox while it builds), and
    /// `purged_seq` on the sequences, the highest sequence whose inbox row was purged. In-place on
    /// a version 1 inbox: `processed_at` is already there (default `now()`).
    fn v2(&self) -> Vec<String> {
        let inbox = self.table.qualified();
        let sequences = self.table.sequences();
        // Base names are at most 53 bytes, so `<name>_purge_idx` fits the 63-byte limit; an index
        // lives in its table's schema, so the name is not qualified.
        let index = format!("\"{}_purge_idx\"", self.table.name);
        vec![
            format!("CREATE INDEX IF NOT EXISTS {index} ON {inbox} (consumer, processed_at)"),
            format!("ALTER TABLE {sequences} ADD COLUMN IF NOT EXISTS purged_seq bigint"),
        ]
    }

    /// Records `meta.event_id` as applied, inside the caller's transaction, and checks its
    /// per-aggregate sequence.
    ///
    /// Guarantee: returns [`Recorded::New`] for exactly one committed transaction per event id and
    /// consumer; a concurrent second attempt waits for the first and then sees
    /// [`Recorded::Duplicate`]. The caller applies the event only on `New`, in the same
    /// transaction, and rolls back to "unrecord" it.
    ///
    /// An event whose id is not recorded but whose sequence is at or below its aggregate's highest
    /// *purged* sequence is also [`Recorded::Duplicate`]: it is a redelivery of an event whose
    /// inbox row [`purge_older_than`](Self::purge_older_than) deleted (see there).
    pub async fn record(
        &self,
        conn: &mut PgConnection,
        meta: &EventMetadata,
    ) -> Result<Recorded, InboxError> {
        let inserted = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (consumer, event_id, event_type, aggregate_id, aggregate_seq, topic,
                             kafka_partition, kafka_offset)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (consumer, event_id) DO NOTHING",
            self.table.qualified()
        )))
        .bind(&self.consumer)
        .bind(meta.event_id)
        .bind(&meta.event_type)
        .bind(meta.aggregate_id.as_deref())
        .bind(meta.aggregate_seq)
        .bind(&meta.topic)
        .bind(meta.partition)
        .bind(meta.offset)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(Recorded::Duplicate);
        }
        let (Some(aggregate_id), Some(seq)) = (meta.aggregate_id.as_deref(), meta.aggregate_seq)
        else {
            return Ok(Recorded::New(SequenceCheck::Unsequenced));
        };
        let sequences = self.table.sequences();
        let known: Option<(i64, Option<i64>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT last_seq, purged_seq FROM {sequences}
             WHERE consumer = $1 AND topic = $2 AND aggregate_id = $3 FOR UPDATE"
        )))
        .bind(&self.consumer)
        .bind(&meta.topic)
        .bind(aggregate_id)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((_, Some(purged))) = known
            && seq <= purged
        {
            tracing::debug!(
                consumer = %self.consumer, event_id = %meta.event_id, seq, purged,
                "redelivery of an event whose inbox row was purged ignored"
            );
            return Ok(Recorded::Duplicate);
        }
        let last = known.map(|(last, _)| last);
        let check = match last {
            None => SequenceCheck::First { seq },
            Some(last) if seq == last + 1 => SequenceCheck::InOrder,
            Some(last) if seq > last => SequenceCheck::Gap {
                expected: last + 1,
                got: seq,
            },
            Some(last) => SequenceCheck::OutOfOrder { last, got: seq },
        };
        let (gap, out_of_order) = match check {
            SequenceCheck::Gap { .. } => (1_i64, 0_i64),
            SequenceCheck::OutOfOrder { .. } => (0, 1),
            _ => (0, 0),
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {sequences} AS s (consumer, topic, aggregate_id, last_seq, gaps, out_of_order)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (consumer, topic, aggregate_id) DO UPDATE
             SET last_seq = GREATEST(s.last_seq, EXCLUDED.last_seq),
                 gaps = s.gaps + EXCLUDED.gaps,
                 out_of_order = s.out_of_order + EXCLUDED.out_of_order,
                 updated_at = now()"
        )))
        .bind(&self.consumer)
        .bind(&meta.topic)
        .bind(aggregate_id)
        .bind(seq)
        .bind(gap)
        .bind(out_of_order)
        .execute(&mut *conn)
        .await?;
        Ok(Recorded::New(check))
    }

    /// Whether `event_id` has been applied by this consumer (as of the connection's snapshot).
    pub async fn is_recorded(
        &self,
        conn: &mut PgConnection,
        event_id: Uuid,
    ) -> Result<bool, InboxError> {
        Ok(sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE consumer = $1 AND event_id = $2)",
            self.table.qualified()
        )))
        .bind(&self.consumer)
        .bind(event_id)
        .fetch_one(&mut *conn)
        .await?)
    }

    /// Deletes this consumer's inbox rows (the "applied" records) older than `age`, and returns
    /// how many it deleted.
    ///
    /// "Older" is by `processed_at`, the time the event was applied. The cut-off is taken once,
    /// at the start, from the database clock; rows are deleted oldest first in statements of at
    /// most [`PURGE_BATCH_ROWS`] rows through the `(consumer, processed_at)` index, each its own
    /// short transaction when `conn` is not inside one (pass a plain connection, not a
    /// transaction, or the whole purge holds its locks until that transaction ends). Rows being
    /// inserted concurrently are younger than the cut-off and never touched; rows locked by a
    /// concurrent redelivery are skipped until the next purge. Other consumers' rows, the
    /// per-aggregate sequence rows and parked records are never deleted.
    ///
    /// What a purge gives up: a redelivery of an event whose row was purged is **no longer
    /// recognised as a duplicate by its id**. So `age` must exceed the longest time after which
    /// the broker can deliver an applied event again — for Kafka, the topic's retention (an
    /// offset reset to `earliest` replays everything still retained) and any offset reset or
    /// replay window you use. With a shorter `age`, a handler can apply such an event twice.
    ///
    /// What it keeps: for events carrying `outbox-aggregate-seq` (and an aggregate id), each
    /// purged row's sequence raises its aggregate's `purged_seq` in the same statement, and
    /// [`record`](Self::record) treats an unrecorded event at or below `purged_seq` as a duplicate;
    /// so a stale redelivery of a sequenced event is still dropped after any purge. (An event of
    /// that aggregate that was never applied and arrives only now, more than `age` after a later
    /// event of the same aggregate was applied, is dropped too — with `age` beyond the
    /// redelivery horizon, such an event cannot arrive.) Unsequenced events have only their id.
    ///
    /// Errors: a database error stops the purge; the batches committed before it stay deleted.
    pub async fn purge_older_than(
        &self,
        conn: &mut PgConnection,
        age: std::time::Duration,
    ) -> Result<u64, InboxError> {
        let inbox = self.table.qualified();
        let sequences = self.table.sequences();
        // Microseconds are PostgreSQL's timestamp resolution; saturate absurd ages.
        let age_us = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
        let cutoff: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT CASE WHEN $1 >= 9000000000000000 THEN NULL
                         ELSE now() - make_interval(secs => $1::float8 / 1000000) END",
        )
        .bind(age_us)
        .fetch_one(&mut *conn)
        .await?;
        let Some(cutoff) = cutoff else {
            return Ok(0);
        };
        let batch: std::sync::Arc<str> = std::sync::Arc::from(format!(
            "WITH doomed AS (
                 SELECT event_id FROM {inbox}
                 WHERE consumer = $1 AND processed_at < $2
                 ORDER BY processed_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED
             ), gone AS (
                 DELETE FROM {inbox} i USING doomed d
                 WHERE i.consumer = $1 AND i.event_id = d.event_id
                 RETURNING i.topic, i.aggregate_id, i.aggregate_seq
             ), marked AS (
                 UPDATE {sequences} s
                 SET purged_seq = GREATEST(s.purged_seq, g.seq)
                 FROM (SELECT topic, aggregate_id, max(aggregate_seq) AS seq
                       FROM gone
                       WHERE aggregate_id IS NOT NULL AND aggregate_seq IS NOT NULL
                       GROUP BY topic, aggregate_id) g
                 WHERE s.consumer = $1 AND s.topic = g.topic AND s.aggregate_id = g.aggregate_id
                 RETURNING 1
             )
             SELECT count(*) FROM gone"
        ));
        let mut total = 0_u64;
        loop {
            let deleted: i64 = sqlx::query_scalar(AssertSqlSafe(batch.clone()))
                .bind(&self.consumer)
                .bind(cutoff)
                .bind(PURGE_BATCH_ROWS)
                .fetch_one(&mut *conn)
                .await?;
            total += deleted.unsigned_abs();
            if deleted < PURGE_BATCH_ROWS {
                break;
            }
        }
        tracing::debug!(consumer = %self.consumer, inbox = %self.table, deleted = total, %cutoff, "purged the inbox");
        Ok(total)
    }

    /// How many events this consumer has applied.
    pub async fn applied_count(&self, conn: &mut PgConnection) -> Result<i64, InboxError> {
        Ok(sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {} WHERE consumer = $1",
            self.table.qualified()
        )))
        .bind(&self.consumer)
        .fetch_one(&mut *conn)
        .await?)
    }

    /// Parks `record` with `reason`. Returns `false` when that record position was parked before
    /// (a redelivery), so parking is idempotent.
    pub async fn park(
        &self,
        conn: &mut PgConnection,
        record: &IncomingRecord,
        reason: &str,
    ) -> Result<bool, InboxError> {
        let meta = EventMetadata::from_record(record).ok();
        let headers = serde_json::Value::Array(
            record
                .headers
                .iter()
                .map(|(name, value)| {
                    serde_json::json!([name, value.as_deref().map(String::from_utf8_lossy)])
                })
                .collect(),
        );
        let inserted = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (consumer, topic, kafka_partition, kafka_offset, event_id, event_type,
                             record_key, payload, headers, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (consumer, topic, kafka_partition, kafka_offset) DO NOTHING",
            self.table.parked()
        )))
        .bind(&self.consumer)
        .bind(&record.topic)
        .bind(record.partition)
        .bind(record.offset)
        .bind(meta.as_ref().map(|m| m.event_id))
        .bind(meta.as_ref().map(|m| m.event_type.clone()))
        .bind(record.key.as_deref())
        .bind(record.payload.as_deref())
        .bind(headers)
        .bind(reason)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// This consumer's parked records, oldest first.
    pub async fn parked(&self, conn: &mut PgConnection) -> Result<Vec<ParkedRecord>, InboxError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, topic, kafka_partition, kafka_offset, event_id, event_type, record_key,
                    payload, reason, parked_at
             FROM {} WHERE consumer = $1 ORDER BY id",
            self.table.parked()
        )))
        .bind(&self.consumer)
        .fetch_all(&mut *conn)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ParkedRecord {
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    partition: r.try_get("kafka_partition")?,
                    offset: r.try_get("kafka_offset")?,
                    event_id: r.try_get("event_id")?,
                    event_type: r.try_get("event_type")?,
                    key: r.try_get("record_key")?,
                    payload: r.try_get("payload")?,
                    reason: r.try_get("reason")?,
                    parked_at: r.try_get("parked_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(InboxError::from)
    }

    /// Decodes `record` into `E` and applies it once through `handler`, in one transaction on
    /// `pool` together with the inbox row (see the module docs).
    ///
    /// Guarantee: `Ok(Applied)` means the handler's changes and the inbox row are committed;
    /// `Ok(Duplicate)` means the event had been applied before and nothing changed; `Ok(Malformed)`
    /// means the record was skipped or parked per the policy (never passed to the handler);
    /// `Err` means nothing was committed (except nothing: the transaction was rolled back), so
    /// the same record may be delivered again.
    pub async fn deliver<E, H>(
        &self,
        pool: &PgPool,
        record: &IncomingRecord,
        handler: &H,
    ) -> Result<Delivered, InboxError>
    where
        E: DecodeEvent + Send,
        H: EventHandler<E>,
    {
        let (mut meta, event) = match decode_record::<E>(record) {
            Ok(decoded) => decoded,
            Err(Undecodable::UnknownEventType(event_type)) if self.ignore_unknown_event_types => {
                tracing::debug!(
                    consumer = %self.consumer, topic = %record.topic, partition = record.partition,
                    offset = record.offset, %event_type, "ignoring an event type this consumer does not handle"
                );
                return Ok(Delivered::Ignored { event_type });
            }
            Err(e) => return self.malformed(pool, record, e.to_string()).await,
        };
        let mut tx = pool.begin().await?;
        match self.record(&mut tx, &meta).await? {
            Recorded::Duplicate => {
                tx.rollback().await?;
                tracing::debug!(consumer = %self.consumer, event_id = %meta.event_id, "duplicate delivery ignored");
                return Ok(Delivered::Duplicate {
                    event_id: meta.event_id,
                });
            }
            Recorded::New(check) => meta.sequence = check,
        }
        match meta.sequence {
            SequenceCheck::Gap { expected, got } => tracing::warn!(
                consumer = %self.consumer, topic = %meta.topic, aggregate_id = ?meta.aggregate_id,
                event_id = %meta.event_id, expected, got,
                "sequence gap: events of this aggregate are missing or will arrive out of order"
            ),
            SequenceCheck::OutOfOrder { last, got } => tracing::warn!(
                consumer = %self.consumer, topic = %meta.topic, aggregate_id = ?meta.aggregate_id,
                event_id = %meta.event_id, last, got,
                "out-of-order delivery: an earlier event of this aggregate arrived after a later one"
            ),
            _ => {}
        }
        let event_id = meta.event_id;
        if let Err(source) = handler.handle(&mut tx, event, &meta).await {
            // Dropping the transaction rolls back the inbox row too; say so explicitly.
            let _ = tx.rollback().await;
            return Err(InboxError::Handler {
                event_id,
                event_type: meta.event_type,
                source,
            });
        }
        tx.commit().await?;
        Ok(Delivered::Applied {
            event_id,
            sequence: meta.sequence,
        })
    }

    /// Reports a record that cannot be applied and skips or parks it per the policy.
    pub async fn malformed(
        &self,
        pool: &PgPool,
        record: &IncomingRecord,
        reason: String,
    ) -> Result<Delivered, InboxError> {
        match self.on_malformed {
            MalformedPolicy::Skip => {
                tracing::error!(
                    consumer = %self.consumer, topic = %record.topic, partition = record.partition,
                    offset = record.offset, %reason, "malformed record skipped"
                );
                Ok(Delivered::Malformed {
                    reason,
                    parked: false,
                })
            }
            MalformedPolicy::Park => {
                let mut conn = pool.acquire().await?;
                let fresh = self.park(&mut conn, record, &reason).await?;
                tracing::error!(
                    consumer = %self.consumer, topic = %record.topic, partition = record.partition,
                    offset = record.offset, %reason, parked_in = %self.table.parked(), already_parked = !fresh,
                    "malformed record parked"
                );
                Ok(Delivered::Malformed {
                    reason,
                    parked: true,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)], payload: Option<&str>) -> IncomingRecord {
        IncomingRecord {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: Some(b"acc-1".to_vec()),
            payload: payload.map(|p| p.as_bytes().to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn metadata_from_relay_headers() {
        let id = Uuid::now_v7().to_string();
        let r = record(
            &[
                ("id", &id),
                ("eventType", "Opened"),
                ("outbox-aggregate-seq", "3"),
                ("schemaVersion", "2"),
            ],
            Some("{}"),
        );
        let m = EventMetadata::from_record(&r).unwrap();
        assert_eq!(m.event_id.to_string(), id);
        assert_eq!(m.event_type, "Opened");
        assert_eq!(m.aggregate_id.as_deref(), Some("acc-1"));
        assert_eq!(m.aggregate_seq, Some(3));
        assert_eq!(m.schema_version, 2);
        assert_eq!(m.offset, 7);
    }

    #[test]
    fn envelope_errors_are_reasons_not_panics() {
        for (headers, needle) in [
            (vec![], "no `id` header"),
            (vec![("id", "nope")], "not a UUID"),
            (
                vec![("id", "00000000-0000-0000-0000-000000000000")],
                "eventType",
            ),
            (
                vec![
                    ("id", "00000000-0000-0000-0000-000000000000"),
                    ("ce_type", "X"),
                    ("outbox-aggregate-seq", "x"),
                ],
                "not an integer",
            ),
        ] {
            let e = EventMetadata::from_record(&record(&headers, None))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn envelope_errors_are_typed() {
        let id = "00000000-0000-0000-0000-000000000000";
        let cases: [(Vec<(&str, &str)>, EnvelopeError); 5] = [
            (vec![], EnvelopeError::MissingId),
            (
                vec![("id", "nope")],
                EnvelopeError::InvalidId {
                    value: "nope".into(),
                },
            ),
            (vec![("id", id)], EnvelopeError::MissingEventType),
            (
                vec![("id", id), ("eventType", "")],
                EnvelopeError::EmptyEventType,
            ),
            (
                vec![("id", id), ("eventType", "X"), ("schemaVersion", "two")],
                EnvelopeError::NotAnInteger {
                    header: HEADER_SCHEMA_VERSION,
                    value: "two".into(),
                },
            ),
        ];
        for (headers, expected) in cases {
            assert_eq!(
                EventMetadata::from_record(&record(&headers, None)).unwrap_err(),
                expected
            );
        }
        let mut bad = record(&[("id", id)], None);
        bad.headers
            .push(("eventType".into(), Some(vec![0xff, 0xfe])));
        assert_eq!(
            EventMetadata::from_record(&bad).unwrap_err(),
            EnvelopeError::NotUtf8 {
                header: "eventType".into()
            }
        );
        match decode_record::<NoEvents>(&record(&[], Some("{}"))).unwrap_err() {
            Undecodable::Envelope(EnvelopeError::MissingId) => {}
            other => panic!("expected Envelope(MissingId), got {other:?}"),
        }
    }

    /// A decodable type that accepts nothing, for envelope tests.
    #[derive(Debug)]
    struct NoEvents;

    impl DecodeEvent for NoEvents {
        fn accepts(_: &str) -> bool {
            false
        }

        fn decode(event_type: &str, _: &[u8]) -> Result<Self, DecodeError> {
            Err(DecodeError::UnknownEventType {
                event_type: event_type.to_owned(),
                target: "NoEvents",
            })
        }
    }

    #[test]
    fn inbox_names_are_validated_and_quoted() {
        let t = InboxTable::parse("query.inbox").unwrap();
        assert_eq!(t.qualified(), "\"query\".\"inbox\"");
        assert_eq!(t.sequences(), "\"query\".\"inbox_sequences\"");
        assert_eq!(t.parked(), "\"query\".\"inbox_parked\"");
        assert!(InboxTable::parse("x; drop table y").is_err());
        assert!(InboxTable::new(None, &"a".repeat(54)).is_err());
        assert!(Inbox::new(InboxTable::default(), "").is_err());
    }
}
