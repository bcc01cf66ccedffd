//! The logical source's errors: [`LogicalError`], each with its [`ErrorKind`] for the relay's one
//! error policy ([`crate::failure`]), and its conversion into the relay's [`SourceError`].
//!
//! Guarantee: an error keeps its cause (`sqlx`, the row acknowledgements' [`MarkError`]) as its
//! source; every error is fatal unless its kind restarts the source.

use super::DecodeError;
use crate::failure::ErrorKind;
use crate::source::SourceError;
use crate::source::row_marks::MarkError;

/// A failure of the logical source, classified by [`LogicalError::kind`].
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
    #[error("database error while {context}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// Acknowledging delivered rows failed (`table` mode). Retryable unless the lease is lost.
    #[error(transparent)]
    Marks(#[from] MarkError),
    /// The replication stream failed or ended. Retryable.
    #[error("replication stream: {0}")]
    Replication(String),
    /// The stream carried a message that cannot be decoded. Fatal.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl LogicalError {
    /// What kind of failure this is ([`crate::failure`]). A lost slot is reported as not
    /// recoverable here; the source itself decides whether it can recover from the table.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LogicalError::Config(_) => ErrorKind::Config,
            LogicalError::WalLevel { .. }
            | LogicalError::Privilege { .. }
            | LogicalError::Publication(_)
            | LogicalError::Slot(_) => ErrorKind::Setup,
            LogicalError::SlotLost { .. } => ErrorKind::SlotLost { recoverable: false },
            LogicalError::SlotInUse(_) => ErrorKind::Contended,
            LogicalError::Database { .. } | LogicalError::Replication(_) => ErrorKind::Unavailable,
            LogicalError::Marks(e) => e.kind(),
            LogicalError::Decode(_) => ErrorKind::Contract,
        }
    }

    /// Whether retrying (after a pause, with a new session) may succeed: the policy's
    /// [`ErrorKind::restarts_source`].
    pub fn is_retryable(&self) -> bool {
        self.kind().restarts_source()
    }
}

impl From<LogicalError> for SourceError {
    fn from(e: LogicalError) -> Self {
        SourceError::new("logical", e.kind(), e)
    }
}
