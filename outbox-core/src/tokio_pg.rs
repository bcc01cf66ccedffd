//! The `tokio-postgres` adapter (feature `tokio-postgres`): writes events on the caller's
//! [`tokio_postgres::Transaction`], and so on deadpool-postgres' and bb8-postgres' pooled clients,
//! whose transactions are `tokio_postgres` transactions.

use ::tokio_postgres::Transaction;
use ::tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::error::Result;
use crate::event::OutboxEvent;
use crate::statement::{OutboxWrite, SqlParam};
use crate::write::{NewEvent, Outbox};

impl Outbox {
    /// Writes one typed event in `tx` and returns its event id; the event is published if and
    /// only if `tx` commits. The `tokio-postgres` counterpart of [`Outbox::publish`].
    ///
    /// Only a transaction is accepted, so the event cannot be written apart from the business
    /// data by mistake. The escape hatch, for a write that has no business data to pair with, is
    /// [`Outbox::prepare_write`]: run its statements on any client (see [`OutboxWrite`]).
    ///
    /// ```no_run
    /// # async fn demo(client: &mut tokio_postgres::Client, event: &impl outbox_core::OutboxEvent)
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// let outbox = outbox_core::Outbox::default();
    /// let tx = client.transaction().await?;
    /// tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[]).await?;
    /// outbox.publish_tokio_postgres(&tx, event).await?;
    /// tx.commit().await?; // the update and its event, or neither
    /// # Ok(()) }
    /// ```
    pub async fn publish_tokio_postgres<E: OutboxEvent + ?Sized>(
        &self,
        tx: &Transaction<'_>,
        event: &E,
    ) -> Result<Uuid> {
        let ids = self
            .publish_new_tokio_postgres(tx, vec![NewEvent::from_event(event)?])
            .await?;
        Ok(ids[0])
    }

    /// Writes several typed events in `tx` in one statement, in order; returns their ids in the
    /// same order. The `tokio-postgres` counterpart of [`Outbox::publish_all`].
    pub async fn publish_all_tokio_postgres<'e, E, I>(
        &self,
        tx: &Transaction<'_>,
        events: I,
    ) -> Result<Vec<Uuid>>
    where
        E: OutboxEvent + ?Sized + 'e,
        I: IntoIterator<Item = &'e E>,
    {
        let events = events
            .into_iter()
            .map(NewEvent::from_event)
            .collect::<Result<Vec<_>>>()?;
        self.publish_new_tokio_postgres(tx, events).await
    }

    /// Writes prepared envelopes in `tx` in one statement, in order; returns their ids in the
    /// same order. The `tokio-postgres` counterpart of [`Outbox::publish_new`].
    pub async fn publish_new_tokio_postgres(
        &self,
        tx: &Transaction<'_>,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Uuid>> {
        let write = self.prepare_write(events)?;
        execute(tx, &write).await?;
        Ok(write.into_ids())
    }
}

/// Runs the statements of `write` on `tx`, each in one round trip (the parameter types are sent
/// with the statement, so no separate prepare is needed).
async fn execute(tx: &Transaction<'_>, write: &OutboxWrite) -> Result<()> {
    for statement in write.statements() {
        let params: Vec<(&(dyn ToSql + Sync), Type)> =
            statement.params().iter().map(typed).collect();
        tx.execute_typed(statement.sql(), &params).await?;
    }
    Ok(())
}

/// A parameter as `tokio-postgres` binds it, with the PostgreSQL type its variant names.
fn typed(param: &SqlParam) -> (&(dyn ToSql + Sync), Type) {
    match param {
        SqlParam::Uuid(v) => (v, Type::UUID),
        SqlParam::Text(v) => (v, Type::TEXT),
        SqlParam::NullableText(v) => (v, Type::TEXT),
        SqlParam::Int4(v) => (v, Type::INT4),
        SqlParam::NullableInt8(v) => (v, Type::INT8),
        SqlParam::UuidArray(v) => (v, Type::UUID_ARRAY),
        SqlParam::TextArray(v) => (v, Type::TEXT_ARRAY),
        SqlParam::NullableTextArray(v) => (v, Type::TEXT_ARRAY),
        SqlParam::Int4Array(v) => (v, Type::INT4_ARRAY),
        SqlParam::NullableInt8Array(v) => (v, Type::INT8_ARRAY),
    }
}
