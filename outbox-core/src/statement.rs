//! The driver-neutral form of an outbox write: SQL text and typed parameters.
//!
//! [`Outbox::prepare_write`](crate::Outbox::prepare_write) turns events into an [`OutboxWrite`]:
//! the statements to run, in order, on the caller's transaction. The sqlx path
//! ([`Outbox::publish_new`](crate::Outbox::publish_new)) and every adapter (`tokio-postgres`,
//! `diesel-async`, `sqlx-08`, `sea-orm`) run exactly these statements, so every database layer writes the same rows; an adapter for another
//! layer only has to bind each [`SqlParam`] to its driver's type and execute.

use uuid::Uuid;

/// One typed statement parameter. Each variant names the PostgreSQL type it must be bound as
/// (the statement's SQL casts where the column type differs, e.g. payloads are bound as `text`
/// and cast to `jsonb` by the server).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqlParam {
    /// `uuid`.
    Uuid(Uuid),
    /// `text`.
    Text(String),
    /// `text`, `NULL` when `None`.
    NullableText(Option<String>),
    /// `int4`.
    Int4(i32),
    /// `int8`, `NULL` when `None`.
    NullableInt8(Option<i64>),
    /// `uuid[]`.
    UuidArray(Vec<Uuid>),
    /// `text[]`.
    TextArray(Vec<String>),
    /// `text[]` with `NULL` elements.
    NullableTextArray(Vec<Option<String>>),
    /// `int4[]`.
    Int4Array(Vec<i32>),
    /// `int8[]` with `NULL` elements.
    NullableInt8Array(Vec<Option<i64>>),
}

/// One SQL statement of an outbox write, with its parameters `$1`, `$2`, … in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStatement {
    sql: String,
    params: Vec<SqlParam>,
}

impl OutboxStatement {
    pub(crate) fn new(sql: String, params: Vec<SqlParam>) -> Self {
        Self { sql, params }
    }

    /// The SQL text, with PostgreSQL's positional placeholders (`$1`, `$2`, …).
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The parameters; the first is `$1`.
    pub fn params(&self) -> &[SqlParam] {
        &self.params
    }
}

/// A prepared outbox write: the ids of the events and the statements that write them.
///
/// Run every statement, in order, on the **same transaction** as the business data: the events
/// are then published if and only if that transaction commits. Running them in autocommit mode
/// (outside a transaction) is the escape hatch for a service that has no business write to pair
/// them with — the events are then committed on their own, statement by statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxWrite {
    ids: Vec<Uuid>,
    statements: Vec<OutboxStatement>,
}

impl OutboxWrite {
    pub(crate) fn new(ids: Vec<Uuid>, statements: Vec<OutboxStatement>) -> Self {
        Self { ids, statements }
    }

    /// The event ids, in the order the events were given.
    pub fn ids(&self) -> &[Uuid] {
        &self.ids
    }

    /// The statements to run, in order (empty when there were no events).
    pub fn statements(&self) -> &[OutboxStatement] {
        &self.statements
    }

    /// The event ids, consuming the write.
    pub fn into_ids(self) -> Vec<Uuid> {
        self.ids
    }
}
