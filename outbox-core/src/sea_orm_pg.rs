//! The sea-orm adapter (feature `sea-orm`): writes events on the caller's sea-orm
//! [`DatabaseTransaction`], on PostgreSQL.
//!
//! sea-orm 2 runs on sqlx 0.9, the same sqlx as the rest of this crate, so the feature adds
//! sea-orm and sea-query but no second driver. Only sea-orm's `sqlx-postgres`, `runtime-tokio`
//! and `with-uuid` features are asked for: no TLS backend and no derive macros are forced on the
//! service, whose own sea-orm features apply, as Cargo unifies them.

use sea_orm::sea_query::{ArrayType, Value};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, Statement,
    TransactionTrait,
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
    /// Creates this outbox's table or upgrades it to [`SCHEMA_VERSION`] through a sea-orm
    /// connection: the sea-orm counterpart of [`Outbox::migrate`], so a service on sea-orm needs
    /// neither a sqlx connection of its own nor `outbox-relay migrate` to create the table. It
    /// sits beside the service's `sea-orm-migration` history, never in it.
    ///
    /// Guarantee: the same statements as [`crate::migrate()`], recorded in the same
    /// `_outbox_migrations` history under the same transaction-scoped advisory lock, so every
    /// driver and the relay's `migrate` command can run concurrently and each step is applied
    /// exactly once; idempotent (a second call applies nothing); all steps of a call in one
    /// transaction (a failure leaves the previous version intact); fails with
    /// [`Error::SchemaTooNew`] rather than touching a table migrated by a newer version, and with
    /// [`Error::UnsupportedBackend`] on a connection that is not to PostgreSQL. Not needed in
    /// [`crate::WriteMode::LogicalMessage`].
    ///
    /// ```no_run
    /// # async fn demo(db: &sea_orm::DatabaseConnection) -> Result<(), outbox_core::Error> {
    /// let outbox = outbox_core::Outbox::default();
    /// let report = outbox.migrate_sea_orm(db).await?;
    /// println!("outbox table at version {} (applied {:?})", report.version, report.applied);
    /// # Ok(()) }
    /// ```
    pub async fn migrate_sea_orm(&self, db: &DatabaseConnection) -> Result<MigrationReport> {
        ensure_postgres(db.get_database_backend())?;
        let table = self.table();
        let name = table.name().as_str();
        let run = MigrationRun::outbox(table);
        let tx = db.begin().await?;
        tx.execute_raw(statement(LOCK_SQL, vec![Value::BigInt(Some(run.lock_key))]))
            .await?;
        for setup in &run.setup {
            tx.execute_unprepared(setup).await?;
        }
        let current: Option<i32> = tx
            .query_one_raw(statement(&run.current_version, vec![name.into()]))
            .await?
            .map(|row| row.try_get_by_index::<Option<i32>>(0))
            .transpose()?
            .flatten();
        let mut applied = Vec::new();
        for step in pending_steps(table, current.unwrap_or(0))? {
            for sql in &step.statements {
                // One statement each, without parameters: the simple protocol.
                tx.execute_unprepared(sql).await?;
            }
            let values = vec![name.into(), step.version.into(), step.description.into()];
            tx.execute_raw(statement(&run.record, values)).await?;
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
    /// only if `tx` commits. The sea-orm counterpart of [`Outbox::publish`].
    ///
    /// Only a [`DatabaseTransaction`] is accepted — not a `DatabaseConnection` or any other
    /// `ConnectionTrait`, which would write in autocommit — so the event cannot be written apart
    /// from the business data by mistake; a transaction on another backend than PostgreSQL fails
    /// with [`Error::UnsupportedBackend`] and writes nothing. The escape hatch, for a write that
    /// has no business data to pair with, is [`Outbox::prepare_write`]: run its statements on any
    /// connection (see [`OutboxWrite`]).
    ///
    /// ```no_run
    /// # async fn demo(
    /// #     db: &sea_orm::DatabaseConnection,
    /// #     event: &(impl outbox_core::OutboxEvent + Sync),
    /// # ) -> Result<(), Box<dyn std::error::Error>> {
    /// use sea_orm::{ConnectionTrait, TransactionTrait};
    ///
    /// let outbox = outbox_core::Outbox::default();
    /// let tx = db.begin().await?;
    /// tx.execute_unprepared("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    ///     .await?;
    /// outbox.publish_sea_orm(&tx, event).await?;
    /// tx.commit().await?; // the update and its event, or neither
    /// # Ok(()) }
    /// ```
    ///
    /// A connection, which would write in autocommit, does not compile:
    ///
    /// ```compile_fail
    /// # async fn demo(
    /// #     db: &sea_orm::DatabaseConnection,
    /// #     event: &(impl outbox_core::OutboxEvent + Sync),
    /// # ) {
    /// let _ = outbox_core::Outbox::default().publish_sea_orm(db, event).await;
    /// # }
    /// ```
    pub async fn publish_sea_orm<E: OutboxEvent + ?Sized>(
        &self,
        tx: &DatabaseTransaction,
        event: &E,
    ) -> Result<Uuid> {
        let ids = self
            .publish_new_sea_orm(tx, vec![NewEvent::from_event(event)?])
            .await?;
        Ok(ids[0])
    }

    /// Writes several typed events in `tx` in one statement, in order; returns their ids in the
    /// same order. The sea-orm counterpart of [`Outbox::publish_all`].
    pub async fn publish_all_sea_orm<'e, E, I>(
        &self,
        tx: &DatabaseTransaction,
        events: I,
    ) -> Result<Vec<Uuid>>
    where
        E: OutboxEvent + ?Sized + 'e,
        I: IntoIterator<Item = &'e E>,
    {
        let events = NewEvent::from_events(events)?;
        self.publish_new_sea_orm(tx, events).await
    }

    /// Writes prepared envelopes in `tx` in one statement, in order; returns their ids in the
    /// same order. The sea-orm counterpart of [`Outbox::publish_new`].
    pub async fn publish_new_sea_orm(
        &self,
        tx: &DatabaseTransaction,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Uuid>> {
        ensure_postgres(tx.get_database_backend())?;
        let write = self.prepare_write(events)?;
        execute(tx, &write).await?;
        Ok(write.into_ids())
    }
}

/// Fails with [`Error::UnsupportedBackend`] unless `backend` is PostgreSQL.
fn ensure_postgres(backend: DbBackend) -> Result<()> {
    match backend {
        DbBackend::Postgres => Ok(()),
        other => Err(Error::UnsupportedBackend {
            backend: format!("{other:?}"),
        }),
    }
}

/// A PostgreSQL statement of `sql` with `values` bound to `$1`, `$2`, ….
fn statement(sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// Runs the statements of `write` on `tx`, in order.
async fn execute(tx: &DatabaseTransaction, write: &OutboxWrite) -> Result<()> {
    for s in write.statements() {
        let values = s.params().iter().map(value).collect();
        tx.execute_raw(statement(s.sql(), values)).await?;
    }
    Ok(())
}

/// A parameter as sea-orm binds it (through sqlx), as the PostgreSQL type its variant names.
///
/// sea-query's arrays cannot hold `NULL` elements, so the two nullable arrays are bound as the
/// text of a PostgreSQL array literal: every array parameter of an [`OutboxWrite`] is cast to
/// its array type in the SQL (`$n::text[]`, `$n::int8[]`), which PostgreSQL does from `text` by
/// parsing the literal.
fn value(param: &SqlParam) -> Value {
    fn array(ty: ArrayType, items: Vec<Value>) -> Value {
        Value::Array(ty, Some(Box::new(items)))
    }
    match param {
        SqlParam::Uuid(v) => Value::Uuid(Some(*v)),
        SqlParam::Text(v) => Value::String(Some(v.clone())),
        SqlParam::NullableText(v) => Value::String(v.clone()),
        SqlParam::Int4(v) => Value::Int(Some(*v)),
        SqlParam::NullableInt8(v) => Value::BigInt(*v),
        SqlParam::UuidArray(v) => array(
            ArrayType::Uuid,
            v.iter().map(|u| Value::Uuid(Some(*u))).collect(),
        ),
        SqlParam::TextArray(v) => array(
            ArrayType::String,
            v.iter().map(|s| Value::String(Some(s.clone()))).collect(),
        ),
        SqlParam::Int4Array(v) => array(
            ArrayType::Int,
            v.iter().map(|i| Value::Int(Some(*i))).collect(),
        ),
        SqlParam::NullableTextArray(v) => Value::String(Some(array_literal(v, |s| {
            let mut quoted = String::with_capacity(s.len() + 2);
            quoted.push('"');
            for c in s.chars() {
                if c == '"' || c == '\\' {
                    quoted.push('\\');
                }
                quoted.push(c);
            }
            quoted.push('"');
            quoted
        }))),
        SqlParam::NullableInt8Array(v) => {
            Value::String(Some(array_literal(v, |i: &i64| i.to_string())))
        }
    }
}

/// The PostgreSQL array literal of `items` (`{a,NULL,b}`), each present item written by
/// `element`, each absent one as an unquoted `NULL`.
fn array_literal<T>(items: &[Option<T>], element: impl Fn(&T) -> String) -> String {
    let elements: Vec<String> = items
        .iter()
        .map(|item| item.as_ref().map_or_else(|| "NULL".to_owned(), &element))
        .collect();
    format!("{{{}}}", elements.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nullable_arrays_are_bound_as_quoted_literals() {
        let text = SqlParam::NullableTextArray(vec![
            Some(r#"{"a": "q\"b\\c"}"#.to_owned()),
            None,
            Some("NULL".to_owned()),
            Some(String::new()),
            Some("x,y}".to_owned()),
        ]);
        assert_eq!(
            value(&text),
            Value::String(Some(
                r#"{"{\"a\": \"q\\\"b\\\\c\"}",NULL,"NULL","","x,y}"}"#.to_owned()
            ))
        );
        let int8 = SqlParam::NullableInt8Array(vec![Some(-1), None, Some(i64::MAX)]);
        assert_eq!(
            value(&int8),
            Value::String(Some(format!("{{-1,NULL,{}}}", i64::MAX)))
        );
        assert_eq!(
            value(&SqlParam::NullableInt8Array(Vec::new())),
            Value::String(Some("{}".to_owned()))
        );
    }
}
