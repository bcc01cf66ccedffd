//! The polling source: reads unpublished rows from the outbox table.
//!
//! ## Why it cannot skip a late-committing transaction
//!
//! It keeps no cursor. Each batch is `SELECT … WHERE published_at IS NULL ORDER BY seq LIMIT n`
//! over the rows committed *now*, and a row leaves that set only when it is acknowledged after
//! Kafka acknowledged it (marked `published_at`, or deleted). A transaction that took a lower
//! `seq` but commits after higher ones simply shows up in a later batch — the `WHERE id > :last`
//! trap (sequence values are taken before commit) does not exist here.
//!
//! ## Per-aggregate order
//!
//! Within a batch rows go out in `seq` order (insertion order). A service that serialises writes
//! to one aggregate (a row lock or version check on the aggregate, as any service that cares about
//! its order does) inserts an aggregate's next event only after the previous one committed, so
//! `seq` order is commit order per aggregate and an aggregate's later event is never visible
//! without its earlier one. Only one relay polls a table at a time ([`crate::leader`]).
//!
//! ## Wake-ups
//!
//! An `AFTER INSERT` statement trigger sends `NOTIFY` at commit; the source `LISTEN`s and falls
//! back to the poll interval if a notification is missed.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use outbox_core::{OutboxTable, StoredEvent, parse_headers};
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use std::collections::{HashMap, VecDeque};

use crate::leader::Leadership;
use crate::park::{AggregateKey, ParkRequest};
use crate::source::{Position, Source, SourceError, SourceEvent};

/// What the relay does to a row once Kafka acknowledged its event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowAcknowledgement {
    /// Set `published_at`; rows are kept for `retention` (replay, audit, status), then purged.
    #[default]
    Mark,
    /// Delete the row: the table holds only unpublished events.
    Delete,
}

impl RowAcknowledgement {
    /// Parses `mark` or `delete`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "mark" => Some(Self::Mark),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// Records in the table that the events with `ids` were published. Used by both sources in the
/// `table` write mode; idempotent.
pub async fn acknowledge_rows(
    conn: &mut PgConnection,
    table: &OutboxTable,
    how: RowAcknowledgement,
    ids: &[Uuid],
) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let sql = match how {
        RowAcknowledgement::Mark => format!(
            "UPDATE {} SET published_at = clock_timestamp() WHERE id = ANY($1) AND published_at IS NULL",
            table.qualified()
        ),
        RowAcknowledgement::Delete => {
            format!("DELETE FROM {} WHERE id = ANY($1)", table.qualified())
        }
    };
    Ok(sqlx::query(AssertSqlSafe(sql))
        .bind(ids)
        .execute(conn)
        .await?
        .rows_affected())
}

/// Deletes rows published more than `older_than` ago, in chunks; returns how many were deleted.
pub async fn purge_published(
    conn: &mut PgConnection,
    table: &OutboxTable,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    let sql = format!(
        "DELETE FROM {t} WHERE id IN (SELECT id FROM {t}
             WHERE published_at < now() - make_interval(secs => $1) ORDER BY seq LIMIT 10000)",
        t = table.qualified()
    );
    let mut total = 0;
    loop {
        let n = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(older_than.as_secs_f64())
            .execute(&mut *conn)
            .await?
            .rows_affected();
        total += n;
        if n < 10000 {
            return Ok(total);
        }
    }
}

/// The SELECT list shared by every reader of the table (polling, status, replay).
pub(crate) const EVENT_COLUMNS: &str = "id, aggregatetype, aggregateid, type, payload::text AS payload, seq, \
     created_at, tracingspancontext, headers::text AS headers, schema_version, topic, aggregate_seq";

/// Turns a row selected with [`EVENT_COLUMNS`] into an event.
pub(crate) fn event_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredEvent, SourceError> {
    let db = |error| SourceError::Database {
        source_name: "polling",
        error,
    };
    let id: Uuid = row.try_get("id").map_err(db)?;
    let headers: Option<String> = row.try_get("headers").map_err(db)?;
    let headers = match headers {
        Some(h) => parse_headers(&h).map_err(|reason| {
            SourceError::Fatal(format!("outbox row {id} is malformed: {reason}"))
        })?,
        None => Vec::new(),
    };
    Ok(StoredEvent {
        id,
        aggregate_type: row.try_get("aggregatetype").map_err(db)?,
        aggregate_id: row.try_get("aggregateid").map_err(db)?,
        event_type: row.try_get("type").map_err(db)?,
        payload: row.try_get("payload").map_err(db)?,
        seq: row.try_get("seq").map_err(db)?,
        created_at: row
            .try_get::<Option<DateTime<Utc>>, _>("created_at")
            .map_err(db)?,
        traceparent: row.try_get("tracingspancontext").map_err(db)?,
        headers,
        schema_version: row.try_get("schema_version").map_err(db)?,
        topic: row.try_get("topic").map_err(db)?,
        aggregate_seq: row.try_get("aggregate_seq").map_err(db)?,
    })
}

/// Settings of the polling source.
#[derive(Debug, Clone)]
pub struct PollingSettings {
    /// The outbox table.
    pub table: OutboxTable,
    /// How acknowledged rows are recorded.
    pub acknowledgement: RowAcknowledgement,
    /// The longest wait between two polls when no notification arrives.
    pub poll_interval: Duration,
    /// Whether to `LISTEN` for the insert trigger's notifications.
    pub listen: bool,
}

/// Reads unpublished rows through the leader's session. See the [module docs](self).
pub struct PollingSource {
    settings: PollingSettings,
    leader: Leadership,
    listener: Option<PgListener>,
    claim_sql: String,
    /// `seq` of every row returned and not yet acknowledged, in order: excluded from further
    /// claims while earlier batches are in flight.
    in_flight: VecDeque<i64>,
    /// Highest `seq` ever claimed (used only by the deliberately broken `cursor` mutant).
    highest_claimed: i64,
}

impl PollingSource {
    /// A polling source that reads and acknowledges through `leader`'s lock-holding session and
    /// listens for wake-ups on a connection of its own.
    pub async fn new(
        settings: PollingSettings,
        leader: Leadership,
        options: &PgConnectOptions,
    ) -> Result<Self, SourceError> {
        let listener = if settings.listen {
            let pool = sqlx::pool::PoolOptions::<sqlx::Postgres>::new()
                .max_connections(1)
                .connect_lazy_with(options.clone().application_name("outbox-relay-listen"));
            let mut listener =
                PgListener::connect_with(&pool)
                    .await
                    .map_err(|error| SourceError::Database {
                        source_name: "polling",
                        error,
                    })?;
            listener
                .listen(&settings.table.notify_channel())
                .await
                .map_err(|error| SourceError::Database {
                    source_name: "polling",
                    error,
                })?;
            Some(listener)
        } else {
            None
        };
        // Rows in flight are excluded by value, not by a cursor: a row with a lower `seq` that
        // commits late is still claimed by the next batch.
        let claim_sql = format!(
            "SELECT {EVENT_COLUMNS} FROM {} WHERE published_at IS NULL AND seq <> ALL($2) {} \
             ORDER BY seq LIMIT $1",
            settings.table.qualified(),
            if crate::faults::mutant("cursor") {
                "AND seq > $3"
            } else {
                "AND $3::int8 IS NOT NULL"
            }
        );
        Ok(Self {
            settings,
            leader,
            listener,
            claim_sql,
            in_flight: VecDeque::new(),
            highest_claimed: 0,
        })
    }

    async fn claim(&mut self, max: usize) -> Result<Vec<SourceEvent>, SourceError> {
        let in_flight: Vec<i64> = self.in_flight.iter().copied().collect();
        let rows = sqlx::query(AssertSqlSafe(self.claim_sql.as_str()))
            .bind(max as i64)
            .bind(&in_flight)
            .bind(self.highest_claimed)
            .fetch_all(self.leader.connection())
            .await
            .map_err(|error| SourceError::Database {
                source_name: "polling",
                error,
            })?;
        let batch = rows
            .iter()
            .map(|row| {
                Ok(SourceEvent {
                    event: event_from_row(row)?,
                    position: Position::Row,
                })
            })
            .collect::<Result<Vec<_>, SourceError>>()?;
        for e in &batch {
            let seq = e.event.seq.unwrap_or_default();
            self.in_flight.push_back(seq);
            self.highest_claimed = self.highest_claimed.max(seq);
        }
        Ok(batch)
    }

    async fn wait_for_wakeup(&mut self, shutdown: &CancellationToken) {
        let interval = self.settings.poll_interval;
        match &mut self.listener {
            Some(listener) => tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(interval) => {}
                n = listener.recv() => if let Err(e) = n {
                    tracing::debug!(error = %e, "notification listener interrupted; polling until it reconnects");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(interval) => {}
                    }
                }
            },
            None => tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(interval) => {}
            },
        }
    }
}

#[async_trait]
impl Source for PollingSource {
    fn name(&self) -> &'static str {
        "polling"
    }

    async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SourceEvent>, SourceError> {
        loop {
            if shutdown.is_cancelled() {
                return Ok(Vec::new());
            }
            let batch = self.claim(max).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            self.wait_for_wakeup(shutdown).await;
        }
    }

    async fn poll_batch(&mut self, max: usize) -> Result<Vec<SourceEvent>, SourceError> {
        self.claim(max).await
    }

    async fn acknowledge(&mut self, delivered: &[SourceEvent]) -> Result<(), SourceError> {
        let ids: Vec<Uuid> = delivered.iter().map(|e| e.event.id).collect();
        acknowledge_rows(
            self.leader.connection(),
            &self.settings.table,
            self.settings.acknowledgement,
            &ids,
        )
        .await
        .map_err(|error| SourceError::Database {
            source_name: "polling",
            error,
        })?;
        let done: std::collections::HashSet<i64> =
            delivered.iter().filter_map(|e| e.event.seq).collect();
        self.in_flight.retain(|seq| !done.contains(seq));
        Ok(())
    }

    async fn rewind(&mut self) -> Result<(), SourceError> {
        // No cursor: unacknowledged rows are still unpublished and come back in the next batch.
        self.in_flight.clear();
        Ok(())
    }

    async fn park(&mut self, requests: &[ParkRequest]) -> Result<(), SourceError> {
        crate::park::park(self.leader.connection(), &self.settings.table, requests)
            .await
            .map_err(|error| SourceError::Database {
                source_name: "polling",
                error,
            })
    }

    async fn blocked_aggregates(&mut self) -> Result<HashMap<AggregateKey, Uuid>, SourceError> {
        crate::park::blocked_aggregates(self.leader.connection(), &self.settings.table)
            .await
            .map_err(|error| SourceError::Database {
                source_name: "polling",
                error,
            })
    }
}
