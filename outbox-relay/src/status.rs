//! What an operator asks first: how far behind is the relay? Shared by `outbox-relay status` and
//! the admin endpoint `/status`.

use chrono::{DateTime, Utc};
use outbox_core::{OutboxTable, WriteMode};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use uuid::Uuid;

use crate::config::{RelayConfig, SourceKind};

/// A snapshot of the outbox and, for the logical source, its replication slot.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct OutboxStatus {
    /// The outbox table.
    pub table: String,
    /// `polling` or `logical`.
    pub source: String,
    /// Rows not yet published (`table` write mode).
    pub pending_events: i64,
    /// Age in seconds of the oldest unpublished row (the first in `seq` order).
    pub oldest_pending_age_seconds: Option<f64>,
    /// The most recently published event (mark acknowledgement only): the published row just
    /// before the oldest pending one in `seq` order, or the newest row when nothing is pending.
    pub last_published: Option<LastPublished>,
    /// Parked events (poison events and those held behind them).
    pub parked_events: i64,
    /// Whether some relay currently holds the leader lock.
    pub leader_present: bool,
    /// The replication slot, for the logical source.
    pub slot: Option<SlotStatus>,
}

/// The last event marked published.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LastPublished {
    /// Its id.
    pub id: Uuid,
    /// Its event type.
    pub event_type: String,
    /// When it was marked published.
    pub published_at: DateTime<Utc>,
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SlotStatus {
    /// Slot name.
    pub name: String,
    /// Output plugin.
    pub plugin: Option<String>,
    /// Database.
    pub database: Option<String>,
    /// Whether a session is streaming from it.
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// The confirmed flush LSN.
    pub confirmed_flush_lsn: Option<String>,
    /// Bytes of WAL between the current position and the confirmed flush LSN.
    pub lag_bytes: Option<i64>,
}

/// Reads every replication slot of the server (for `slot list`).
pub async fn slots(conn: &mut PgConnection) -> Result<Vec<SlotStatus>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT slot_name::text, plugin::text, database::text, active, wal_status,
                confirmed_flush_lsn::text,
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 AS lag
         FROM pg_replication_slots ORDER BY slot_name",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(SlotStatus {
                name: r.try_get(0)?,
                plugin: r.try_get(1)?,
                database: r.try_get(2)?,
                active: r.try_get(3)?,
                wal_status: r.try_get(4)?,
                confirmed_flush_lsn: r.try_get(5)?,
                lag_bytes: r.try_get(6)?,
            })
        })
        .collect()
}

/// The statements [`read`] runs on the outbox table (`table` write mode): the pending count,
/// the oldest pending age and the last published event. Each is answered from the table's
/// `seq` indexes (the unique one and the partial one on unpublished rows), never by a scan of
/// the whole table: the count reads the partial index only (its cost grows with the backlog,
/// not with the table), the oldest pending row is the first entry of the partial index, and the
/// last published event is the row just below it in `seq` order (the newest row when nothing is
/// pending). Public so that tests can `EXPLAIN` them.
pub fn table_queries(table: &OutboxTable) -> [String; 3] {
    let t = table.qualified();
    [
        format!("SELECT count(*) FROM {t} WHERE published_at IS NULL"),
        format!(
            "SELECT extract(epoch FROM now() - created_at)::float8 FROM {t}
             WHERE published_at IS NULL ORDER BY seq LIMIT 1"
        ),
        format!(
            "SELECT id, type, published_at FROM {t}
             WHERE published_at IS NOT NULL
               AND seq < coalesce((SELECT seq FROM {t} WHERE published_at IS NULL
                                   ORDER BY seq LIMIT 1), 9223372036854775807)
             ORDER BY seq DESC LIMIT 1"
        ),
    ]
}

/// The setting [`read`] runs [`table_queries`] under: with a large share of the table pending the
/// planner would otherwise count by a (parallel) scan of the whole table, whose cost grows with
/// the table rather than with the backlog.
pub const STATUS_PLANNER_SETTING: &str = "SET LOCAL enable_seqscan = off";

/// Reads the status of the outbox configured in `config`.
pub async fn read(
    conn: &mut PgConnection,
    config: &RelayConfig,
    table: &OutboxTable,
) -> Result<OutboxStatus, sqlx::Error> {
    let mut status = OutboxStatus {
        table: table.to_string(),
        source: match config.source {
            SourceKind::Polling => "polling".into(),
            SourceKind::Logical => "logical".into(),
        },
        ..Default::default()
    };
    if config.write_mode == WriteMode::Table {
        let [pending, oldest, last] = table_queries(table);
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query(STATUS_PLANNER_SETTING)
            .execute(&mut *tx)
            .await?;
        status.pending_events = sqlx::query_scalar(AssertSqlSafe(pending))
            .fetch_one(&mut *tx)
            .await?;
        status.oldest_pending_age_seconds = sqlx::query_scalar(AssertSqlSafe(oldest))
            .fetch_optional(&mut *tx)
            .await?
            .flatten();
        let last = sqlx::query(AssertSqlSafe(last))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        status.last_published = last
            .map(|r| {
                Ok::<_, sqlx::Error>(LastPublished {
                    id: r.try_get(0)?,
                    event_type: r.try_get(1)?,
                    published_at: r.try_get(2)?,
                })
            })
            .transpose()?;
    }
    let parked_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table.parked_qualified())
        .fetch_one(&mut *conn)
        .await?;
    if parked_exists {
        status.parked_events = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}",
            table.parked_qualified()
        )))
        .fetch_one(&mut *conn)
        .await?;
    }
    let key = table.resolve(&mut *conn).await?.lock_key("relay");
    status.leader_present = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND ((classid::bigint << 32) | objid::bigint) = $1)",
    )
    .bind(key)
    .fetch_one(&mut *conn)
    .await?;
    if config.source == SourceKind::Logical {
        status.slot = slots(conn)
            .await?
            .into_iter()
            .find(|s| s.name == config.logical.slot);
    }
    Ok(status)
}
