//! The logical source's errors: [`LogicalError`], classified as fatal or retryable
//! ([`LogicalError::is_retryable`]), and its conversions from the row acknowledgements' errors
//! and into the relay's [`SourceError`].
//!
//! Guarantee: a database error keeps its `sqlx` source (the relay decides on it by its kind);
//! every other error is fatal unless its variant is documented as retryable.

use super::DecodeError;
use crate::source::SourceError;
use crate::source::row_marks::MarkError;

/// A failure of the logical source, classified: see [`LogicalError::is_retryable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogicalError {
    /// Invalid configuration (URL, names, missing table). Fatal.
    #[error("logical source configuration: {0}")]
    Config(String),
    /// The server is not configured for logical decoding. Fatal.
    #[error(
        "PostgreSQL wal_level is '{actual}', but the logical source needs wal_level = logical \
         (set wal_level = logical in postgresql.conf and restart PostgreSQL)"
    )]
    WalLevel {
        /// The current setting (or the server's message).
        actual: String,
    },
    /// The role lacks a needed privilege. Fatal.
    #[error("role {role} lacks {missing}")]
    Privilege {
        /// The role.
        role: String,
        /// What is missing.
        missing: String,
    },
    /// The publication is unusable. Fatal.
    #[error("publication: {0}")]
    Publication(String),
    /// The slot is unusable (wrong plugin, database, type, or cannot be created). Fatal.
    #[error("replication slot: {0}")]
    Slot(String),
    /// The slot was dropped or invalidated. Fatal unless recovered (table mode).
    #[error("replication slot {slot} is LOST: {detail}")]
    SlotLost {
        /// Slot name.
        slot: String,
        /// What happened.
        detail: String,
    },
    /// Another session streams from the slot (e.g. another relay instance). Retryable.
    #[error("replication slot in use: {0}")]
    SlotInUse(String),
    /// A SQL statement failed. Retryable.
    #[error("database error while {context}: {source}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// The replication stream failed or ended. Retryable.
    #[error("replication stream: {0}")]
    Replication(String),
    /// The stream carried a message that cannot be decoded. Fatal.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl LogicalError {
    /// Whether retrying (after a pause, with a new session) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LogicalError::SlotInUse(_)
                | LogicalError::Database { .. }
                | LogicalError::Replication(_)
        )
    }
}

impl From<MarkError> for LogicalError {
    fn from(e: MarkError) -> Self {
        match e {
            MarkError::Database(source) => LogicalError::Database {
                context: "acknowledging rows in the outbox table",
                source,
            },
            other => LogicalError::Replication(other.to_string()),
        }
    }
}

impl From<LogicalError> for SourceError {
    fn from(e: LogicalError) -> Self {
        match e {
            LogicalError::Database { source, context } => {
                tracing::debug!("logical source database error while {context}");
                SourceError::Database {
                    source_name: "logical",
                    error: source,
                }
            }
            e if e.is_retryable() => SourceError::Transient(e.to_string()),
            e => SourceError::Fatal(e.to_string()),
        }
    }
}
