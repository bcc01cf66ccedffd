//! Writing events inside the caller's transaction.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Postgres};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::OutboxEvent;
use crate::statement::{OutboxStatement, OutboxWrite, SqlParam};
use crate::table::OutboxTable;
use crate::trace::is_valid_traceparent;

/// How events are written, and so how the relay must read them.
///
/// | mode | what is written | table grows | relay source |
/// |---|---|---|---|
/// | [`Table`](WriteMode::Table) | a row per event, kept until published | until published (then per the relay's acknowledge policy) | polling or logical |
/// | [`InsertDelete`](WriteMode::InsertDelete) | a row inserted and deleted in the same transaction | never | logical only |
/// | [`LogicalMessage`](WriteMode::LogicalMessage) | `pg_logical_emit_message(true, prefix, event)` | no table needed | logical only |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum WriteMode {
    /// Rows stay in the table until the relay has published them. Works with both relay sources,
    /// and is the only mode from which a lost replication slot can be recovered without loss.
    #[default]
    Table,
    /// Insert then delete in the same transaction (Debezium's `remove-after-insert`): the WAL
    /// carries the insert, the table never grows. Requires the logical-replication source.
    InsertDelete,
    /// A transactional logical decoding message per event: no table at all. Requires the
    /// logical-replication source with `messages` enabled.
    LogicalMessage,
}

impl WriteMode {
    /// Parses `table`, `insert_delete` or `logical_message`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "table" => Some(Self::Table),
            "insert_delete" => Some(Self::InsertDelete),
            "logical_message" => Some(Self::LogicalMessage),
            _ => None,
        }
    }

    /// The configuration name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Table => "table",
            Self::InsertDelete => "insert_delete",
            Self::LogicalMessage => "logical_message",
        }
    }
}

impl fmt::Display for WriteMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The default prefix of logical decoding messages written in [`WriteMode::LogicalMessage`].
pub const DEFAULT_MESSAGE_PREFIX: &str = "outbox";

/// An event ready to be written: the envelope around a payload. Build one from a typed event with
/// [`NewEvent::from_event`], or by hand with [`NewEvent::new`] when the event is dynamic.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    id: Option<Uuid>,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: Option<Value>,
    headers: BTreeMap<String, String>,
    traceparent: Option<String>,
    schema_version: i32,
    topic: Option<String>,
    aggregate_seq: Option<i64>,
}

impl NewEvent {
    /// An event with the four routing fields and a JSON payload (`None` publishes a null value).
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: Option<Value>,
    ) -> Self {
        Self {
            id: None,
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload,
            headers: BTreeMap::new(),
            traceparent: None,
            schema_version: 1,
            topic: None,
            aggregate_seq: None,
        }
    }

    /// The envelopes of typed events, in order: what every `publish_all…` call writes. Fails on
    /// the first event whose payload does not serialize, before anything is written.
    pub(crate) fn from_events<'e, E, I>(events: I) -> Result<Vec<Self>>
    where
        E: OutboxEvent + ?Sized + 'e,
        I: IntoIterator<Item = &'e E>,
    {
        events.into_iter().map(Self::from_event).collect()
    }

    /// The envelope of a typed event, with its payload serialized.
    pub fn from_event<E: OutboxEvent + ?Sized>(event: &E) -> Result<Self> {
        let payload = event.to_payload().map_err(|source| Error::Serialize {
            event_type: event.event_type().to_owned(),
            source,
        })?;
        let mut new = Self::new(
            event.aggregate_type(),
            event.aggregate_id(),
            event.event_type(),
            Some(payload),
        );
        new.schema_version = event.schema_version();
        new.topic = event.topic().map(str::to_owned);
        new.aggregate_seq = event.aggregate_sequence();
        new.id = event.event_id();
        new.headers.extend(event.headers());
        if let Some(key) = event.message_key() {
            new = new.with_key(key);
        }
        Ok(new)
    }

    /// Uses this event id instead of a fresh time-ordered UUIDv7 (e.g. a client-supplied
    /// idempotency key). A duplicate id fails the insert, and so the caller's transaction.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }

    /// Keys the broker record by `key` instead of the aggregate id, through the
    /// [`KEY_HEADER`](crate::KEY_HEADER) header (see there for what the relay does with it).
    pub fn with_key(self, key: impl Into<String>) -> Self {
        self.with_header(crate::event::KEY_HEADER, key)
    }

    /// Adds a Kafka header published with the event.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the W3C `traceparent` of the operation that produced the event; it travels to Kafka
    /// as the `traceparent` header. Must be well-formed, or the write fails.
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Sets the payload schema version (default 1).
    pub fn with_schema_version(mut self, version: i32) -> Self {
        self.schema_version = version;
        self
    }

    /// Sends the event to this topic instead of the relay's routed topic.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Records the event's position in its aggregate's stream.
    pub fn with_aggregate_seq(mut self, seq: i64) -> Self {
        self.aggregate_seq = Some(seq);
        self
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidEvent {
            event_type: self.event_type.clone(),
            reason: reason.into(),
        }
    }

    fn validate(&self) -> Result<()> {
        for (what, value) in [
            ("aggregate type", &self.aggregate_type),
            ("aggregate id", &self.aggregate_id),
            ("event type", &self.event_type),
        ] {
            if value.is_empty() {
                return Err(self.invalid(format!("{what} is empty")));
            }
            if value.len() > 255 {
                return Err(self.invalid(format!("{what} is longer than 255 bytes")));
            }
        }
        if let Some(tp) = &self.traceparent
            && !is_valid_traceparent(tp)
        {
            return Err(self.invalid(format!("`{tp}` is not a W3C traceparent")));
        }
        if let Some(topic) = &self.topic
            && let Err(reason) = crate::topic::validate_topic(topic)
        {
            return Err(self.invalid(format!("topic `{topic}`: {reason}")));
        }
        if self.schema_version < 1 {
            return Err(self.invalid("schema version must be at least 1"));
        }
        for name in self.headers.keys() {
            if name.is_empty() {
                return Err(self.invalid("a header name is empty"));
            }
        }
        Ok(())
    }
}

/// Captures the current trace context (a W3C `traceparent`) when an event is written.
pub type TraceContextProvider = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The write side of the outbox: where and how events are written.
///
/// Cheap to clone; build one at start-up and share it. Every write goes through the connection
/// the caller passes — normally its open transaction (`&mut *tx`) — so the events commit or roll
/// back with the business data. That is the whole guarantee of the pattern: **no event without its
/// state change, no state change without its event**.
#[derive(Clone)]
pub struct Outbox {
    table: OutboxTable,
    mode: WriteMode,
    message_prefix: String,
    max_payload_bytes: Option<usize>,
    trace_context: Option<TraceContextProvider>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("table", &self.table)
            .field("mode", &self.mode)
            .field("message_prefix", &self.message_prefix)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("trace_context", &self.trace_context.is_some())
            .finish()
    }
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(OutboxTable::default())
    }
}

impl Outbox {
    /// An outbox writing rows to `table` ([`WriteMode::Table`]).
    pub fn new(table: OutboxTable) -> Self {
        Self {
            table,
            mode: WriteMode::Table,
            message_prefix: DEFAULT_MESSAGE_PREFIX.to_owned(),
            max_payload_bytes: None,
            trace_context: None,
        }
    }

    /// Selects the write mode (see [`WriteMode`]); the relay must be configured to match.
    pub fn with_write_mode(mut self, mode: WriteMode) -> Self {
        self.mode = mode;
        self
    }

    /// The prefix of logical decoding messages in [`WriteMode::LogicalMessage`] (default
    /// `outbox`); validated like an identifier.
    pub fn with_message_prefix(mut self, prefix: &str) -> Result<Self> {
        crate::table::Identifier::parse("logical message prefix", prefix)?;
        self.message_prefix = prefix.to_owned();
        Ok(self)
    }

    /// Refuses, at write time, payloads whose JSON is longer than `bytes` — set it a little below
    /// the broker's `message.max.bytes` so an event that Kafka would reject never commits.
    pub fn with_max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = Some(bytes);
        self
    }

    /// Captures the current trace context into every event that has none, e.g. from
    /// OpenTelemetry's current span.
    pub fn with_trace_context(
        mut self,
        provider: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.trace_context = Some(Arc::new(provider));
        self
    }

    /// The table this outbox writes to.
    pub fn table(&self) -> &OutboxTable {
        &self.table
    }

    /// The write mode.
    pub fn write_mode(&self) -> WriteMode {
        self.mode
    }

    /// Creates or upgrades the outbox table (see [`crate::migrate()`]). Not needed in
    /// [`WriteMode::LogicalMessage`].
    pub async fn migrate(&self, conn: &mut PgConnection) -> Result<crate::MigrationReport> {
        crate::migrate::migrate(conn, &self.table).await
    }

    /// Writes one typed event through `conn` (pass your transaction as `&mut tx`) and returns its
    /// event id. The event is published if and only if that transaction commits.
    ///
    /// `conn` must be inside a transaction begun through sqlx (`pool.begin()`, `conn.begin()`):
    /// on a connection in autocommit the write is refused with [`Error::NotInTransaction`] before
    /// any statement is sent, since the event would be committed apart from the business data.
    pub async fn publish<E: OutboxEvent + ?Sized>(
        &self,
        conn: &mut PgConnection,
        event: &E,
    ) -> Result<Uuid> {
        let ids = self
            .publish_new(conn, vec![NewEvent::from_event(event)?])
            .await?;
        Ok(ids[0])
    }

    /// Writes several typed events in one statement, in order; returns their ids in the same order.
    /// Events of one aggregate are published in this order. Refused outside a transaction, as
    /// [`Outbox::publish`].
    pub async fn publish_all<'e, E, I>(
        &self,
        conn: &mut PgConnection,
        events: I,
    ) -> Result<Vec<Uuid>>
    where
        E: OutboxEvent + ?Sized + 'e,
        I: IntoIterator<Item = &'e E>,
    {
        let events = NewEvent::from_events(events)?;
        self.publish_new(conn, events).await
    }

    /// Writes prepared envelopes in one statement, in order; returns their ids in the same order.
    /// Refused outside a transaction, as [`Outbox::publish`].
    pub async fn publish_new(
        &self,
        conn: &mut PgConnection,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Uuid>> {
        if !conn.is_in_transaction() {
            return Err(Error::NotInTransaction);
        }
        let write = self.prepare_write(events)?;
        for statement in write.statements() {
            let mut query = sqlx::query(AssertSqlSafe(statement.sql()));
            for param in statement.params() {
                query = bind_sqlx(query, param);
            }
            query.execute(&mut *conn).await?;
        }
        Ok(write.into_ids())
    }

    /// The driver-neutral form of a write: validates the events, assigns their ids and builds the
    /// statements that write them in this outbox's [`WriteMode`], without touching a database.
    ///
    /// [`Outbox::publish_new`] (sqlx) and the `tokio-postgres` adapter run exactly these
    /// statements; use it to write through another database layer (bind each [`SqlParam`] as the
    /// type it names and run the statements in order on the caller's transaction). Ambient trace
    /// context ([`Outbox::with_trace_context`]) is captured here, at preparation.
    pub fn prepare_write(&self, events: Vec<NewEvent>) -> Result<OutboxWrite> {
        if events.is_empty() {
            return Ok(OutboxWrite::new(Vec::new(), Vec::new()));
        }
        let batch = self.prepare(events)?;
        let ids = batch.ids.clone();
        let statements = match self.mode {
            WriteMode::Table => vec![self.insert_statement(batch)],
            WriteMode::InsertDelete => {
                let delete = OutboxStatement::new(
                    format!("DELETE FROM {} WHERE id = ANY($1)", self.table.qualified()),
                    vec![SqlParam::UuidArray(ids.clone())],
                );
                vec![self.insert_statement(batch), delete]
            }
            WriteMode::LogicalMessage => vec![self.emit_statement(batch)],
        };
        Ok(OutboxWrite::new(ids, statements))
    }

    fn prepare(&self, events: Vec<NewEvent>) -> Result<Batch> {
        let mut b = Batch::with_capacity(events.len());
        let ambient = self.trace_context.as_ref().and_then(|f| f());
        for mut ev in events {
            if ev.traceparent.is_none() {
                ev.traceparent = ambient.clone().filter(|tp| is_valid_traceparent(tp));
            }
            ev.validate()?;
            let payload = ev
                .payload
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|source| Error::Serialize {
                    event_type: ev.event_type.clone(),
                    source,
                })?;
            if let (Some(limit), Some(p)) = (self.max_payload_bytes, &payload)
                && p.len() > limit
            {
                return Err(Error::PayloadTooLarge {
                    event_type: ev.event_type.clone(),
                    size: p.len(),
                    limit,
                });
            }
            b.ids.push(ev.id.unwrap_or_else(Uuid::now_v7));
            b.headers
                .push(serde_json::to_string(&ev.headers).expect("string map serializes to JSON"));
            b.aggregate_types.push(ev.aggregate_type);
            b.aggregate_ids.push(ev.aggregate_id);
            b.event_types.push(ev.event_type);
            b.payloads.push(payload);
            b.traceparents.push(ev.traceparent);
            b.schema_versions.push(ev.schema_version);
            b.topics.push(ev.topic);
            b.aggregate_seqs.push(ev.aggregate_seq);
        }
        Ok(b)
    }

    fn insert_statement(&self, mut b: Batch) -> OutboxStatement {
        if b.ids.len() == 1 {
            // The common case, one event per business transaction: plain parameters cost the
            // server less than decoding ten arrays and sorting one row.
            let sql = format!(
                "INSERT INTO {} (id, aggregatetype, aggregateid, type, payload, tracingspancontext,
                                 headers, schema_version, topic, aggregate_seq)
                 VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7::text::jsonb, $8, $9, $10)",
                self.table.qualified()
            );
            let params = vec![
                SqlParam::Uuid(b.ids[0]),
                SqlParam::Text(b.aggregate_types.remove(0)),
                SqlParam::Text(b.aggregate_ids.remove(0)),
                SqlParam::Text(b.event_types.remove(0)),
                SqlParam::NullableText(b.payloads.remove(0)),
                SqlParam::NullableText(b.traceparents.remove(0)),
                SqlParam::Text(b.headers.remove(0)),
                SqlParam::Int4(b.schema_versions[0]),
                SqlParam::NullableText(b.topics.remove(0)),
                SqlParam::NullableInt8(b.aggregate_seqs[0]),
            ];
            return OutboxStatement::new(sql, params);
        }
        // One round trip for the whole batch; WITH ORDINALITY keeps the caller's order, which
        // becomes the `seq` order and so the publish order.
        let sql = format!(
            "INSERT INTO {} (id, aggregatetype, aggregateid, type, payload, tracingspancontext,
                             headers, schema_version, topic, aggregate_seq)
             SELECT id, aggregatetype, aggregateid, type, payload::jsonb, tracingspancontext,
                    headers::jsonb, schema_version, topic, aggregate_seq
             {}",
            self.table.qualified(),
            Batch::unnest(1)
        );
        OutboxStatement::new(sql, b.into_column_params())
    }

    fn emit_statement(&self, b: Batch) -> OutboxStatement {
        // The message carries the same fields as a row, under the same names; the payload is
        // rendered by PostgreSQL's jsonb output like a table row's.
        let sql = format!(
            "SELECT pg_logical_emit_message(true, $1, json_build_object(
                 'id', id, 'aggregatetype', aggregatetype, 'aggregateid', aggregateid,
                 'type', type, 'payload', payload::jsonb, 'tracingspancontext', tracingspancontext,
                 'headers', headers::jsonb, 'schema_version', schema_version, 'topic', topic,
                 'aggregate_seq', aggregate_seq, 'created_at', now())::text)
             {}",
            Batch::unnest(2)
        );
        let mut params = vec![SqlParam::Text(self.message_prefix.clone())];
        params.extend(b.into_column_params());
        OutboxStatement::new(sql, params)
    }
}

/// Binds one driver-neutral parameter to a sqlx query, as the PostgreSQL type it names.
fn bind_sqlx<'q>(
    query: Query<'q, Postgres, PgArguments>,
    param: &SqlParam,
) -> Query<'q, Postgres, PgArguments> {
    match param {
        SqlParam::Uuid(v) => query.bind(*v),
        SqlParam::Text(v) => query.bind(v.as_str()),
        SqlParam::NullableText(v) => query.bind(v.as_deref()),
        SqlParam::Int4(v) => query.bind(*v),
        SqlParam::NullableInt8(v) => query.bind(*v),
        SqlParam::UuidArray(v) => query.bind(v.as_slice()),
        SqlParam::TextArray(v) => query.bind(v.as_slice()),
        SqlParam::NullableTextArray(v) => query.bind(v.as_slice()),
        SqlParam::Int4Array(v) => query.bind(v.as_slice()),
        SqlParam::NullableInt8Array(v) => query.bind(v.as_slice()),
    }
}

/// Column arrays of a prepared batch.
#[derive(Default)]
struct Batch {
    ids: Vec<Uuid>,
    aggregate_types: Vec<String>,
    aggregate_ids: Vec<String>,
    event_types: Vec<String>,
    payloads: Vec<Option<String>>,
    traceparents: Vec<Option<String>>,
    headers: Vec<String>,
    schema_versions: Vec<i32>,
    topics: Vec<Option<String>>,
    aggregate_seqs: Vec<Option<i64>>,
}

impl Batch {
    /// The `FROM` clause that turns the ten column arrays, bound as parameters `$first` to
    /// `$first + 9` (see [`Batch::into_column_params`]), into rows `e(...)` in the caller's order.
    fn unnest(first: usize) -> String {
        let types = [
            "uuid", "text", "text", "text", "text", "text", "text", "int4", "text", "int8",
        ];
        let params: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::{t}[]", first + i))
            .collect();
        format!(
            "FROM UNNEST({})
                  WITH ORDINALITY AS e(id, aggregatetype, aggregateid, type, payload,
                                       tracingspancontext, headers, schema_version, topic,
                                       aggregate_seq, ord)
             ORDER BY ord",
            params.join(", ")
        )
    }

    /// The ten column arrays as parameters, in the order [`Batch::unnest`] expects them.
    fn into_column_params(self) -> Vec<SqlParam> {
        vec![
            SqlParam::UuidArray(self.ids),
            SqlParam::TextArray(self.aggregate_types),
            SqlParam::TextArray(self.aggregate_ids),
            SqlParam::TextArray(self.event_types),
            SqlParam::NullableTextArray(self.payloads),
            SqlParam::NullableTextArray(self.traceparents),
            SqlParam::TextArray(self.headers),
            SqlParam::Int4Array(self.schema_versions),
            SqlParam::NullableTextArray(self.topics),
            SqlParam::NullableInt8Array(self.aggregate_seqs),
        ]
    }

    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            aggregate_types: Vec::with_capacity(n),
            aggregate_ids: Vec::with_capacity(n),
            event_types: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            traceparents: Vec::with_capacity(n),
            headers: Vec::with_capacity(n),
            schema_versions: Vec::with_capacity(n),
            topics: Vec::with_capacity(n),
            aggregate_seqs: Vec::with_capacity(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(n: usize) -> Vec<NewEvent> {
        (0..n)
            .map(|i| NewEvent::new("order", i.to_string(), "Placed", None))
            .collect()
    }

    #[test]
    fn one_event_is_one_insert_with_ten_plain_parameters() {
        let id = Uuid::now_v7();
        let write = Outbox::default()
            .prepare_write(vec![events(1).remove(0).with_id(id).with_key("k")])
            .unwrap();
        assert_eq!(write.ids(), [id]);
        let [insert] = write.statements() else {
            panic!("{write:?}")
        };
        assert!(insert.sql().contains("VALUES ($1,"), "{}", insert.sql());
        assert_eq!(insert.params().len(), 10);
        assert_eq!(insert.params()[0], SqlParam::Uuid(id));
        assert_eq!(
            insert.params()[6],
            SqlParam::Text(r#"{"outbox-key":"k"}"#.into())
        );
    }

    #[test]
    fn a_batch_is_one_insert_of_ten_column_arrays_in_order() {
        let write = Outbox::default().prepare_write(events(3)).unwrap();
        let [insert] = write.statements() else {
            panic!("{write:?}")
        };
        assert!(
            insert.sql().contains("UNNEST($1::uuid[]"),
            "{}",
            insert.sql()
        );
        assert_eq!(
            insert.params()[0],
            SqlParam::UuidArray(write.ids().to_vec())
        );
        assert_eq!(
            insert.params()[2],
            SqlParam::TextArray(vec!["0".into(), "1".into(), "2".into()])
        );
        assert_eq!(insert.params().len(), 10);
    }

    #[test]
    fn the_logical_modes_add_a_delete_or_emit_messages_instead() {
        let write = Outbox::default()
            .with_write_mode(WriteMode::InsertDelete)
            .prepare_write(events(2))
            .unwrap();
        let [_, delete] = write.statements() else {
            panic!("{write:?}")
        };
        assert!(delete.sql().starts_with("DELETE FROM"), "{}", delete.sql());
        assert_eq!(delete.params(), [SqlParam::UuidArray(write.ids().to_vec())]);

        let write = Outbox::default()
            .with_write_mode(WriteMode::LogicalMessage)
            .prepare_write(events(1))
            .unwrap();
        let [emit] = write.statements() else {
            panic!("{write:?}")
        };
        assert!(emit.sql().contains("pg_logical_emit_message(true, $1"));
        assert_eq!(emit.params()[0], SqlParam::Text("outbox".into()));
        assert_eq!(emit.params().len(), 11);
    }

    #[test]
    fn no_events_is_no_statement_and_a_bad_event_is_refused_before_sql() {
        assert!(
            Outbox::default()
                .prepare_write(Vec::new())
                .unwrap()
                .statements()
                .is_empty()
        );
        let err = Outbox::default()
            .prepare_write(vec![NewEvent::new("order", "", "Placed", None)])
            .unwrap_err();
        assert!(err.to_string().contains("aggregate id is empty"), "{err}");
    }
}
