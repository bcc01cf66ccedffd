//! What an operator asks first: how far behind is the relay? Shared by `outbox-relay status` and
//! the admin endpoint `/status`.

use outbox_core::{OutboxTable, WriteMode};
use sqlx::{PgConnection, Row};

use crate::config::{RelayConfig, SourceKind};
use crate::table;

/// The setting [`read`] runs [`table_queries`] under: see [`table::BACKLOG_PLANNER_SETTING`].
pub use crate::table::BACKLOG_PLANNER_SETTING as STATUS_PLANNER_SETTING;
pub use crate::table::LastPublished;
/// The statements [`read`] runs on the outbox table (`table` write mode): see
/// [`table::backlog_queries`]. Public so that tests can `EXPLAIN` them.
pub use crate::table::backlog_queries as table_queries;

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
    /// Whether some relay currently holds the leader lock (for a sharded table: whether any
    /// sharded relay runs).
    pub leader_present: bool,
    /// Who owns which shard, when `shards` is set.
    pub shards: Option<ShardsStatus>,
    /// The replication slot, for the logical source.
    pub slot: Option<SlotStatus>,
}

/// The shards of a sharded table, as the lock table shows them ([`crate::shard`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardsStatus {
    /// The configured shard count.
    pub count: u32,
    /// Relay instances joined (sessions holding the table's relay lock).
    pub members: usize,
    /// Shards nobody owns right now (a handover in progress, or no relay running).
    pub unowned: Vec<u32>,
    /// Each owning session (backend pid) with its shards, by pid.
    pub owners: Vec<ShardOwner>,
}

/// One relay instance's shards.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardOwner {
    /// The backend pid of the instance's lock session.
    pub pid: i32,
    /// The shards it owns.
    pub shards: Vec<u32>,
}

/// Reads who owns which of the `count` shards of `table` from the lock table.
pub async fn shards(
    conn: &mut PgConnection,
    table: &OutboxTable,
    count: u32,
) -> Result<ShardsStatus, sqlx::Error> {
    let keys = crate::shard::ShardKeys::new(&table.resolve(&mut *conn).await?, count);
    let members = crate::shard::holders(conn, &[keys.members]).await?.len();
    let held = crate::shard::holders(conn, &keys.shards).await?;
    let mut owners: std::collections::BTreeMap<i32, Vec<u32>> = Default::default();
    let mut unowned = Vec::new();
    for (shard, key) in keys.shards.iter().enumerate() {
        let shard = shard as u32;
        match held.iter().find(|(k, _)| k == key) {
            Some((_, pid)) => owners.entry(*pid).or_default().push(shard),
            None => unowned.push(shard),
        }
    }
    Ok(ShardsStatus {
        count,
        members,
        unowned,
        owners: owners
            .into_iter()
            .map(|(pid, shards)| ShardOwner { pid, shards })
            .collect(),
    })
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
        let backlog = table::backlog(conn, table).await?;
        status.pending_events = backlog.pending_events;
        status.oldest_pending_age_seconds = backlog.oldest_pending_age_seconds;
        status.last_published = backlog.last_published;
    }
    if table::parked_table_exists(conn, table).await? {
        status.parked_events = table::parked_count(conn, table).await?;
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
    if let Some(count) = config.shards {
        status.shards = Some(shards(conn, table, count).await?);
    }
    if config.source == SourceKind::Logical {
        status.slot = slots(conn)
            .await?
            .into_iter()
            .find(|s| s.name == config.logical.slot);
    }
    Ok(status)
}
