//! Parked events: events that can never be produced, and the events of the same aggregate held
//! behind them.
//!
//! An event whose topic is illegal, or that Kafka refuses for good (too large, topic not allowed),
//! would otherwise stall every aggregate behind it. The relay instead moves it to the
//! `<table>_parked` table with the reason, and parks every later event of **the same aggregate**
//! behind it (`blocked_by`), so that aggregate's order survives while all other aggregates keep
//! flowing. A transient problem (broker down, timeouts, leader elections) never parks anything:
//! it makes the relay retry the batch.
//!
//! Operators list, retry (after fixing the cause, e.g. raising the size limit) or drop parked
//! events with `outbox-relay parked …`; a retry publishes an aggregate's parked events in their
//! original order before the aggregate is unblocked.
//!
//! The pipeline parks through a [`ParkStore`], beside its source; the statements themselves are
//! in [`crate::table`].

use std::collections::HashMap;

use outbox_core::OutboxTable;
use uuid::Uuid;

use crate::failure::ErrorKind;
use crate::leader::{LeaderSession, LeadershipEnded};
pub use crate::table::{AggregateKey, ParkRequest, ParkedEvent};

/// Why parking, or reading which aggregates are held, failed.
#[derive(Debug, thiserror::Error)]
pub enum ParkError {
    /// The statement failed; retrying may help.
    #[error("database error in the park store")]
    Database(#[from] sqlx::Error),
    /// `<table>_parked` does not exist: nothing can be parked until it is migrated.
    #[error(
        "cannot park {events} event(s): the parked-events table {table} does not exist; run `outbox-relay migrate` (also needed in logical_message mode)"
    )]
    MissingTable {
        /// How many events were to be parked.
        events: usize,
        /// The parked-events table, quoted.
        table: String,
    },
    /// The leadership whose session parks was dropped.
    #[error(transparent)]
    LeadershipEnded(#[from] LeadershipEnded),
}

impl ParkError {
    /// What kind of failure this is ([`crate::failure`]): a missing table needs an operator;
    /// anything else is transient.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ParkError::MissingTable { .. } => ErrorKind::Setup,
            ParkError::Database(_) | ParkError::LeadershipEnded(_) => ErrorKind::Unavailable,
        }
    }
}

/// The parked events of one outbox table, as the pipeline sees them while it leads.
///
/// Guarantees:
/// - **Fenced.** Every statement runs on the leader lock's session ([`LeaderSession`]): once the
///   leadership is gone nothing runs at all.
/// - **Durable before acknowledged.** [`ParkStore::park`] returns once the events are committed
///   in `<table>_parked`; the pipeline calls it before the source's `acknowledge` covers them, so
///   no source position ever passes an event that is neither published nor parked.
/// - **Loud when not migrated.** Parking into a missing `<table>_parked` table fails with an
///   error naming `outbox-relay migrate`; without the table no aggregate is held. A positive
///   answer to "does the table exist" is remembered for the store's life.
#[derive(Debug)]
pub struct ParkStore {
    table: OutboxTable,
    session: LeaderSession,
    /// `<table>_parked` is known to exist.
    table_exists: bool,
}

impl ParkStore {
    /// The park store of `table`, writing through the leader's `session`.
    pub fn new(table: OutboxTable, session: LeaderSession) -> Self {
        Self {
            table,
            session,
            table_exists: false,
        }
    }

    /// Durably parks events that cannot be published; call it before the source's
    /// acknowledgement covers them.
    pub async fn park(&mut self, requests: &[ParkRequest]) -> Result<(), ParkError> {
        if requests.is_empty() {
            return Ok(());
        }
        if !self.table_exists().await? {
            return Err(ParkError::MissingTable {
                events: requests.len(),
                table: self.table.parked_qualified(),
            });
        }
        let mut conn = self.session.connection().await?;
        crate::table::park(&mut conn, &self.table, requests).await?;
        Ok(())
    }

    /// The aggregates with parked events, each with the id of its first parked event: their new
    /// events must be parked behind it. None when the parked-events table does not exist.
    pub async fn blocked_aggregates(&mut self) -> Result<HashMap<AggregateKey, Uuid>, ParkError> {
        if !self.table_exists().await? {
            return Ok(HashMap::new());
        }
        let mut conn = self.session.connection().await?;
        Ok(crate::table::blocked_aggregates(&mut conn, &self.table).await?)
    }

    /// Whether `<table>_parked` exists; a positive answer is remembered.
    async fn table_exists(&mut self) -> Result<bool, ParkError> {
        if self.table_exists {
            return Ok(true);
        }
        let mut conn = self.session.connection().await?;
        self.table_exists = crate::table::parked_table_exists(&mut conn, &self.table).await?;
        Ok(self.table_exists)
    }
}
