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
use outbox_core::{MalformedEvent, OutboxTable, StoredEvent, check_schema_version, parse_headers};
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use std::collections::{HashMap, VecDeque};

use crate::config::RowAcknowledgement;
use crate::failure::{ErrorKind, Report};
use crate::leader::Leadership;
use crate::park::{AggregateKey, ParkRequest};
use crate::source::row_marks::{RELAY_PLANNER_SETTINGS, RowMarks};
use crate::source::{Position, Source, SourceError, SourceEvent};

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

/// A row of the outbox table whose `id` or `seq` cannot be read: the table is not an outbox
/// table ([`ErrorKind::Contract`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read column `{column}` of the outbox table (is it an outbox table? run `outbox-relay migrate`)"
)]
pub struct UnreadableColumn {
    /// The column.
    pub column: &'static str,
    /// The driver's error.
    #[source]
    pub error: sqlx::Error,
}

/// Turns a row selected with [`EVENT_COLUMNS`] into an event. A row that is not a valid event
/// (a column of an unexpected type, `headers` that are not a JSON object, a `schema_version`
/// below 1) comes back as the inner `Err`, with what could be read, so the relay can park it; only
/// an unreadable `id` or `seq` — the table itself is not an outbox table — is an error.
pub(crate) fn event_from_row(
    row: &sqlx::postgres::PgRow,
) -> Result<Result<StoredEvent, MalformedEvent>, SourceError> {
    let fatal = |column: &'static str, error: sqlx::Error| {
        SourceError::new(
            "polling",
            ErrorKind::Contract,
            UnreadableColumn { column, error },
        )
    };
    let id: Uuid = row.try_get("id").map_err(|e| fatal("id", e))?;
    let seq: Option<i64> = row.try_get("seq").map_err(|e| fatal("seq", e))?;
    let mut problems = Vec::new();
    /// A column's value, or `None` with the problem noted.
    fn get<'r, T>(
        row: &'r sqlx::postgres::PgRow,
        column: &str,
        problems: &mut Vec<String>,
    ) -> Option<T>
    where
        T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        match row.try_get(column) {
            Ok(v) => Some(v),
            Err(e) => {
                problems.push(format!("column `{column}`: {e}"));
                None
            }
        }
    }
    let mut ev = StoredEvent::new(
        id,
        get::<String>(row, "aggregatetype", &mut problems).unwrap_or_default(),
        get::<String>(row, "aggregateid", &mut problems).unwrap_or_default(),
        get::<String>(row, "type", &mut problems).unwrap_or_default(),
    );
    ev.seq = seq;
    ev.payload = get(row, "payload", &mut problems).flatten();
    ev.created_at = get::<Option<DateTime<Utc>>>(row, "created_at", &mut problems).flatten();
    ev.traceparent = get(row, "tracingspancontext", &mut problems).flatten();
    if let Some(h) = get::<Option<String>>(row, "headers", &mut problems).flatten() {
        match parse_headers(&h) {
            Ok(h) => ev.headers = h,
            Err(reason) => problems.push(reason),
        }
    }
    if let Some(v) = get::<i32>(row, "schema_version", &mut problems) {
        match check_schema_version(v) {
            Ok(v) => ev.schema_version = v,
            Err(reason) => problems.push(reason),
        }
    }
    ev.topic = get(row, "topic", &mut problems).flatten();
    ev.aggregate_seq = get(row, "aggregate_seq", &mut problems).flatten();
    if problems.is_empty() {
        Ok(Ok(ev))
    } else {
        Ok(Err(MalformedEvent {
            id: Some(id),
            reason: problems.join("; "),
            salvaged: Box::new(ev),
        }))
    }
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
    /// Acknowledgements running beside the pipeline; each releases its rows' `seq`s from
    /// `in_flight` once durable.
    marks: RowMarks<Vec<i64>>,
    /// A claim stops before the row that would take its payloads past this
    /// ([`Source::limit_batch_bytes`]); the first row is always claimed.
    max_batch_bytes: i64,
    /// Mean payload size of the last claim: the next claim asks the server for about as many
    /// rows as the byte bound admits, so it does not render a thousand large payloads to
    /// return two.
    mean_payload: usize,
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
            let mut listener = PgListener::connect_with(&pool)
                .await
                .map_err(|error| SourceError::database("polling", error))?;
            // The channel of the table as resolved on the leader's session: the trigger names it
            // after the table it fires on, whatever spelling configured this relay.
            let channel = settings
                .table
                .resolve(&mut *leader.connection().await)
                .await
                .map_err(|error| SourceError::database("polling", error))?
                .notify_channel();
            listener
                .listen(&channel)
                .await
                .map_err(|error| SourceError::database("polling", error))?;
            Some(listener)
        } else {
            None
        };
        // Rows in flight are excluded by value, not by a cursor: a row with a lower `seq` that
        // commits late is still claimed by the next batch.
        // The claim is cut by size too: of the first `$1` rows, those whose preceding payloads
        // (in `seq` order) stay under `$3` bytes, so a backlog of large events is not read
        // into memory a thousand at a time. The first row always qualifies.
        let claim_sql = format!(
            "SELECT * FROM (SELECT c.*, sum(coalesce(octet_length(c.payload), 0)) OVER (ORDER BY c.seq) \
                 - coalesce(octet_length(c.payload), 0) AS bytes_before FROM ( \
             SELECT {EVENT_COLUMNS} FROM {} WHERE published_at IS NULL AND NOT (seq = ANY($2)) {} \
             ORDER BY seq LIMIT $1) c) b WHERE b.bytes_before < $3 ORDER BY b.seq",
            settings.table.qualified(),
            // Broken on purpose, in the test-only `mutants` build: the `WHERE seq > :last` trap.
            if crate::faults::mutant("cursor") {
                "AND seq > $4"
            } else {
                ""
            }
        );
        // The claim must be an ordered scan of the unpublished-rows index, and its in-flight
        // exclusion a hash lookup. With a generic plan PostgreSQL compares every scanned row with
        // every in-flight `seq` one by one (37 ms for a batch of 1000 with 2000 in flight, against
        // 2.5 ms when the array is a constant it can hash), so the claim is planned for each call;
        // and a freshly filled table without statistics made those custom plans a bitmap scan
        // plus a sort of the whole backlog (94 ms for 50k rows), so that shape is ruled out on
        // this session, which only runs the relay's own statements.
        for (name, value) in RELAY_PLANNER_SETTINGS {
            sqlx::query(AssertSqlSafe(format!("SET {name} = {value}")))
                .execute(&mut *leader.connection().await)
                .await
                .map_err(|error| SourceError::database("polling", error))?;
        }
        let marks = RowMarks::new(
            crate::source::row_marks::pool(options),
            settings.table.clone(),
            settings.acknowledgement,
            Some(leader.lease()),
        );
        Ok(Self {
            settings,
            leader,
            listener,
            claim_sql,
            in_flight: VecDeque::new(),
            highest_claimed: 0,
            marks,
            max_batch_bytes: i64::MAX,
            mean_payload: 0,
        })
    }

    /// Stops excluding rows whose acknowledgement is durable.
    fn release(&mut self, done: Vec<Vec<i64>>) {
        if done.is_empty() {
            return;
        }
        let done: std::collections::HashSet<i64> = done.into_iter().flatten().collect();
        self.in_flight.retain(|seq| !done.contains(seq));
    }

    async fn claim(&mut self, max: usize) -> Result<Vec<SourceEvent>, SourceError> {
        let done = self
            .marks
            .completed()
            .await
            .map_err(|e| e.into_source_error("polling"))?;
        self.release(done);
        let in_flight: Vec<i64> = self.in_flight.iter().copied().collect();
        let max = match self.mean_payload {
            0 => max,
            mean => max.min(
                (usize::try_from(self.max_batch_bytes).unwrap_or(usize::MAX) / mean)
                    .saturating_add(1),
            ),
        };
        let mut claim = sqlx::query(AssertSqlSafe(self.claim_sql.as_str()))
            .bind(max as i64)
            .bind(&in_flight)
            .bind(self.max_batch_bytes);
        if crate::faults::mutant("cursor") {
            claim = claim.bind(self.highest_claimed);
        }
        let rows = claim
            .fetch_all(&mut *self.leader.connection().await)
            .await
            .map_err(|error| SourceError::database("polling", error))?;
        let batch = rows
            .iter()
            .map(|row| Ok(SourceEvent::decoded(event_from_row(row)?, Position::Row)))
            .collect::<Result<Vec<_>, SourceError>>()?;
        if !batch.is_empty() {
            let bytes: usize = batch
                .iter()
                .map(|e| e.event.payload.as_ref().map_or(0, String::len))
                .sum();
            self.mean_payload = bytes / batch.len();
        }
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

    fn limit_batch_bytes(&mut self, bytes: usize) {
        self.max_batch_bytes = i64::try_from(bytes).unwrap_or(i64::MAX).max(1);
    }

    /// Starts marking (or deleting) the rows in the background ([`RowMarks`]); they stay
    /// excluded from claims until that is durable.
    async fn acknowledge(&mut self, delivered: &[SourceEvent]) -> Result<(), SourceError> {
        let seqs = delivered.iter().filter_map(|e| e.event.seq).collect();
        let done = self
            .marks
            .submit(delivered.iter().map(|e| &e.event), seqs)
            .await
            .map_err(|e| e.into_source_error("polling"))?;
        self.release(done);
        Ok(())
    }

    async fn rewind(&mut self) -> Result<(), SourceError> {
        // Acknowledgements still running concern delivered rows: let them finish, so those rows
        // are not claimed again. One that fails leaves its rows due (published again).
        if let Err(e) = self.marks.finish().await {
            tracing::warn!(error = %Report(&e), "acknowledgement failed during a rewind; those events will be published again");
        }
        // No cursor: unacknowledged rows are still unpublished and come back in the next batch.
        self.in_flight.clear();
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        let done = self
            .marks
            .finish()
            .await
            .map_err(|e| e.into_source_error("polling"))?;
        self.release(done);
        Ok(())
    }

    async fn park(&mut self, requests: &[ParkRequest]) -> Result<(), SourceError> {
        crate::park::park(
            &mut *self.leader.connection().await,
            &self.settings.table,
            requests,
        )
        .await
        .map_err(|error| SourceError::database("polling", error))
    }

    async fn blocked_aggregates(&mut self) -> Result<HashMap<AggregateKey, Uuid>, SourceError> {
        crate::park::blocked_aggregates(&mut *self.leader.connection().await, &self.settings.table)
            .await
            .map_err(|error| SourceError::database("polling", error))
    }
}
