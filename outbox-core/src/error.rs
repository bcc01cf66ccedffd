//! Errors of the write path and the schema management.

/// Everything that can go wrong while writing to, or managing, the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configured identifier (schema, table, channel, prefix) is not acceptable.
    #[error(transparent)]
    Identifier(#[from] IdentifierError),
    /// The event could not be serialized to JSON.
    #[error("event `{event_type}` could not be serialized to JSON: {source}")]
    Serialize {
        /// The event type being written.
        event_type: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The event is not valid for the outbox (empty aggregate id, overlong names, bad trace context…).
    #[error("invalid event `{event_type}`: {reason}")]
    InvalidEvent {
        /// The event type being written.
        event_type: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The serialized payload is larger than the configured write-time limit.
    #[error(
        "payload of event `{event_type}` is {size} bytes, over the configured limit of {limit} bytes"
    )]
    PayloadTooLarge {
        /// The event type being written.
        event_type: String,
        /// The payload's size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The database refused a statement.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// `tokio-postgres` refused a statement (feature `tokio-postgres`).
    #[cfg(feature = "tokio-postgres")]
    #[error("database error (tokio-postgres): {0}")]
    TokioPostgres(#[from] tokio_postgres::Error),
    /// diesel (through diesel-async) refused a statement, or the connection's transaction
    /// manager is broken (feature `diesel-async`).
    #[cfg(feature = "diesel-async")]
    #[error("database error (diesel): {0}")]
    Diesel(#[from] diesel::result::Error),
    /// sqlx 0.8 refused a statement (feature `sqlx-08`).
    #[cfg(feature = "sqlx-08")]
    #[error("database error (sqlx 0.8): {0}")]
    Sqlx08(#[from] sqlx08::Error),
    /// sea-orm refused a statement or could not open or commit the migration's transaction
    /// (feature `sea-orm`).
    #[cfg(feature = "sea-orm")]
    #[error("database error (sea-orm): {0}")]
    SeaOrm(#[from] sea_orm::DbErr),
    /// A sea-orm connection or transaction is to another database than PostgreSQL, which has no
    /// outbox here (feature `sea-orm`). Nothing was written.
    #[cfg(feature = "sea-orm")]
    #[error(
        "the sea-orm connection is to {backend}, not PostgreSQL: the outbox is a PostgreSQL table"
    )]
    UnsupportedBackend {
        /// The backend of the connection, as sea-orm names it.
        backend: String,
    },
    /// An event was to be written on a connection that is not inside a transaction, where it
    /// would have been committed apart from the business data. Nothing was written. The sqlx
    /// path knows a transaction by sqlx's own bookkeeping (`pool.begin()`, `conn.begin()`,
    /// `Transaction`), the diesel-async path by diesel's transaction manager; a transaction
    /// opened with a raw `BEGIN` statement is not seen. For a write that has no business data to
    /// pair with, run [`crate::Outbox::prepare_write`]'s statements yourself.
    #[error(
        "the connection is not inside a transaction: an outbox event must be written in the \
         transaction of its business data (begin one with `pool.begin()` / `conn.begin()` in sqlx or \
         `conn.transaction(..)` in diesel-async, or run `Outbox::prepare_write`'s statements for a \
         deliberate autocommit write)"
    )]
    NotInTransaction,
    /// The outbox schema in the database is newer than this library knows.
    #[error(
        "outbox table {table} is at schema version {found}, newer than this library's {known}: upgrade outbox-core"
    )]
    SchemaTooNew {
        /// The qualified table name.
        table: String,
        /// The version recorded in the database.
        found: i32,
        /// The newest version this library knows.
        known: i32,
    },
}

/// A configured SQL identifier was rejected before any SQL was built with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: {reason}")]
pub struct IdentifierError {
    /// Which setting it was (e.g. "table name").
    pub what: &'static str,
    /// The rejected value (identifiers are not secrets).
    pub value: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
