//! Decoder for the `pgoutput` logical decoding output plugin, protocol version 1.
//!
//! Only what the outbox needs is decoded in full: `Begin`, `Commit`, `Relation`, `Insert` (text
//! tuple data) and logical decoding `Message`s. `Update`, `Delete` and `Truncate` are recognised
//! (their relation id is kept so they can be logged and ignored); `Origin` and `Type` are skipped.
//!
//! Every read is bounds-checked: a malformed or truncated buffer yields a [`DecodeError`], never a
//! panic, whatever bytes arrive from the network.

mod parse;
mod relation;
#[cfg(test)]
pub(crate) mod tests;

use std::fmt;

pub use parse::decode;
pub use relation::{Relation, RelationColumn, TupleValue};

/// A PostgreSQL log sequence number (byte position in the WAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid / "start from the slot's confirmed position" LSN.
    pub const ZERO: Lsn = Lsn(0);

    /// Parse PostgreSQL's `X/Y` text form (as returned by `pg_lsn` columns).
    pub fn parse(text: &str) -> Option<Lsn> {
        let (hi, lo) = text.trim().split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A `pgoutput` message could not be decoded: the stream is corrupt or speaks another protocol
/// version. Not retryable on the same data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput decode error in {message} message: {reason}")]
pub struct DecodeError {
    /// Which message kind was being decoded.
    pub message: &'static str,
    /// What was wrong.
    pub reason: String,
}

/// A decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// Start of a committed transaction.
    Begin {
        /// LSN of the commit record (the transaction's commit LSN).
        final_lsn: Lsn,
        /// Commit timestamp, microseconds since 2000-01-01.
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// Flags (unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End LSN of the transaction: the position to confirm once it is fully processed.
        end_lsn: Lsn,
        /// Commit timestamp, microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    /// Replication origin of the transaction (ignored).
    Origin,
    /// Table schema.
    Relation(Relation),
    /// Custom type description (ignored).
    Type,
    /// A row inserted into a published table.
    Insert {
        /// Relation OID.
        relation_id: u32,
        /// The new tuple.
        tuple: Vec<TupleValue>,
    },
    /// A row updated in a published table (ignored by the outbox: updates mark publication).
    Update {
        /// Relation OID.
        relation_id: u32,
    },
    /// A row deleted from a published table (ignored: the `insert_delete` write mode's delete).
    Delete {
        /// Relation OID.
        relation_id: u32,
    },
    /// Tables truncated (ignored).
    Truncate {
        /// Relation OIDs.
        relation_ids: Vec<u32>,
    },
    /// A logical decoding message from `pg_logical_emit_message`.
    Message {
        /// Emitted with `transactional = true` (delivered inside its transaction).
        transactional: bool,
        /// LSN of the message record.
        lsn: Lsn,
        /// Application prefix.
        prefix: String,
        /// Raw content.
        content: Vec<u8>,
    },
}
