//! Publication and replication-slot management over a normal (non-replication) connection:
//! preflight checks (`wal_level`, privileges), create-or-verify of the publication and the slot,
//! slot health (`wal_status`, lag in bytes) and idle heartbeats.
//!
//! Submodules: `names` (validated slot and publication names), `publication` (the outbox table's
//! identity and the publication), `status` (slot health and verification), `emit_message`
//! (heartbeats and the privileges on `pg_logical_emit_message`). The slot's own lifecycle
//! (create, drop, advance) is here.

mod emit_message;
mod names;
mod publication;
mod status;

use sqlx::{PgPool, Row};

use super::LogicalError;
use super::pgoutput::Lsn;

pub use emit_message::{
    EMIT_MESSAGE_REVOKE, check_emit_message_privileges, emit_heartbeat,
    emit_message_public_overloads, heartbeat_prefix,
};
pub use names::{NameError, PublicationName, SlotName};
pub use publication::{
    PublicationOutcome, ResolvedTable, add_publication_table, check_publication_tables,
    ensure_publication, ensure_publication_tables, resolve_table,
};
pub use status::{SlotStatus, slot_status, verify_slot};

/// Maps a failed statement to [`LogicalError::Database`] with what was being done.
fn db_err(context: &'static str) -> impl FnOnce(sqlx::Error) -> LogicalError {
    move |source| LogicalError::Database { context, source }
}

/// Fail with a clear, fatal error unless the server can do logical replication for this role:
/// `wal_level = logical` and a role with `REPLICATION` (or superuser).
pub async fn preflight(pool: &PgPool) -> Result<(), LogicalError> {
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await
        .map_err(db_err("reading wal_level"))?;
    if wal_level != "logical" {
        return Err(LogicalError::WalLevel { actual: wal_level });
    }
    let row = sqlx::query(
        "SELECT current_user::text AS role, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(pool)
    .await
    .map_err(db_err("reading role attributes"))?;
    let role: String = row.try_get("role").map_err(db_err("reading role"))?;
    let replication: bool = row
        .try_get("rolreplication")
        .map_err(db_err("reading rolreplication"))?;
    let superuser: bool = row
        .try_get("rolsuper")
        .map_err(db_err("reading rolsuper"))?;
    if !replication && !superuser {
        return Err(LogicalError::Privilege {
            role,
            missing: "the REPLICATION attribute (ALTER ROLE … WITH REPLICATION)".into(),
        });
    }
    Ok(())
}

/// Create the logical slot with the `pgoutput` plugin. Returns its consistent point: every
/// transaction that commits after it is streamed; everything committed before it is visible to
/// any snapshot taken after this call returns.
///
/// Returns `Ok(None)` when another session created it concurrently (the caller re-reads it).
pub async fn create_slot(pool: &PgPool, slot: &SlotName) -> Result<Option<Lsn>, LogicalError> {
    let res: Result<String, sqlx::Error> = sqlx::query_scalar(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
    )
    .bind(slot.as_str())
    .fetch_one(pool)
    .await;
    match res {
        Ok(text) => {
            let lsn = Lsn::parse(&text).ok_or_else(|| {
                LogicalError::Slot(format!("server returned an unparsable LSN {text:?}"))
            })?;
            tracing::info!(slot = %slot, consistent_point = %lsn, "created logical replication slot (pgoutput)");
            Ok(Some(lsn))
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(None),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            Err(LogicalError::Privilege {
                role: "current role".into(),
                missing: format!("the right to create replication slots: {}", e.message()),
            })
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55000") => {
            // object_not_in_prerequisite_state: wal_level or max_replication_slots.
            Err(LogicalError::Slot(format!(
                "cannot create replication slot {slot}: {}",
                e.message()
            )))
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("53400") => {
            Err(LogicalError::Slot(format!(
                "cannot create replication slot {slot}: {} (raise max_replication_slots)",
                e.message()
            )))
        }
        Err(e) => Err(db_err("creating the replication slot")(e)),
    }
}

/// Drop the slot (used only to replace a lost one). Waits briefly for a lingering walsender.
pub async fn drop_slot(pool: &PgPool, slot: &SlotName) -> Result<(), LogicalError> {
    for attempt in 0..50 {
        let res = sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot.as_str())
            .execute(pool)
            .await;
        match res {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42704") => return Ok(()),
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("55006") && attempt < 49 =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(db_err("dropping the lost replication slot")(e)),
        }
    }
    Ok(())
}

/// Move an inactive slot's confirmed position forward to `lsn` (never backwards). Used at graceful
/// shutdown so that a position acknowledged after the last standby status update is not
/// re-streamed (no duplicates across a clean restart).
pub async fn advance_slot(pool: &PgPool, slot: &SlotName, lsn: Lsn) -> Result<(), LogicalError> {
    let mut last_err = None;
    for _ in 0..50 {
        let res = sqlx::query(
            "SELECT pg_replication_slot_advance($1, $2::pg_lsn) \
             FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::pg_lsn",
        )
        .bind(slot.as_str())
        .bind(lsn.to_string())
        .execute(pool)
        .await;
        match res {
            Ok(_) => return Ok(()),
            // The walsender of the session we just closed may still hold the slot.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55006") => {
                last_err = Some(sqlx::Error::Database(e));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(db_err("advancing the replication slot")(e)),
        }
    }
    Err(db_err("advancing the replication slot (still active)")(
        last_err.unwrap_or(sqlx::Error::PoolTimedOut),
    ))
}

/// Identifies the running PostgreSQL instance: its postmaster start time (and whether it is in
/// recovery). Two equal values mean the same server process, hence one WAL history: a restart or
/// a promoted standby gives another value.
pub async fn instance(pool: &PgPool) -> Result<String, LogicalError> {
    sqlx::query_scalar(INSTANCE)
        .fetch_one(pool)
        .await
        .map_err(db_err("identifying the PostgreSQL instance"))
}

/// [`instance`] of the server `conn` is connected to.
pub async fn instance_of(conn: &mut sqlx::PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(INSTANCE).fetch_one(conn).await
}

/// The statement of [`instance`].
const INSTANCE: &str = "SELECT concat_ws(' ', pg_postmaster_start_time()::text, \
     pg_is_in_recovery()::text, coalesce(inet_server_addr()::text, 'local'), \
     inet_server_port()::text)";
