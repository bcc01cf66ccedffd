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

use outbox_core::OutboxTable;

use super::lifecycle::marker_slot;
use super::{LogicalError, LogicalSource, slot};
use crate::source::{Position, SourceEvent};
use crate::table::{self, ReadError};

/// A page of a re-publication from the table holds at most this many payload bytes, whatever
/// the batch byte bound (`max_in_flight_bytes` large, or no bound set): only one page is held
/// in the source at a time.
const PAGE_MAX_BYTES: usize = 8 << 20;

/// A re-publication from the table in progress: unpublished rows read in keyset pages
/// ([`RowPages`]), the next page only once the previous one was handed on.
pub(super) struct Republication {
    /// The pages; their connection is closed once the table was read to the end.
    pub(super) pages: RowPages,
    /// Reads see exactly the rows committed before the slot's consistent point.
    pub(super) consistent: bool,
    /// The table was read to the end (an empty page came back).
    pub(super) done: bool,
}

/// Keyset pages of a table's unpublished rows (`seq > after ORDER BY seq`), every page read in
/// the same snapshot: the reading behind both the single-table re-publication
/// ([`Republication`]) and a multi-table slot's per-table backfill
/// ([`super::multi`]).
///
/// Guarantee: every row unpublished in the snapshot is returned once, in `seq` order, as a
/// [`Position::Row`] event (a malformed row too, with its defect, to be parked); a page holds
/// at most [`PAGE_MAX_BYTES`] of payload past its first row.
pub(super) struct RowPages {
    /// A connection of its own, inside a `REPEATABLE READ` transaction; closed at the end.
    conn: Option<sqlx::PgConnection>,
    table: OutboxTable,
    /// `seq` of the last row read.
    after: i64,
    /// Mean payload of the last page, to ask for fewer rows when payloads are large.
    mean_payload: usize,
    pub(super) rows: u64,
    pub(super) pages: u64,
    pub(super) largest_page_rows: usize,
    pub(super) largest_page_bytes: usize,
}

impl std::fmt::Debug for RowPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowPages")
            .field("table", &self.table)
            .field("after", &self.after)
            .field("rows", &self.rows)
            .field("done", &self.conn.is_none())
            .finish_non_exhaustive()
    }
}

impl RowPages {
    /// Opens a session of its own with `options` and starts its snapshot: the exported
    /// `snapshot` of a just-created slot when given (`name` validated by the caller: hex digits
    /// and `-`), else a new one taken now. Reads start after `seq` `after`. Returns the reader
    /// and how many rows are unpublished in the snapshot.
    pub(super) async fn open(
        options: &sqlx::postgres::PgConnectOptions,
        table: OutboxTable,
        snapshot: Option<&str>,
        after: i64,
    ) -> Result<(Self, i64), LogicalError> {
        let db = |source| LogicalError::Database {
            context: "starting the re-publication of unpublished rows",
            source,
        };
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
        // One transaction until the table was read to the end: every page reads the same rows.
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
        let rows = table::unpublished_count(&mut conn, &table)
            .await
            .map_err(db)?;
        let pages = Self {
            conn: Some(conn),
            table,
            after,
            mean_payload: 0,
            rows: 0,
            pages: 0,
            largest_page_rows: 0,
            largest_page_bytes: 0,
        };
        Ok((pages, rows))
    }

    /// The WAL insert position now, read in the snapshot's session: every row the snapshot
    /// sees was committed before it.
    pub(super) async fn position(&mut self) -> Result<u64, LogicalError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(0);
        };
        let lsn: i64 =
            sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8")
                .fetch_one(conn)
                .await
                .map_err(|source| LogicalError::Database {
                    context: "reading the WAL position of a re-publication's snapshot",
                    source,
                })?;
        Ok(u64::try_from(lsn).unwrap_or(0))
    }

    /// `seq` of the last row read.
    pub(super) fn after(&self) -> i64 {
        self.after
    }

    /// The next page: the rows after the last one read, at most `max` of them and, past the
    /// first, only while their payloads stay under `bytes` (at most [`PAGE_MAX_BYTES`]). An
    /// empty page means the table was read to the end: the transaction ends and the session
    /// closes.
    pub(super) async fn next(
        &mut self,
        max: usize,
        bytes: usize,
    ) -> Result<Vec<SourceEvent>, LogicalError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let bytes = bytes.min(PAGE_MAX_BYTES);
        let rows = match self.mean_payload {
            0 => max,
            mean => max.min(bytes / mean + 1),
        }
        .max(1);
        let page = table::unpublished_page(
            conn,
            &self.table,
            self.after,
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
        let mut events = Vec::with_capacity(n);
        for row in page {
            self.after = row.seq;
            // A malformed row is handed on too: the relay parks it with its reason.
            let event = SourceEvent::decoded(row.event, Position::Row);
            page_bytes += event.event.payload.as_ref().map_or(0, String::len);
            events.push(event);
        }
        if n > 0 {
            self.pages += 1;
            self.rows += n as u64;
            self.mean_payload = page_bytes / n;
            self.largest_page_rows = self.largest_page_rows.max(n);
            self.largest_page_bytes = self.largest_page_bytes.max(page_bytes);
            tracing::debug!(
                rows = n,
                bytes = page_bytes,
                after_seq = self.after,
                "re-publication page read"
            );
            return Ok(events);
        }
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::raw_sql("COMMIT").execute(&mut conn).await;
            let _ = sqlx::Connection::close(conn).await;
        }
        Ok(events)
    }
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
        // Rows committed after the snapshot (the slot's consistent point when it is imported,
        // else this start) arrive through the stream only, as with a single read.
        let (pages, rows) = RowPages::open(&options, outbox, snapshot, i64::MIN).await?;
        self.republication = Some(Republication {
            pages,
            consistent: snapshot.is_some(),
            done: false,
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
        if self.table.is_none() {
            return Ok(());
        }
        let Some(r) = self.republication.as_mut() else {
            return Ok(());
        };
        if r.done {
            return Ok(());
        }
        let page = r.pages.next(max, self.batch_bytes).await?;
        let n = page.len();
        if n > 0 {
            self.metrics.backfill_pages.inc_by(1);
            self.metrics.rows_backfilled.inc_by(n as u64);
            self.ready.extend(page);
            return Ok(());
        }
        r.done = true;
        let p = &r.pages;
        tracing::info!(
            rows = p.rows,
            pages = p.pages,
            largest_page_rows = p.largest_page_rows,
            largest_page_bytes = p.largest_page_bytes,
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
