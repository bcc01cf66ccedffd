//! The sqlx 0.8 adapter (feature `sqlx-08`): writes events on the caller's sqlx 0.8
//! `Transaction<'_, Postgres>`, for a service that has not moved to sqlx 0.9 yet.
//!
//! sqlx 0.8 is a separate dependency (`sqlx08`, the `sqlx` package at 0.8) with only its
//! `postgres`, `runtime-tokio` and `uuid` features: no TLS backend is forced on the service, whose
//! own sqlx 0.8 features (e.g. `tls-rustls`) apply, as Cargo unifies them.

use sqlx08::postgres::PgArguments;
use sqlx08::query::Query;
use sqlx08::{Connection, PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::error::Result;
use crate::event::OutboxEvent;
use crate::migrate::{
    LOCK_SQL, MigrationReport, MigrationRun, SCHEMA_VERSION, log_applied, pending_steps,
};
use crate::statement::{OutboxWrite, SqlParam};
use crate::write::{NewEvent, Outbox};

impl Outbox {
    /// Creates this outbox's table or upgrades it to [`SCHEMA_VERSION`] through a sqlx 0.8
    /// connection: the sqlx 0.8 counterpart of [`Outbox::migrate`], so a service on sqlx 0.8
    /// needs neither sqlx 0.9 connections nor `outbox-relay migrate` to create the table.
    ///
    /// Guarantee: the same statements as [`crate::migrate()`], recorded in the same
    /// `_outbox_migrations` history under the same transaction-scoped advisory lock, so every
    /// driver and the relay's `migrate` command can run concurrently and each step is applied
    /// exactly once; idempotent (a second call applies nothing); all steps of a call in one
    /// transaction (a failure leaves the previous version intact); fails with
    /// [`crate::Error::SchemaTooNew`] rather than touching a table migrated by a newer version.
    /// Not needed in [`crate::WriteMode::LogicalMessage`].
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx08::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let outbox = outbox_core::Outbox::default();
    /// let report = outbox.migrate_sqlx08(&mut *pool.acquire().await?).await?;
    /// println!("outbox table at version {} (applied {:?})", report.version, report.applied);
    /// # Ok(()) }
    /// ```
    pub async fn migrate_sqlx08(&self, conn: &mut PgConnection) -> Result<MigrationReport> {
        let table = self.table();
        let name = table.name().as_str();
        let run = MigrationRun::outbox(table);
        let mut tx = conn.begin().await?;
        sqlx08::query(LOCK_SQL)
            .bind(run.lock_key)
            .execute(&mut *tx)
            .await?;
        for statement in &run.setup {
            sqlx08::raw_sql(statement).execute(&mut *tx).await?;
        }
        let current: Option<i32> = sqlx08::query_scalar(&run.current_version)
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        let mut applied = Vec::new();
        for step in pending_steps(table, current.unwrap_or(0))? {
            for statement in &step.statements {
                // One statement each, without parameters: the simple protocol.
                sqlx08::raw_sql(statement).execute(&mut *tx).await?;
            }
            sqlx08::query(&run.record)
                .bind(name)
                .bind(step.version)
                .bind(step.description)
                .execute(&mut *tx)
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
    /// only if `tx` commits. The sqlx 0.8 counterpart of [`Outbox::publish`].
    ///
    /// Only a sqlx 0.8 [`Transaction`] is accepted (not a bare connection or a pool), so the
    /// event cannot be written apart from the business data by mistake. The escape hatch, for a
    /// write that has no business data to pair with, is [`Outbox::prepare_write`]: run its
    /// statements on any connection (see [`OutboxWrite`]).
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx08::PgPool, event: &(impl outbox_core::OutboxEvent + Sync))
    /// # -> Result<(), Box<dyn std::error::Error>> {
    /// let outbox = outbox_core::Outbox::default();
    /// let mut tx = pool.begin().await?;
    /// sqlx08::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// outbox.publish_sqlx08(&mut tx, event).await?;
    /// tx.commit().await?; // the update and its event, or neither
    /// # Ok(()) }
    /// ```
    ///
    /// A bare connection, which would write in autocommit, does not compile:
    ///
    /// ```compile_fail
    /// # async fn demo(
    /// #     conn: &mut sqlx08::PgConnection,
    /// #     event: &(impl outbox_core::OutboxEvent + Sync),
    /// # ) {
    /// let _ = outbox_core::Outbox::default().publish_sqlx08(conn, event).await;
    /// # }
    /// ```
    pub async fn publish_sqlx08<E: OutboxEvent + ?Sized>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &E,
    ) -> Result<Uuid> {
        let ids = self
            .publish_new_sqlx08(tx, vec![NewEvent::from_event(event)?])
            .await?;
        Ok(ids[0])
    }

    /// Writes several typed events in `tx` in one statement, in order; returns their ids in the
    /// same order. The sqlx 0.8 counterpart of [`Outbox::publish_all`].
    pub async fn publish_all_sqlx08<'e, E, I>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: I,
    ) -> Result<Vec<Uuid>>
    where
        E: OutboxEvent + ?Sized + 'e,
        I: IntoIterator<Item = &'e E>,
    {
        let events = NewEvent::from_events(events)?;
        self.publish_new_sqlx08(tx, events).await
    }

    /// Writes prepared envelopes in `tx` in one statement, in order; returns their ids in the
    /// same order. The sqlx 0.8 counterpart of [`Outbox::publish_new`].
    pub async fn publish_new_sqlx08(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Uuid>> {
        let write = self.prepare_write(events)?;
        execute(tx, &write).await?;
        Ok(write.into_ids())
    }
}

/// Runs the statements of `write` on `tx`, in order.
async fn execute(tx: &mut Transaction<'_, Postgres>, write: &OutboxWrite) -> Result<()> {
    for statement in write.statements() {
        let query = statement
            .params()
            .iter()
            .fold(sqlx08::query(statement.sql()), bind);
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// `query` with `param` bound as the PostgreSQL type its variant names.
fn bind<'q>(
    query: Query<'q, Postgres, PgArguments>,
    param: &'q SqlParam,
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
