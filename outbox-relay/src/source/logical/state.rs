//! The relay's durable memory of its replication slots: the table `outbox_relay_state`.
//!
//! A replication slot that is missing when the relay starts means one of two things: the relay
//! never streamed from it (a first start: create it), or it was lost — dropped, invalidated and
//! removed, or absent on a standby PostgreSQL failed over to. In the second case, creating a new
//! slot at the current WAL position silently skips every event committed after the old slot's
//! confirmed position. Only durable state can tell the two apart, so the logical source keeps
//! one row per slot:
//!
//! | column              | meaning                                                               |
//! |---------------------|-----------------------------------------------------------------------|
//! | `slot_name`         | the replication slot (primary key; slot names are server-wide)        |
//! | `write_mode`        | the write mode of the relay that last recorded it                     |
//! | `confirmed_lsn`     | a position up to which every event was acknowledged by Kafka          |
//! | `system_identifier` | `pg_control_system().system_identifier` when readable (else NULL)    |
//! | `timeline`          | `pg_control_checkpoint().timeline_id` when readable (else NULL)      |
//! | `created_at`, `updated_at` | when the row was first written and last updated                |
//!
//! # Guarantees
//!
//! - The row is written right after the relay created the slot (before anything is streamed
//!   from it) and whenever it finds the slot present, so "a row exists" means "a relay streamed,
//!   or was about to stream, from this slot". A start that finds the row but not the slot is a
//!   lost slot ([`super::LogicalError::SlotLost`]), never a first start: in `table` mode it is
//!   recovered from the table, in the other modes the relay refuses to start — every time, also
//!   in a crash loop — until an operator accepts the loss with `outbox-relay slot drop <slot>`
//!   (which deletes the row).
//! - The table lives in the database, so physical replication carries it to standbys: a relay
//!   pointed at a promoted standby that lacks the slot sees the row and reports the loss.
//! - `confirmed_lsn` only moves forward and is refreshed cheaply (at each slot health check and
//!   at shutdown, not per keepalive): it tells the operator from which position on events may be
//!   missing. It is never past what Kafka acknowledged (it is the relay's confirmed position),
//!   and may trail the slot's by up to one slot-check interval.
//!
//! # Where it lives
//!
//! In the schema of the configured outbox table (`table = "schema.outbox"`), or in the
//! connection's default schema (`search_path`) when the table name is unqualified — also in the
//! tableless `logical_message` mode. The relay creates it (`CREATE TABLE IF NOT EXISTS`) when it
//! opens the logical source; a role that may not create it gets an error with the statement to
//! run ([`DDL`]).

use sqlx::{AssertSqlSafe, PgExecutor, PgPool, Row};

use outbox_core::OutboxTable;

use super::LogicalError;
use super::pgoutput::Lsn;
use super::slot::SlotName;

/// The table's name (in the outbox table's schema, or the default schema).
pub const STATE_TABLE: &str = "outbox_relay_state";

/// The table's definition, `{table}` standing for its quoted, possibly qualified name.
pub const DDL: &str = "CREATE TABLE IF NOT EXISTS {table} (\
     slot_name text PRIMARY KEY, \
     write_mode text NOT NULL, \
     confirmed_lsn pg_lsn NOT NULL, \
     system_identifier text, \
     timeline integer, \
     created_at timestamptz NOT NULL DEFAULT now(), \
     updated_at timestamptz NOT NULL DEFAULT now())";

/// The quoted, possibly schema-qualified name of the state table for the outbox `table`
/// (validated identifiers only: the schema comes from [`OutboxTable`]).
pub fn state_table(table: &OutboxTable) -> String {
    match table.schema() {
        Some(s) => format!("{}.\"{STATE_TABLE}\"", s.quoted()),
        None => format!("\"{STATE_TABLE}\""),
    }
}

/// What the state table says about one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    /// The write mode of the relay that last recorded the slot.
    pub write_mode: String,
    /// A position up to which every event was acknowledged by Kafka (the relay's confirmed
    /// position when it was last recorded; the slot's own may trail it by one status update).
    pub confirmed_lsn: Lsn,
    /// The PostgreSQL system identifier it was recorded on, when readable.
    pub system_identifier: Option<String>,
    /// The timeline it was recorded on, when readable.
    pub timeline: Option<i32>,
    /// When it was last updated (text, as PostgreSQL renders it).
    pub updated_at: String,
}

impl SlotRecord {
    /// A one-line description for error messages.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "confirmed up to LSN {} (recorded {}, write mode {}",
            self.confirmed_lsn, self.updated_at, self.write_mode
        );
        if let Some(id) = &self.system_identifier {
            s.push_str(&format!(", system identifier {id}"));
        }
        if let Some(tl) = self.timeline {
            s.push_str(&format!(", timeline {tl}"));
        }
        s.push(')');
        s
    }
}

fn db_err(context: &'static str) -> impl FnOnce(sqlx::Error) -> LogicalError {
    move |source| LogicalError::Database { context, source }
}

fn is_code(e: &sqlx::Error, code: &str) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some(code))
}

/// Create the state table when missing. A role without the right to create it gets a fatal
/// [`LogicalError::Privilege`] naming the statement an administrator can run instead.
///
/// An existing table is left alone without trying to create it: `CREATE TABLE IF NOT EXISTS`
/// needs `CREATE` on the schema even when the table exists, which a least-privilege relay role
/// does not have once an administrator created the table for it.
pub async fn ensure_table(
    conn: &mut sqlx::PgConnection,
    table: &OutboxTable,
) -> Result<(), LogicalError> {
    let name = state_table(table);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&name)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_err("looking for the relay state table"))?;
    if exists {
        return Ok(());
    }
    let sql = DDL.replace("{table}", &name);
    match sqlx::query(AssertSqlSafe(sql.clone()))
        .execute(&mut *conn)
        .await
    {
        Ok(_) => Ok(()),
        // A concurrent creation by another relay (pg_type unique violation) or already there.
        Err(e) if is_code(&e, "23505") || is_code(&e, "42P07") => Ok(()),
        Err(e) if is_code(&e, "42501") => Err(LogicalError::Privilege {
            role: "current role".into(),
            missing: format!(
                "the right to create the relay's state table {name} (it records which slots the \
                 relay streamed from, so a lost slot is never mistaken for a first start): grant \
                 CREATE on the schema, or run as an administrator: {sql}; GRANT SELECT, INSERT, \
                 UPDATE, DELETE ON {name} TO <relay role>"
            ),
        }),
        Err(e) => Err(db_err("creating the relay state table")(e)),
    }
}

/// The record of `slot`, if any (`None` also when the state table does not exist).
pub async fn read<'c>(
    conn: impl PgExecutor<'c>,
    table: &OutboxTable,
    slot: &SlotName,
) -> Result<Option<SlotRecord>, LogicalError> {
    let sql = format!(
        "SELECT write_mode, confirmed_lsn::text AS lsn, system_identifier, timeline, \
                updated_at::text AS updated_at FROM {} WHERE slot_name = $1",
        state_table(table)
    );
    let row = match sqlx::query(AssertSqlSafe(sql))
        .bind(slot.as_str())
        .fetch_optional(conn)
        .await
    {
        Ok(row) => row,
        Err(e) if is_code(&e, "42P01") => return Ok(None),
        Err(e) => return Err(db_err("reading the relay state table")(e)),
    };
    let Some(row) = row else { return Ok(None) };
    let lsn: String = row
        .try_get("lsn")
        .map_err(db_err("reading confirmed_lsn"))?;
    Ok(Some(SlotRecord {
        write_mode: row
            .try_get("write_mode")
            .map_err(db_err("reading write_mode"))?,
        confirmed_lsn: Lsn::parse(&lsn).unwrap_or(Lsn::ZERO),
        system_identifier: row
            .try_get("system_identifier")
            .map_err(db_err("reading system_identifier"))?,
        timeline: row
            .try_get("timeline")
            .map_err(db_err("reading timeline"))?,
        updated_at: row
            .try_get("updated_at")
            .map_err(db_err("reading updated_at"))?,
    }))
}

/// The server's system identifier and current timeline, when this role may read them
/// (`pg_control_*` can be restricted to privileged roles): `(None, None)` otherwise.
async fn server_identity(pool: &PgPool) -> (Option<String>, Option<i32>) {
    let allowed: Result<(bool, bool), sqlx::Error> = sqlx::query_as(
        "SELECT has_function_privilege('pg_control_system()', 'EXECUTE'), \
                has_function_privilege('pg_control_checkpoint()', 'EXECUTE')",
    )
    .fetch_one(pool)
    .await;
    let Ok((system, checkpoint)) = allowed else {
        return (None, None);
    };
    let id = if system {
        sqlx::query_scalar("SELECT system_identifier::text FROM pg_control_system()")
            .fetch_one(pool)
            .await
            .ok()
    } else {
        None
    };
    let timeline = if checkpoint {
        sqlx::query_scalar("SELECT timeline_id FROM pg_control_checkpoint()")
            .fetch_one(pool)
            .await
            .ok()
    } else {
        None
    };
    (id, timeline)
}

/// Record that the relay streams from `slot` in `write_mode`, confirmed at least at `lsn`
/// (insert, or move the recorded position forward; never backwards), with the server's
/// identity when readable.
pub async fn record(
    pool: &PgPool,
    table: &OutboxTable,
    slot: &SlotName,
    write_mode: &str,
    lsn: Lsn,
) -> Result<(), LogicalError> {
    let (system_identifier, timeline) = server_identity(pool).await;
    let sql = format!(
        "INSERT INTO {t} AS s (slot_name, write_mode, confirmed_lsn, system_identifier, timeline) \
         VALUES ($1, $2, $3::pg_lsn, $4, $5) \
         ON CONFLICT (slot_name) DO UPDATE SET \
             write_mode = excluded.write_mode, \
             confirmed_lsn = GREATEST(s.confirmed_lsn, excluded.confirmed_lsn), \
             system_identifier = excluded.system_identifier, \
             timeline = excluded.timeline, \
             updated_at = now()",
        t = state_table(table)
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(slot.as_str())
        .bind(write_mode)
        .bind(lsn.to_string())
        .bind(system_identifier)
        .bind(timeline)
        .execute(pool)
        .await
        .map_err(db_err("recording the slot in the relay state table"))?;
    Ok(())
}

/// Move the recorded position of `slot` forward to `lsn` (no-op when it is already there or
/// the slot has no record).
pub async fn update_confirmed<'c>(
    conn: impl PgExecutor<'c>,
    table: &OutboxTable,
    slot: &SlotName,
    lsn: Lsn,
) -> Result<(), LogicalError> {
    let sql = format!(
        "UPDATE {} SET confirmed_lsn = $2::pg_lsn, updated_at = now() \
         WHERE slot_name = $1 AND confirmed_lsn < $2::pg_lsn",
        state_table(table)
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(slot.as_str())
        .bind(lsn.to_string())
        .execute(conn)
        .await
        .map_err(db_err("updating the relay state table"))?;
    Ok(())
}

/// Forget `slot`: the next start without the slot is a first start again (in `insert_delete`
/// and `logical_message` modes, events committed after the recorded position that were not
/// published are then never published). Returns the record that was deleted.
pub async fn forget<'c>(
    conn: impl PgExecutor<'c>,
    table: &OutboxTable,
    slot: &str,
) -> Result<Option<Lsn>, LogicalError> {
    let sql = format!(
        "DELETE FROM {} WHERE slot_name = $1 RETURNING confirmed_lsn::text",
        state_table(table)
    );
    match sqlx::query_scalar::<_, String>(AssertSqlSafe(sql))
        .bind(slot)
        .fetch_optional(conn)
        .await
    {
        Ok(lsn) => Ok(lsn.map(|l| Lsn::parse(&l).unwrap_or(Lsn::ZERO))),
        Err(e) if is_code(&e, "42P01") => Ok(None),
        Err(e) => Err(db_err("deleting from the relay state table")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_table_is_quoted_in_the_outbox_schema() {
        assert_eq!(
            state_table(&OutboxTable::default()),
            "\"outbox_relay_state\""
        );
        assert_eq!(
            state_table(&OutboxTable::parse("app.events").unwrap()),
            "\"app\".\"outbox_relay_state\""
        );
    }
}
