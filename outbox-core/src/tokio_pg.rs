//! The `tokio-postgres` adapter (feature `tokio-postgres`): writes events on the caller's
//! [`tokio_postgres::Transaction`], and so on deadpool-postgres' and bb8-postgres' pooled clients,
//! whose transactions are `tokio_postgres` transactions.

use ::tokio_postgres::types::{ToSql, Type};
use ::tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use crate::error::Result;
use crate::event::OutboxEvent;
use crate::migrate::{
    LOCK_SQL, MigrationReport, MigrationRun, SCHEMA_VERSION, log_applied, pending_steps,
};
use crate::statement::{OutboxWrite, SqlParam};
use crate::write::{NewEvent, Outbox};

impl Outbox {
    /// Creates this outbox's table or upgrades it to [`SCHEMA_VERSION`] through a
    /// `tokio-postgres` client: the `tokio-postgres` counterpart of [`Outbox::migrate`], so a
    /// service on `tokio-postgres` (or deadpool-postgres, bb8-postgres: their pooled clients deref
    /// to a [`Client`]) needs neither sqlx nor `outbox-relay migrate` to create the table.
    ///
    /// Guarantee: the same statements as [`crate::migrate()`], recorded in the same
    /// `_outbox_migrations` history under the same transaction-scoped advisory lock, so the two
    /// drivers and the relay's `migrate` command can run concurrently and each step is applied
    /// exactly once; idempotent (a second call applies nothing); all steps of a call in one
    /// transaction (a failure leaves the previous version intact); fails with
    /// [`crate::Error::SchemaTooNew`] rather than touching a table migrated by a newer version.
    /// Not needed in [`crate::WriteMode::LogicalMessage`].
    ///
    /// ```no_run
    /// # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), outbox_core::Error> {
    /// let outbox = outbox_core::Outbox::default();
    /// let report = outbox.migrate_tokio_postgres(client).await?;
    /// println!("outbox table at version {} (applied {:?})", report.version, report.applied);
    /// # Ok(()) }
    /// ```
    pub async fn migrate_tokio_postgres(&self, client: &mut Client) -> Result<MigrationReport> {
        let table = self.table();
        let name = table.name().as_str();
        let run = MigrationRun::outbox(table);
        let tx = client.transaction().await?;
        tx.execute(LOCK_SQL, &[&run.lock_key]).await?;
        for statement in &run.setup {
            tx.batch_execute(statement).await?;
        }
        let current: Option<i32> = tx.query_one(&run.current_version, &[&name]).await?.get(0);
        let mut applied = Vec::new();
        for step in pending_steps(table, current.unwrap_or(0))? {
            for statement in &step.statements {
                // One statement each, without parameters: the simple protocol, one round trip.
                tx.batch_execute(statement).await?;
            }
            tx.execute(&run.record, &[&name, &step.version, &step.description])
                .await?;
            log_applied(table, &step);
            applied.push(step.version);
        }
        tx.commit().await?;
        Ok(MigrationReport {
            applied,
            version: SCHEMA_VERSION,
        })
    }

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
        let events = NewEvent::from_events(events)?;
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
