//! Re-publication from the outbox table ([`Republication`]): after a `table`-mode slot was
//! created or recovered, the rows still unpublished are read in the new slot's exported snapshot,
//! in keyset pages, and handed on as [`Position::Row`] events before anything is streamed.
//!
//! Guarantee: **no loss and no double publication across a lost or new slot.** The snapshot
//! holds exactly the rows committed before the slot's consistent point (everything later is
//! streamed); the durable marker slot is dropped only once the table was read to the end and
//! every re-published row is acknowledged ([`LogicalSource::finish_backfill_if_complete`]), so an
//! interruption before that repeats the re-publication. At most one page (bounded by count and
//! by [`PAGE_MAX_BYTES`]) is held at a time.

use super::lifecycle::marker_slot;
use super::{LogicalError, LogicalSource, slot};
use crate::source::{Position, SourceEvent};
use crate::table::{self, ReadError};

/// A page of a re-publication from the table holds at most this many payload bytes, whatever
/// the batch byte bound (`max_in_flight_bytes` large, or no bound set): only one page is held
/// in the source at a time.
const PAGE_MAX_BYTES: usize = 8 << 20;

/// A re-publication from the table in progress: unpublished rows read in keyset pages
/// (`seq > after ORDER BY seq`), the next page only once the previous one was handed on.
pub(super) struct Republication {
    /// A connection of its own, inside a `REPEATABLE READ` transaction that imported the new
    /// slot's exported snapshot (or, without one, took its own at the start). Closed once the
    /// table was read to the end.
    pub(super) conn: Option<sqlx::PgConnection>,
    /// Reads see exactly the rows committed before the slot's consistent point.
    pub(super) consistent: bool,
    /// `seq` of the last row read.
    pub(super) after: i64,
    /// The table was read to the end (an empty page came back).
    pub(super) done: bool,
    /// Mean payload of the last page, to ask for fewer rows when payloads are large.
    pub(super) mean_payload: usize,
    pub(super) rows: u64,
    pub(super) pages: u64,
    pub(super) largest_page_rows: usize,
    pub(super) largest_page_bytes: usize,
}

impl LogicalSource {
    /// Whether the outbox table has rows marked published (`false` without a table).
    pub(super) async fn table_has_published_rows(&self) -> Result<bool, LogicalError> {
        let Some(t) = &self.table else {
            return Ok(false);
        };
        let db = |source| LogicalError::Database {
            context: "looking for published rows",
            source,
        };
        let mut conn = self.pool.acquire().await.map_err(db)?;
        table::has_published_rows(&mut conn, &t.table)
            .await
            .map_err(db)
    }

    /// Starts re-publishing every unpublished row of the table as [`Position::Row`] events (seq
    /// order), read in the exported `snapshot` of a just-created slot when given. Only the
    /// snapshot is imported here (while the session that exported it is still alive and idle):
    /// the rows are read page by page as the relay asks for batches ([`Self::next_page`]).
    pub(super) async fn backfill(&mut self, snapshot: Option<&str>) -> Result<(), LogicalError> {
        let Some(outbox) = self.table.as_ref().map(|t| t.table.clone()) else {
            return Ok(());
        };
        let db = |source| LogicalError::Database {
            context: "starting the re-publication of unpublished rows",
            source,
        };
        let options: sqlx::postgres::PgConnectOptions =
            self.cfg.database_url.expose().parse().map_err(db)?;
        let mut conn = {
            use sqlx::ConnectOptions;
            options.connect().await.map_err(db)?
        };
        // The keyset read must be an ordered scan of the unpublished-rows index, never a sort of
        // the whole backlog (see `RELAY_PLANNER_SETTINGS`).
        for (name, value) in crate::source::row_marks::RELAY_PLANNER_SETTINGS {
            sqlx::query(sqlx::AssertSqlSafe(format!("SET {name} = {value}")))
                .execute(&mut conn)
                .await
                .map_err(db)?;
        }
        // One transaction until the table was read to the end: every page reads the same rows —
        // those committed before the slot's consistent point when the exported snapshot is
        // imported (`name` was validated, hex digits and `-`, when the slot was created), else
        // those committed before this start (rows committed later arrive through the stream
        // only, as with a single read).
        let begin = match snapshot {
            Some(name) => format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{name}'"
            ),
            None => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_owned(),
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(begin))
            .execute(&mut conn)
            .await
            .map_err(db)?;
        let rows = table::unpublished_count(&mut conn, &outbox)
            .await
            .map_err(db)?;
        self.republication = Some(Republication {
            conn: Some(conn),
            consistent: snapshot.is_some(),
            after: i64::MIN,
            done: false,
            mean_payload: 0,
            rows: 0,
            pages: 0,
            largest_page_rows: 0,
            largest_page_bytes: 0,
        });
        self.backfill_due = true;
        if rows == 0 {
            tracing::info!("re-publishing unpublished rows from the outbox table: none");
            // Nothing to read: ends the transaction and drops the marker slot.
            return self.next_page(1).await;
        }
        tracing::warn!(
            rows,
            consistent_snapshot = snapshot.is_some(),
            "re-publishing unpublished rows from the outbox table (page by page, before streaming)"
        );
        Ok(())
    }

    /// Reads the next page of the re-publication into `ready`: the rows after the last one read,
    /// at most `max` of them and, past the first, only while their payloads stay under the batch
    /// byte bound (at most [`PAGE_MAX_BYTES`]). An empty page ends the re-publication: its
    /// transaction ends, and the marker slot goes once every row is acknowledged too.
    pub(super) async fn next_page(&mut self, max: usize) -> Result<(), LogicalError> {
        let (Some(t), Some(r)) = (&self.table, self.republication.as_mut()) else {
            return Ok(());
        };
        let Some(conn) = r.conn.as_mut() else {
            return Ok(());
        };
        let bytes = self.batch_bytes.min(PAGE_MAX_BYTES);
        let rows = match r.mean_payload {
            0 => max,
            mean => max.min(bytes / mean + 1),
        }
        .max(1);
        let page = table::unpublished_page(
            conn,
            &t.table,
            r.after,
            i64::try_from(rows).unwrap_or(i64::MAX),
            i64::try_from(bytes).unwrap_or(i64::MAX),
        )
        .await
        .map_err(|error| match error {
            ReadError::Database(source) => LogicalError::Database {
                context: "re-publishing unpublished rows",
                source,
            },
            ReadError::Unreadable { error: source, .. } => LogicalError::Database {
                context: "reading an unpublished row",
                source,
            },
        })?;
        let mut page_bytes = 0;
        let n = page.len();
        for row in page {
            r.after = row.seq;
            // A malformed row is handed on too: the relay parks it with its reason.
            let event = SourceEvent::decoded(row.event, Position::Row);
            page_bytes += event.event.payload.as_ref().map_or(0, String::len);
            self.ready.push_back(event);
        }
        if n > 0 {
            r.pages += 1;
            r.rows += n as u64;
            r.mean_payload = page_bytes / n;
            r.largest_page_rows = r.largest_page_rows.max(n);
            r.largest_page_bytes = r.largest_page_bytes.max(page_bytes);
            self.metrics.backfill_pages.inc_by(1);
            self.metrics.rows_backfilled.inc_by(n as u64);
            tracing::debug!(
                rows = n,
                bytes = page_bytes,
                after_seq = r.after,
                "re-publication page read"
            );
            return Ok(());
        }
        r.done = true;
        if let Some(mut conn) = r.conn.take() {
            let _ = sqlx::raw_sql("COMMIT").execute(&mut conn).await;
            let _ = sqlx::Connection::close(conn).await;
        }
        tracing::info!(
            rows = r.rows,
            pages = r.pages,
            largest_page_rows = r.largest_page_rows,
            largest_page_bytes = r.largest_page_bytes,
            consistent_snapshot = r.consistent,
            "re-publication from the outbox table read to the end; streaming follows"
        );
        self.finish_backfill_if_complete().await
    }

    /// Drops the marker slot once the re-publication was read to the end AND every row it
    /// re-published is durably acknowledged: an interruption before that repeats it.
    pub(super) async fn finish_backfill_if_complete(&mut self) -> Result<(), LogicalError> {
        let row = |p: &Position| matches!(p, Position::Row);
        if self.backfill_due
            && self.republication.as_ref().is_some_and(|r| r.done)
            && !self.inflight.iter().any(|f| row(&f.position))
            && !self.ready.iter().any(|e| row(&e.position))
        {
            self.release_marks(true).await?;
            self.finish_backfill().await?;
        }
        Ok(())
    }

    async fn finish_backfill(&mut self) -> Result<(), LogicalError> {
        slot::drop_slot(&self.pool, &marker_slot(&self.cfg.slot)).await?;
        self.backfill_due = false;
        self.republication = None;
        Ok(())
    }
}
