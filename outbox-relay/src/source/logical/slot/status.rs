//! The slot's health from `pg_replication_slots` ([`SlotStatus`]: `wal_status`, lag and retained
//! WAL in bytes) and the check that an existing slot is usable by this relay.

use sqlx::{PgPool, Row};

use super::{LogicalError, Lsn, SlotName, db_err};
use crate::stats::LogicalMetrics;

/// The health of the replication slot, from `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// Output plugin (must be `pgoutput`).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// Database the slot belongs to.
    pub database: Option<String>,
    /// Whether a session is streaming from it now.
    pub active: bool,
    /// Backend pid of that session.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost` (NULL before the slot reserved WAL).
    pub wal_status: Option<String>,
    /// The position the server will resume from; everything before it was confirmed by a relay.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Oldest WAL the slot pins.
    pub restart_lsn: Option<Lsn>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: bytes of WAL not yet confirmed.
    pub lag_bytes: Option<i64>,
    /// `pg_current_wal_lsn() - restart_lsn`: bytes of WAL the slot keeps on disk.
    pub retained_bytes: Option<i64>,
    /// Bytes that can still be written before the slot is invalidated (NULL when unlimited).
    pub safe_wal_size: Option<i64>,
}

impl SlotStatus {
    /// The slot can no longer stream (its WAL was removed).
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }

    /// Records this check's lag, retained WAL and `wal_status` in `metrics`.
    pub fn record_in(&self, metrics: &LogicalMetrics) {
        metrics.record_slot(
            self.lag_bytes,
            self.retained_bytes,
            self.wal_status.as_deref(),
        );
    }
}

/// Read the slot's status; `None` when it does not exist.
pub async fn slot_status(
    pool: &PgPool,
    slot: &SlotName,
) -> Result<Option<SlotStatus>, LogicalError> {
    let row = sqlx::query(
        "SELECT plugin::text, slot_type::text, database::text, active, active_pid, wal_status, \
                confirmed_flush_lsn::text AS confirmed, restart_lsn::text AS restart, \
                (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 AS lag, \
                (pg_current_wal_lsn() - restart_lsn)::int8 AS retained, \
                safe_wal_size \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot.as_str())
    .fetch_optional(pool)
    .await
    .map_err(db_err("reading pg_replication_slots"))?;
    let Some(row) = row else { return Ok(None) };
    let lsn = |col: &str| -> Result<Option<Lsn>, LogicalError> {
        let text: Option<String> = row.try_get(col).map_err(db_err("reading slot lsn"))?;
        Ok(text.as_deref().and_then(Lsn::parse))
    };
    Ok(Some(SlotStatus {
        plugin: row.try_get("plugin").map_err(db_err("plugin"))?,
        slot_type: row.try_get("slot_type").map_err(db_err("slot_type"))?,
        database: row.try_get("database").map_err(db_err("database"))?,
        active: row.try_get("active").map_err(db_err("active"))?,
        active_pid: row.try_get("active_pid").map_err(db_err("active_pid"))?,
        wal_status: row.try_get("wal_status").map_err(db_err("wal_status"))?,
        confirmed_flush_lsn: lsn("confirmed")?,
        restart_lsn: lsn("restart")?,
        lag_bytes: row.try_get("lag").map_err(db_err("lag"))?,
        retained_bytes: row.try_get("retained").map_err(db_err("retained"))?,
        safe_wal_size: row
            .try_get("safe_wal_size")
            .map_err(db_err("safe_wal_size"))?,
    }))
}

/// Check that an existing slot is usable by this relay: logical, `pgoutput`, this database, not
/// lost. A slot with another plugin or in another database is a fatal configuration error.
pub async fn verify_slot(
    pool: &PgPool,
    slot: &SlotName,
    status: &SlotStatus,
) -> Result<(), LogicalError> {
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .map_err(db_err("reading current_database()"))?;
    if status.slot_type != "logical" {
        return Err(LogicalError::Slot(format!(
            "replication slot {slot} is a {} slot, not a logical one; choose another slot name",
            status.slot_type
        )));
    }
    if status.plugin.as_deref() != Some("pgoutput") {
        return Err(LogicalError::Slot(format!(
            "replication slot {slot} uses plugin {:?}, not pgoutput; drop it or choose another slot name",
            status.plugin.as_deref().unwrap_or("?")
        )));
    }
    if status.database.as_deref() != Some(db.as_str()) {
        return Err(LogicalError::Slot(format!(
            "replication slot {slot} belongs to database {:?}, not {db:?}; slot names are server-wide, choose another",
            status.database.as_deref().unwrap_or("?")
        )));
    }
    if status.is_lost() {
        return Err(LogicalError::SlotLost {
            slot: slot.to_string(),
            detail: "wal_status = 'lost': the WAL it needed was removed (max_slot_wal_keep_size exceeded?)".into(),
        });
    }
    Ok(())
}
