//! The diesel-async adapter (feature `diesel-async`): writes events on the caller's
//! [`AsyncPgConnection`] inside the transaction it has open (`conn.transaction(…)`), and so with
//! diesel-async's deadpool, bb8 and mobc pools, whose pooled connections deref to one.
//!
//! diesel has no transaction type to take, so the adapter asks the connection's transaction
//! manager instead: a write on a connection that is not inside a transaction fails with
//! [`Error::NotInTransaction`] before any statement is sent.

use diesel::QueryableByName;
use diesel::connection::TransactionManagerStatus;
use diesel::pg::Pg;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text};
use diesel_async::{
    AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection, TransactionManager,
};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::OutboxEvent;
use crate::migrate::{
    LOCK_SQL, MigrationReport, MigrationRun, SCHEMA_VERSION, log_applied, pending_steps,
};
use crate::statement::{OutboxWrite, SqlParam};
use crate::write::{NewEvent, Outbox};

impl Outbox {
    /// Creates this outbox's table or upgrades it to [`SCHEMA_VERSION`] through a diesel-async
    /// connection: the diesel-async counterpart of [`Outbox::migrate`], so a service on
    /// diesel-async needs neither sqlx nor `outbox-relay migrate` to create the table.
    ///
    /// Guarantee: the same statements as [`crate::migrate()`], recorded in the same
    /// `_outbox_migrations` history under the same transaction-scoped advisory lock, so every
    /// driver and the relay's `migrate` command can run concurrently and each step is applied
    /// exactly once; idempotent (a second call applies nothing); all steps of a call in one
    /// transaction (a failure leaves the previous version intact); fails with
    /// [`crate::Error::SchemaTooNew`] rather than touching a table migrated by a newer version.
    /// Call it outside a transaction: inside one, diesel runs it in a savepoint and the lock
    /// (and so every concurrent migrator) waits for the outer commit. Not needed in
    /// [`crate::WriteMode::LogicalMessage`].
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut diesel_async::AsyncPgConnection) -> Result<(), outbox_core::Error> {
    /// let outbox = outbox_core::Outbox::default();
    /// let report = outbox.migrate_diesel_async(conn).await?;
    /// println!("outbox table at version {} (applied {:?})", report.version, report.applied);
    /// # Ok(()) }
    /// ```
    pub async fn migrate_diesel_async(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> Result<MigrationReport> {
        let table = self.table();
        let name = table.name().as_str();
        let run = MigrationRun::outbox(table);
        // The shared statement, wrapped so that its one column has a name to load it by.
        let current_sql = format!("SELECT ({}) AS version", run.current_version);
        let applied = conn
            .transaction::<_, Error, _>(async |conn| {
                diesel::sql_query(LOCK_SQL)
                    .bind::<BigInt, _>(run.lock_key)
                    .execute(conn)
                    .await?;
                for statement in &run.setup {
                    conn.batch_execute(statement).await?;
                }
                let current = diesel::sql_query(&current_sql)
                    .bind::<Text, _>(name)
                    .get_result::<CurrentVersion>(conn)
                    .await?
                    .version;
                let mut applied = Vec::new();
                for step in pending_steps(table, current.unwrap_or(0))? {
                    for statement in &step.statements {
                        // One statement each, without parameters: the simple protocol.
                        conn.batch_execute(statement).await?;
                    }
                    diesel::sql_query(&run.record)
                        .bind::<Text, _>(name)
                        .bind::<Integer, _>(step.version)
                        .bind::<Text, _>(step.description)
                        .execute(conn)
                        .await?;
                    log_applied(table, &step);
                    applied.push(step.version);
                }
                Ok(applied)
            })
            .await?;
        Ok(MigrationReport {
            applied,
            version: SCHEMA_VERSION,
        })
    }

    /// Writes one typed event on `conn`, inside the transaction it has open, and returns its
    /// event id; the event is published if and only if that transaction commits. The
    /// diesel-async counterpart of [`Outbox::publish`].
    ///
    /// Only a connection inside a transaction (`conn.transaction(…)`, a `build_transaction()`, a
    /// test transaction) is accepted: on any other the call fails with
    /// [`Error::NotInTransaction`] and writes nothing, so the event cannot be written apart from
    /// the business data by mistake. (A transaction begun with a raw `BEGIN` statement is not seen
    /// by diesel and so refused too.) The escape hatch, for a write that has no business data to
    /// pair with, is [`Outbox::prepare_write`]: run its statements in autocommit (see
    /// [`OutboxWrite`]).
    ///
    /// ```no_run
    /// # async fn demo(
    /// #     conn: &mut diesel_async::AsyncPgConnection,
    /// #     event: &(impl outbox_core::OutboxEvent + Sync),
    /// # ) -> Result<(), outbox_core::Error> {
    /// use diesel_async::{AsyncConnection, RunQueryDsl};
    ///
    /// let outbox = outbox_core::Outbox::default();
    /// conn.transaction::<_, outbox_core::Error, _>(async |conn| {
    ///     diesel::sql_query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    ///         .execute(conn)
    ///         .await?;
    ///     outbox.publish_diesel_async(conn, event).await?;
    ///     Ok(())
    /// })
    /// .await?; // the update and its event, or neither
    /// # Ok(()) }
    /// ```
    pub async fn publish_diesel_async<E: OutboxEvent + ?Sized>(
        &self,
        conn: &mut AsyncPgConnection,
        event: &E,
    ) -> Result<Uuid> {
        let ids = self
            .publish_new_diesel_async(conn, vec![NewEvent::from_event(event)?])
            .await?;
        Ok(ids[0])
    }

    /// Writes several typed events on `conn`, inside its transaction, in one statement, in order;
    /// returns their ids in the same order. The diesel-async counterpart of
    /// [`Outbox::publish_all`]; fails with [`Error::NotInTransaction`] outside a transaction.
    pub async fn publish_all_diesel_async<'e, E, I>(
        &self,
        conn: &mut AsyncPgConnection,
        events: I,
    ) -> Result<Vec<Uuid>>
    where
        E: OutboxEvent + ?Sized + 'e,
        I: IntoIterator<Item = &'e E>,
    {
        let events = NewEvent::from_events(events)?;
        self.publish_new_diesel_async(conn, events).await
    }

    /// Writes prepared envelopes on `conn`, inside its transaction, in one statement, in order;
    /// returns their ids in the same order. The diesel-async counterpart of
    /// [`Outbox::publish_new`]; fails with [`Error::NotInTransaction`] outside a transaction.
    pub async fn publish_new_diesel_async(
        &self,
        conn: &mut AsyncPgConnection,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Uuid>> {
        ensure_in_transaction(conn)?;
        let write = self.prepare_write(events)?;
        execute(conn, &write).await?;
        Ok(write.into_ids())
    }
}

/// The loaded result of the wrapped `current_version` statement of a migration run.
#[derive(QueryableByName)]
struct CurrentVersion {
    #[diesel(sql_type = Nullable<Integer>)]
    version: Option<i32>,
}

/// Fails with [`Error::NotInTransaction`] unless diesel's transaction manager has a transaction
/// (or a savepoint in one) open on `conn`; with [`Error::Diesel`] if the manager is broken.
fn ensure_in_transaction(conn: &mut AsyncPgConnection) -> Result<()> {
    let status: &mut TransactionManagerStatus =
        <AsyncPgConnection as AsyncConnection>::TransactionManager::transaction_manager_status_mut(
            conn,
        );
    match status.transaction_depth()? {
        Some(_) => Ok(()),
        None => Err(Error::NotInTransaction),
    }
}

/// Runs the statements of `write` on `conn`, in order, each with its parameters bound as the
/// types their variants name.
async fn execute(conn: &mut AsyncPgConnection, write: &OutboxWrite) -> Result<()> {
    for statement in write.statements() {
        let query = statement
            .params()
            .iter()
            .fold(diesel::sql_query(statement.sql()).into_boxed(), bind);
        query.execute(conn).await?;
    }
    Ok(())
}

/// `query` with `param` bound as the PostgreSQL type its variant names.
fn bind<'f>(
    query: BoxedSqlQuery<'f, Pg, SqlQuery>,
    param: &'f SqlParam,
) -> BoxedSqlQuery<'f, Pg, SqlQuery> {
    use diesel::sql_types::Uuid as PgUuid;
    match param {
        SqlParam::Uuid(v) => query.bind::<PgUuid, _>(v),
        SqlParam::Text(v) => query.bind::<Text, _>(v),
        SqlParam::NullableText(v) => query.bind::<Nullable<Text>, _>(v),
        SqlParam::Int4(v) => query.bind::<Integer, _>(v),
        SqlParam::NullableInt8(v) => query.bind::<Nullable<BigInt>, _>(v),
        SqlParam::UuidArray(v) => query.bind::<Array<PgUuid>, _>(v),
        SqlParam::TextArray(v) => query.bind::<Array<Text>, _>(v),
        SqlParam::NullableTextArray(v) => query.bind::<Array<Nullable<Text>>, _>(v),
        SqlParam::Int4Array(v) => query.bind::<Array<Integer>, _>(v),
        SqlParam::NullableInt8Array(v) => query.bind::<Array<Nullable<BigInt>>, _>(v),
    }
}
