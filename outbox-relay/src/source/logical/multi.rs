//! Several outbox tables on one slot: the multi-table logical source of a multi-table relay
//! ([`crate::RelayGroup`] with `source = "logical"`).
//!
//! One [`LogicalSource`] (one slot, one publication `FOR TABLE a, b, …`) decodes every table's
//! inserts, each event tagged with its table (pgoutput `Relation` messages name the table of
//! every relation id). The [`Hub`] reads it and hands each event to its table's [`Feed`]; each
//! table's pipeline reads its feed through a [`FeedSource`], with its own routing, write mode,
//! parking and metrics, exactly like a table of a polling group.
//!
//! Figures: the slot's reader counts the slot's own [`LogicalMetrics`] (sessions, heartbeats,
//! confirmed LSN, `wal_status`; the group keeps them across its openings of the slot), and each
//! feed counts its table's share into the table's own (events handed to it, rows and pages its
//! backfill re-published), so `/metrics` shows them per table ([`HubHandle::feed`]).
//!
//! # Guarantees
//!
//! - **Per-table, per-aggregate order.** The hub hands events on in the slot's order (commit
//!   order, then WAL order within a transaction), and a feed returns them in the order it got
//!   them; after a rewind (a failed delivery) a feed returns its unacknowledged events again, in
//!   the same order, before anything newer.
//! - **The slot confirms only what every table acknowledged.** The hub keeps every event it
//!   handed on in one window, in slot order. A table's acknowledgement (once Kafka acknowledged
//!   its events; see [`FeedSource`] for its row marks in `table` mode) counts for that table's
//!   oldest events; the hub acknowledges to the
//!   slot the longest prefix of its window whose events are all acknowledged, so the confirmed
//!   LSN never passes an event of any table that Kafka has not acknowledged. A slow table holds
//!   the slot back (WAL is retained) but not the other tables' delivery, up to the hub's window
//!   bound ([`Hub::new`]).
//! - **Crash safety** is the slot's: after a crash or a lost leadership everything not confirmed
//!   is streamed again (duplicates bounded by the hub's window plus one status interval). In
//!   `table` mode with deferred marks, rows delivered but not yet marked (at most 60,000 per
//!   table, about 1 s of a busy table's rows) are published again by the next generation's
//!   backfill.
//! - **Tables added while running** ([`TableRegistry::add`]) are tagged before they join the
//!   publication, so their first streamed insert already has a feed waiting.
//! - **A table dropped or removed from the publication is loud**: [`TableRegistry::check`] fails
//!   naming it (the group stops the relay), rather than letting its events silently stop.
//! - **No loss of rows committed before a table joined the stream (`table` mode).** A feed made
//!   with a table to backfill ([`HubHandle::feed`]: every table of a generation, after the slot
//!   was opened, and a table added by a re-scan, after its `ALTER PUBLICATION` committed) first
//!   re-publishes the table's unpublished rows, read in one snapshot taken after the table
//!   joined, in `seq` order, with the single-table source's page reader (`RowPages`, in the
//!   private `republication` module); the table's streamed events are held meanwhile (they
//!   stay in the hub's window, so the slot confirms nothing past them) and returned after
//!   the last re-published row, so per-aggregate order holds. A streamed event committed before
//!   the snapshot whose row was re-published is a duplicate: it is not returned but
//!   acknowledged to the hub once everything before it in the feed was acknowledged (its
//!   re-published copy marked). Re-published rows are durable by their missing
//!   `published_at` only, so every generation backfills again: a crash mid-backfill repeats it,
//!   and a row can be delivered twice only across a crash or a failed delivery (as for streamed
//!   events).
//!
//! # Limits (documented decisions)
//!
//! - The slot decodes inserts (`insert_delete`-style). In `table` mode with `acknowledgement =
//!   "mark"` each feed defers its streamed rows' marks like the single-table source (its private
//!   `settle` module, one per table) but without its recovery round: a mark lost with the
//!   process is redone by publishing the row again (the next generation's backfill), not by
//!   marking it without a re-send. Re-published rows and deletions are acknowledged per batch,
//!   before the hub may confirm past them.
//! - In `insert_delete` mode there is nothing to re-publish (rows are deleted as they are
//!   written): events written into a table before it joined the publication are gone. A table
//!   added by a re-scan that already saw inserts is logged as an error ([`TableRegistry::add`]
//!   returns how many PostgreSQL counted). A lost slot is fatal.
//! - `logical_message` mode cannot be attributed to a table and is refused with several tables.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::OutboxTable;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::republication::RowPages;
use super::settle::{Settle, SettleLimits};
use super::slot::{self, PublicationName, ResolvedTable};
use super::{LogicalError, LogicalSource, Lsn};
use crate::config::RowAcknowledgement;
use crate::failure::ErrorKind;
use crate::leader::{Leadership, Lease};
use crate::source::row_marks::RowKeys;
use crate::source::{Position, Source, SourceError, SourceEvent};
use crate::stats::LogicalMetrics;

/// How often the hub looks for new events while its window is not empty (acknowledgements wake
/// it at once).
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// When a feed's deferred row marks start while its table is busy. Tighter than the
/// single-table source's (250,000 rows or 10 s): this path has no recovery round, so rows
/// recorded but not yet marked when the process dies are published again by the next
/// generation's backfill. At most `max_unsettled` rows plus one running mark of `rows` are
/// exposed; with a mark due after 1 s, that is about one status interval of a table's events, the
/// same order as what the slot itself streams again after a crash.
const FEED_SETTLE_LIMITS: SettleLimits = SettleLimits {
    rows: 20_000,
    delay: Duration::from_secs(1),
    max_unsettled: 40_000,
};

/// How often a waiting feed looks at its deferred row marks while some are recorded or running
/// (to start them once due, and to collect a finished or failed one).
const SETTLE_TICK: Duration = Duration::from_millis(250);

/// The tables one slot decodes, by tag; shared between the source (which tags each insert) and
/// the group (which adds tables). Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct TableRegistry {
    tables: Arc<RwLock<Vec<ResolvedTable>>>,
    db: Option<(PgPool, PublicationName)>,
}

impl TableRegistry {
    pub(super) fn new(
        tables: Vec<ResolvedTable>,
        pool: PgPool,
        publication: PublicationName,
    ) -> Self {
        Self {
            tables: Arc::new(RwLock::new(tables)),
            db: Some((pool, publication)),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<ResolvedTable>> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The tag of the first table matching `is`.
    pub(super) fn position(&self, is: impl Fn(&ResolvedTable) -> bool) -> Option<u16> {
        self.read().iter().position(is).map(|i| i as u16)
    }

    /// The tables, by tag, as `schema.table`.
    pub fn names(&self) -> Vec<String> {
        self.read()
            .iter()
            .map(|t| format!("{}.{}", t.schema, t.name))
            .collect()
    }

    /// Starts decoding `table` too: tags it, then adds it to the publication
    /// (`ALTER PUBLICATION … ADD TABLE`, quoted; a member already is fine). Returns its tag; a
    /// table registered already keeps its tag. Its inserts are streamed from the commit of that
    /// statement on.
    pub async fn add(&self, table: &OutboxTable) -> Result<u16, LogicalError> {
        let Some((pool, publication)) = &self.db else {
            return Err(LogicalError::Config(
                "tables can be added only to a multi-table slot".into(),
            ));
        };
        let resolved = slot::resolve_table(pool, table).await?;
        let tag = {
            let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = tables.iter().position(|t| *t == resolved) {
                return Ok(i as u16);
            }
            if tables.len() >= usize::from(u16::MAX) {
                return Err(LogicalError::Config("too many tables for one slot".into()));
            }
            tables.push(resolved.clone());
            tables.len() - 1
        };
        if let Err(e) = slot::add_publication_table(pool, publication, &resolved).await {
            let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
            if tables.len() == tag + 1 {
                tables.pop();
            }
            return Err(e);
        }
        Ok(tag as u16)
    }

    /// How many rows PostgreSQL's cumulative statistics counted inserted into `table` (0 when
    /// it has no statistics yet; approximate: the statistics lag a little).
    pub async fn inserts_counted(&self, table: &OutboxTable) -> Result<i64, LogicalError> {
        let Some((pool, _)) = &self.db else {
            return Ok(0);
        };
        let resolved = slot::resolve_table(pool, table).await?;
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce((SELECT n_tup_ins FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname = $2), 0)",
        )
        .bind(&resolved.schema)
        .bind(&resolved.name)
        .fetch_one(pool)
        .await
        .map_err(|source| LogicalError::Database {
            context: "counting the inserts into a new table",
            source,
        })
    }

    /// Fails with [`LogicalError::Publication`] naming the first table that was dropped or is no
    /// longer a member of the publication.
    pub async fn check(&self) -> Result<(), LogicalError> {
        let Some((pool, publication)) = &self.db else {
            return Ok(());
        };
        let tables = self.read().clone();
        slot::check_publication_tables(pool, publication, &tables).await
    }
}

/// One table's share of the slot: the events the hub handed to it, until its pipeline
/// acknowledged them.
#[derive(Debug)]
pub struct Feed {
    tag: u16,
    state: Mutex<FeedState>,
    notify: Notify,
    acks: mpsc::UnboundedSender<(u16, usize)>,
    /// The re-publication of the table's unpublished rows (`table` mode), until it was read to
    /// the end.
    backfill: tokio::sync::Mutex<Option<Backfill>>,
    /// The table's share of the slot's figures: the events handed to this feed, the rows and
    /// pages its backfill re-published (the table's [`crate::stats::RelayStats::logical`]).
    counts: Arc<LogicalMetrics>,
    /// The deferred row marks of the table's streamed rows (`table` mode, `mark`), kept here
    /// between the openings of its [`FeedSource`] (a pipeline restarted after a failure still
    /// marks what its previous opening recorded); taken by the open one.
    settle: Mutex<Option<Settle>>,
}

/// A table's re-publication when it joins the stream: [`RowPages`] opened on first use (and
/// again, after the last row read, when a read failed).
struct Backfill {
    options: sqlx::postgres::PgConnectOptions,
    table: OutboxTable,
    pages: Option<RowPages>,
    after: i64,
}

impl std::fmt::Debug for Backfill {
    // The connect options hold the password: left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backfill")
            .field("table", &self.table)
            .field("pages", &self.pages)
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

/// The rows a feed's backfill re-published, and the WAL position after its snapshot: a streamed
/// event committed before that position whose id is here is a duplicate.
#[derive(Debug, Default)]
struct Dedupe {
    ids: HashSet<uuid::Uuid>,
    until: u64,
}

#[derive(Debug, Default)]
struct FeedState {
    /// Handed on by the hub, not yet returned to the pipeline (or returned again after a rewind).
    pending: VecDeque<SourceEvent>,
    /// Returned to the pipeline, not yet acknowledged.
    returned: VecDeque<SourceEvent>,
    /// Why the hub stopped feeding this table.
    ended: Option<String>,
    /// The backfill is not read to the end: streamed events wait in `held`.
    backfilling: bool,
    held: VecDeque<SourceEvent>,
    dedupe: Option<Dedupe>,
    /// Duplicates skipped (and acknowledged to the hub).
    skipped: u64,
    /// The PostgreSQL instance the latest streamed events came from ([`slot::instance`]).
    instance: Option<Arc<str>>,
    /// Events handed on before the stream moved to another instance and not yet acknowledged:
    /// their rows are not recorded for a deferred mark (a `seq` may name another row there);
    /// they stay unpublished, so the next generation's backfill publishes and marks them.
    from_old_instance: usize,
}

impl Feed {
    fn state(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, events: impl IntoIterator<Item = SourceEvent>, instance: Option<&str>) {
        {
            let mut s = self.state();
            if let Some(new) = instance
                && s.instance.as_deref() != Some(new)
            {
                if s.instance.is_some() {
                    s.from_old_instance = s.pending.len() + s.returned.len() + s.held.len();
                }
                s.instance = Some(Arc::from(new));
            }
            if s.backfilling {
                s.held.extend(events);
            } else {
                s.pending.extend(events);
            }
        }
        self.notify.notify_one();
    }

    /// While the backfill is not read to the end and nothing is pending: reads its next page
    /// into `pending` (an empty page ends it and releases the held streamed events behind the
    /// last re-published row).
    async fn fill(&self, max: usize, bytes: usize) -> Result<(), SourceError> {
        {
            let s = self.state();
            if !s.backfilling || !s.pending.is_empty() {
                return Ok(());
            }
        }
        let mut guard = self.backfill.lock().await;
        let Some(b) = guard.as_mut() else {
            return Ok(());
        };
        let fail = |e: LogicalError| {
            let kind = e.kind();
            SourceError::new("logical", kind, e)
        };
        if b.pages.is_none() {
            let (mut pages, rows) = RowPages::open(&b.options, b.table.clone(), None, b.after)
                .await
                .map_err(fail)?;
            let until = pages.position().await.map_err(fail)?;
            let mut s = self.state();
            let d = s.dedupe.get_or_insert_with(Dedupe::default);
            d.until = d.until.max(until);
            drop(s);
            if rows > 0 {
                tracing::warn!(
                    table = %b.table,
                    rows,
                    "re-publishing the table's unpublished rows before its streamed ones"
                );
            }
            b.pages = Some(pages);
        }
        let pages = b.pages.as_mut().expect("opened above");
        let page = match pages.next(max, bytes).await {
            Ok(page) => page,
            Err(e) => {
                // The next attempt reads on, in a new snapshot, after the last row read.
                b.after = pages.after();
                b.pages = None;
                return Err(fail(e));
            }
        };
        b.after = pages.after();
        let (rows, pages_read) = (pages.rows, pages.pages);
        let mut s = self.state();
        if page.is_empty() {
            tracing::info!(
                table = %b.table,
                rows,
                pages = pages_read,
                held = s.held.len(),
                "re-publication of the table's unpublished rows read to the end; its streamed events follow"
            );
            *guard = None;
            s.backfilling = false;
            let held = std::mem::take(&mut s.held);
            s.pending.extend(held);
        } else {
            self.counts.backfill_pages.inc_by(1);
            self.counts.rows_backfilled.inc_by(page.len() as u64);
            let d = s.dedupe.get_or_insert_with(Dedupe::default);
            d.ids.extend(page.iter().map(|e| e.event.id));
            s.pending.extend(page);
        }
        drop(s);
        self.notify.notify_one();
        Ok(())
    }

    fn end(&self, reason: String) {
        self.state().ended = Some(reason);
        self.notify.notify_one();
    }

    /// Everything returned but not acknowledged is returned again first.
    fn rewind(&self) {
        let mut s = self.state();
        while let Some(e) = s.returned.pop_back() {
            s.pending.push_front(e);
        }
    }

    /// Up to `max` pending events, cut at `bytes` of payload (at least one when any is pending).
    fn take(&self, max: usize, bytes: usize) -> Result<Vec<SourceEvent>, SourceError> {
        let mut guard = self.state();
        let s = &mut *guard;
        if s.pending.is_empty() {
            if let Some(reason) = &s.ended {
                return Err(SourceError::new(
                    "logical",
                    ErrorKind::Unavailable,
                    LogicalError::Replication(format!("the slot's reader stopped: {reason}")),
                ));
            }
            return Ok(Vec::new());
        }
        let mut n = 0;
        let mut size = 0usize;
        let mut skipped = 0;
        loop {
            if n >= max.max(1) || (n > 0 && size >= bytes) {
                break;
            }
            let Some(e) = s.pending.get(n) else {
                break;
            };
            match duplicate(&mut s.dedupe, e) {
                Some(true) if n == 0 && s.returned.is_empty() => {
                    // Everything before it in this feed, its re-published copy included, is
                    // acknowledged: the hub may confirm past it.
                    s.pending.pop_front();
                    skipped += 1;
                    continue;
                }
                // Returned once what is in flight is acknowledged.
                Some(true) => break,
                _ => {}
            }
            let e = &s.pending[n];
            size += e.event.payload.as_ref().map_or(0, String::len);
            n += 1;
        }
        if skipped > 0 {
            s.skipped += skipped as u64;
            tracing::debug!(
                skipped,
                "streamed events already re-published from the table skipped"
            );
            let _ = self.acks.send((self.tag, skipped));
        }
        let batch: Vec<SourceEvent> = s.pending.drain(..n).collect();
        s.returned.extend(batch.iter().cloned());
        Ok(batch)
    }
}

/// Whether `e` is a streamed duplicate of a re-published row (`Some(true)`); forgets the
/// re-published ids once the stream passed the backfill's snapshot.
fn duplicate(dedupe: &mut Option<Dedupe>, e: &SourceEvent) -> Option<bool> {
    let d = dedupe.as_ref()?;
    let Position::Wal { commit_lsn, .. } = e.position else {
        return Some(false);
    };
    if commit_lsn >= d.until {
        *dedupe = None;
        return None;
    }
    Some(d.ids.contains(&e.event.id))
}

/// How a [`FeedSource`] acknowledges its rows in `table` mode.
#[derive(Debug, Clone)]
pub struct FeedMarks {
    /// Sessions for the statements (the group's pool).
    pub pool: PgPool,
    /// The table whose rows are marked.
    pub table: OutboxTable,
    /// Mark `published_at`, or delete.
    pub how: RowAcknowledgement,
}

/// The [`Source`] of one table of a multi-table slot: the events the [`Hub`] handed to its
/// [`Feed`]. Honours the source contract per table: committed only, per-aggregate order, no loss
/// (an unacknowledged event is returned again after a rewind or a reopening), acknowledgement is
/// a prefix.
///
/// Row acknowledgements in `table` mode: with `acknowledgement = "mark"` the rows of a batch of
/// streamed events are recorded when Kafka acknowledged them and marked later, in large
/// background statements, exactly as the single-table source does (the private `settle`
/// module: when the feed is idle, when 20,000 rows wait, or after 1 s; fenced by the table's
/// lease): the hub may confirm past them at once, the confirmed slot position being their
/// durable record of delivery. A row is never marked before its acknowledgement; a recorded row
/// whose mark is lost (a crash, a lost lease, a failed stop) is still unpublished, so the next
/// generation's backfill publishes it again and marks it (a duplicate, never a row left
/// unmarked). Batches holding re-published rows, and `acknowledgement = "delete"`, are marked
/// (or deleted) before the hub may confirm past them.
#[derive(Debug)]
pub struct FeedSource {
    feed: Arc<Feed>,
    #[allow(
        dead_code,
        reason = "held for its `Drop`: the table's leader lock lives as long as the source"
    )]
    leader: Option<Leadership>,
    lease: Option<Lease>,
    marks: Option<FeedMarks>,
    /// The feed's deferred row marks while this opening holds them (handed back on drop).
    settle: Option<Settle>,
    batch_bytes: usize,
}

impl FeedSource {
    /// Opens `feed` for its table's pipeline: whatever an earlier opening returned without an
    /// acknowledgement is returned again first. `leader` (the table's leader lock) fences the row
    /// marks with its lease.
    pub fn open(feed: Arc<Feed>, leader: Option<Leadership>, marks: Option<FeedMarks>) -> Self {
        feed.rewind();
        let lease = leader.as_ref().map(Leadership::lease);
        let settle = marks
            .as_ref()
            .filter(|m| m.how == RowAcknowledgement::Mark)
            .map(|m| {
                let kept = feed.settle.lock().unwrap_or_else(|p| p.into_inner()).take();
                match kept {
                    Some(mut settle) => {
                        settle.set_lease(lease.clone());
                        settle
                    }
                    None => Settle::with_limits(
                        m.pool.clone(),
                        m.table.clone(),
                        lease.clone(),
                        FEED_SETTLE_LIMITS,
                    ),
                }
            });
        Self {
            lease,
            feed,
            leader,
            marks,
            settle,
            batch_bytes: usize::MAX,
        }
    }

    /// Starts the deferred row marks that are due (all of them when the feed is idle: nothing
    /// pending, in flight or held back by a backfill) and collects a finished one.
    async fn poll_settle(&mut self) -> Result<(), SourceError> {
        let Some(settle) = self.settle.as_mut() else {
            return Ok(());
        };
        let (idle, instance) = {
            let s = self.feed.state();
            (
                s.pending.is_empty() && s.returned.is_empty() && !s.backfilling,
                s.instance.clone(),
            )
        };
        settle
            .poll(Lsn::ZERO, instance.as_deref(), idle)
            .await
            .map_err(fail)
    }

    /// Records the rows of the streamed events `delivered` (just acknowledged by Kafka) for a
    /// deferred mark; those handed on before the stream moved to another instance are left to
    /// the next generation's backfill.
    async fn record(&mut self, delivered: &[SourceEvent]) -> Result<(), SourceError> {
        let Some(settle) = self.settle.as_mut() else {
            return Ok(());
        };
        let (skip, instance) = {
            let mut s = self.feed.state();
            let skip = s.from_old_instance.min(delivered.len());
            s.from_old_instance -= skip;
            (skip, s.instance.clone())
        };
        if skip > 0 {
            tracing::warn!(
                rows = skip,
                "rows streamed before PostgreSQL restarted or failed over are not marked now; \
                 the next generation's backfill publishes them again"
            );
        }
        settle
            .record(
                RowKeys::of(delivered[skip..].iter().map(|d| &d.event)),
                instance.as_deref(),
            )
            .await
            .map_err(fail)
    }
}

impl Drop for FeedSource {
    fn drop(&mut self) {
        // The next opening of the feed marks what this one recorded.
        if let Some(settle) = self.settle.take() {
            *self.feed.settle.lock().unwrap_or_else(|p| p.into_inner()) = Some(settle);
        }
    }
}

fn fail(e: LogicalError) -> SourceError {
    let kind = e.kind();
    SourceError::new("logical", kind, e)
}

#[async_trait]
impl Source for FeedSource {
    fn name(&self) -> &'static str {
        "logical"
    }

    async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SourceEvent>, SourceError> {
        let feed = self.feed.clone();
        loop {
            let notified = feed.notify.notified();
            feed.fill(max, self.batch_bytes).await?;
            let batch = feed.take(max, self.batch_bytes)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            // Caught up: the rows recorded so far are marked now.
            self.poll_settle().await?;
            let tick = self.settle.as_ref().is_some_and(Settle::busy);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Vec::new()),
                _ = notified => {}
                _ = tokio::time::sleep(SETTLE_TICK), if tick => {}
            }
        }
    }

    async fn poll_batch(&mut self, max: usize) -> Result<Vec<SourceEvent>, SourceError> {
        self.feed.fill(max, self.batch_bytes).await?;
        match self.feed.take(max, self.batch_bytes) {
            Err(_) => Ok(Vec::new()),
            ok => ok,
        }
    }

    fn limit_batch_bytes(&mut self, bytes: usize) {
        self.batch_bytes = bytes.max(1);
    }

    async fn acknowledge(&mut self, delivered: &[SourceEvent]) -> Result<(), SourceError> {
        if delivered.is_empty() {
            return Ok(());
        }
        {
            let s = self.feed.state();
            let prefix = delivered.len() <= s.returned.len()
                && delivered
                    .iter()
                    .zip(s.returned.iter())
                    .all(|(d, r)| d.event.id == r.event.id);
            if !prefix {
                return Err(SourceError::new(
                    "logical",
                    ErrorKind::Contract,
                    LogicalError::Replication(
                        "acknowledged events are not the oldest ones returned".into(),
                    ),
                ));
            }
        }
        let streamed_only = delivered
            .iter()
            .all(|d| matches!(d.position, Position::Wal { .. }));
        if self.settle.is_some() && streamed_only {
            // Deferred: the hub's confirmation is the rows' durable record until their mark.
            self.record(delivered).await?;
        } else if let Some(m) = &self.marks {
            if let Some(lease) = &self.lease {
                lease
                    .check()
                    .map_err(|e| SourceError::new("logical", ErrorKind::LeaseLost, e))?;
            }
            let mut conn = m
                .pool
                .acquire()
                .await
                .map_err(|e| SourceError::database("logical", e))?;
            crate::source::row_marks::acknowledge_rows(
                &mut conn,
                &m.table,
                m.how,
                delivered.iter().map(|d| &d.event),
            )
            .await
            .map_err(|e| SourceError::database("logical", e))?;
        }
        self.feed.state().returned.drain(..delivered.len());
        // Only streamed events are in the hub's window (re-published rows are not).
        let streamed = delivered
            .iter()
            .filter(|d| !matches!(d.position, Position::Row))
            .count();
        // The hub may be gone (the relay is stopping): the slot then streams them again.
        if streamed > 0 {
            let _ = self.feed.acks.send((self.feed.tag, streamed));
        }
        // A skipped duplicate may be waiting for this acknowledgement.
        self.feed.notify.notify_one();
        self.poll_settle().await
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        match self.settle.as_mut() {
            Some(settle) => settle.flush().await.map_err(fail),
            None => Ok(()),
        }
    }

    async fn rewind(&mut self) -> Result<(), SourceError> {
        self.feed.rewind();
        Ok(())
    }
}

/// The group's handle on a running [`Hub`]: makes the feeds of new tables.
#[derive(Clone)]
pub struct HubHandle {
    acks: mpsc::UnboundedSender<(u16, usize)>,
    feeds: mpsc::UnboundedSender<Arc<Feed>>,
    options: sqlx::postgres::PgConnectOptions,
}

impl std::fmt::Debug for HubHandle {
    // The connect options hold the password: left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubHandle").finish_non_exhaustive()
    }
}

impl HubHandle {
    /// The feed of the table with `tag` ([`TableRegistry::add`]), registered with the hub.
    ///
    /// With `backfill` (the table, in `table` mode; call this only once the table joined the
    /// stream: after the slot was opened, or after [`TableRegistry::add`]), the feed first
    /// re-publishes every row of the table unpublished in a snapshot taken at its first read,
    /// and holds the table's streamed events until then (see the [module docs](self)).
    ///
    /// The feed counts the table's share of the slot's figures into `counts` (the table's
    /// pipeline's [`crate::stats::RelayStats::logical`]): the events the hub hands it
    /// ([`LogicalMetrics::events_streamed`]) and what its backfill re-published
    /// ([`LogicalMetrics::rows_backfilled`], [`LogicalMetrics::backfill_pages`]).
    pub fn feed(
        &self,
        tag: u16,
        backfill: Option<OutboxTable>,
        counts: Arc<LogicalMetrics>,
    ) -> Arc<Feed> {
        let backfilling = backfill.is_some();
        let feed = Arc::new(Feed {
            tag,
            state: Mutex::new(FeedState {
                backfilling,
                ..FeedState::default()
            }),
            notify: Notify::new(),
            acks: self.acks.clone(),
            backfill: tokio::sync::Mutex::new(backfill.map(|table| Backfill {
                options: self.options.clone(),
                table,
                pages: None,
                after: i64::MIN,
            })),
            counts,
            settle: Mutex::new(None),
        });
        let _ = self.feeds.send(feed.clone());
        feed
    }
}

/// The reader of a multi-table slot: hands each decoded event to its table's [`Feed`] and
/// confirms to the slot only what every table acknowledged. See the [module docs](self).
pub struct Hub {
    source: LogicalSource,
    feeds: Vec<Option<Arc<Feed>>>,
    new_feeds: mpsc::UnboundedReceiver<Arc<Feed>>,
    /// Events handed on and not yet acknowledged to the slot, in slot order, with their tags
    /// (payloads dropped: only the ids and positions are needed).
    window: VecDeque<(u16, SourceEvent)>,
    /// Per tag: acknowledgements received and not yet applied to `window`.
    acked: Vec<usize>,
    acks: mpsc::UnboundedReceiver<(u16, usize)>,
    batch: usize,
    max_window: usize,
}

impl Hub {
    /// A hub over `source` (a multi-table [`LogicalSource`]) that reads batches of up to `batch`
    /// events and stops reading ahead while `max_window` events handed on are unacknowledged.
    pub fn new(source: LogicalSource, batch: usize, max_window: usize) -> (Self, HubHandle) {
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (feed_tx, new_feeds) = mpsc::unbounded_channel();
        let hub = Self {
            source,
            feeds: Vec::new(),
            new_feeds,
            window: VecDeque::new(),
            acked: Vec::new(),
            acks,
            batch: batch.max(1),
            max_window: max_window.max(1),
        };
        let handle = HubHandle {
            acks: ack_tx,
            feeds: feed_tx,
            options: (*hub.source.pool.connect_options()).clone(),
        };
        (hub, handle)
    }

    /// The slot's table registry ([`TableRegistry::add`], [`TableRegistry::check`]).
    pub fn registry(&self) -> TableRegistry {
        self.source.registry()
    }

    /// Reads the slot until `stop` is cancelled (the group cancels it once every table's
    /// pipeline ended): then applies the last acknowledgements, makes the confirmed position
    /// durable and returns `Ok`. On an error every feed ends with it (their pipelines fail as
    /// `Unavailable`) and it is returned.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), SourceError> {
        let result = self.run_inner(&stop).await;
        let reason = match &result {
            Ok(()) => "the relay is stopping".to_owned(),
            Err(e) => crate::failure::Report(e).to_string(),
        };
        for f in self.feeds.iter().flatten() {
            f.end(reason.clone());
        }
        result
    }

    async fn run_inner(&mut self, stop: &CancellationToken) -> Result<(), SourceError> {
        loop {
            if self.window.is_empty() {
                // Nothing unacknowledged: wait for the slot (heartbeats, slot checks and session
                // restarts happen in there); a stop closes the source.
                let batch = self.source.next_batch(self.batch, stop).await?;
                if batch.is_empty() {
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    continue;
                }
                self.dispatch(batch).await?;
                continue;
            }
            tokio::select! {
                biased;
                a = self.acks.recv() => if let Some((tag, n)) = a {
                    self.count(tag, n);
                },
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            while let Ok((tag, n)) = self.acks.try_recv() {
                self.count(tag, n);
            }
            self.apply_acks().await?;
            if stop.is_cancelled() {
                // Every pipeline ended: what is still unacknowledged is streamed again next time.
                self.source.close().await.map_err(|e| self.fail(e))?;
                return Ok(());
            }
            if self.window.len() < self.max_window {
                let batch = self.source.poll_batch(self.batch).await?;
                if !batch.is_empty() {
                    self.dispatch(batch).await?;
                }
            }
        }
    }

    fn fail(&self, e: LogicalError) -> SourceError {
        let kind = e.kind();
        SourceError::new("logical", kind, e)
    }

    fn count(&mut self, tag: u16, n: usize) {
        let tag = usize::from(tag);
        if self.acked.len() <= tag {
            self.acked.resize(tag + 1, 0);
        }
        self.acked[tag] += n;
    }

    /// Acknowledges to the slot the longest prefix of the window that every table acknowledged.
    async fn apply_acks(&mut self) -> Result<(), SourceError> {
        let mut prefix = Vec::new();
        while let Some((tag, _)) = self.window.front() {
            let tag = usize::from(*tag);
            match self.acked.get_mut(tag) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    if let Some((_, e)) = self.window.pop_front() {
                        prefix.push(e);
                    }
                }
                _ => break,
            }
        }
        if prefix.is_empty() {
            return Ok(());
        }
        self.source.acknowledge(&prefix).await
    }

    /// Hands a batch's events to their tables' feeds (in order) and adds them to the window.
    async fn dispatch(&mut self, batch: Vec<SourceEvent>) -> Result<(), SourceError> {
        let tags = self.source.take_tables();
        if tags.len() != batch.len() {
            return Err(self.fail(LogicalError::Replication(format!(
                "{} events but {} table tags",
                batch.len(),
                tags.len()
            ))));
        }
        let mut per_feed: Vec<Vec<SourceEvent>> = Vec::new();
        for (event, tag) in batch.into_iter().zip(tags) {
            let i = usize::from(tag);
            self.wait_for_feed(i).await?;
            let mut event = event;
            let payload = event.event.payload.take();
            self.window.push_back((tag, event.clone()));
            event.event.payload = payload;
            if per_feed.len() <= i {
                per_feed.resize_with(i + 1, Vec::new);
            }
            per_feed[i].push(event);
        }
        for (i, events) in per_feed.into_iter().enumerate() {
            if !events.is_empty()
                && let Some(Some(feed)) = self.feeds.get(i)
            {
                feed.counts.events_streamed.inc_by(events.len() as u64);
                feed.push(events, self.source.instance.as_deref());
            }
        }
        Ok(())
    }

    /// Waits until the feed of tag `i` is registered: a table is tagged before it joins the
    /// publication and its feed follows right after, so this waits at most that long.
    async fn wait_for_feed(&mut self, i: usize) -> Result<(), SourceError> {
        while self.feeds.get(i).is_none_or(Option::is_none) {
            match self.new_feeds.recv().await {
                Some(feed) => {
                    let t = usize::from(feed.tag);
                    if self.feeds.len() <= t {
                        self.feeds.resize(t + 1, None);
                    }
                    self.feeds[t] = Some(feed);
                }
                None => {
                    return Err(self.fail(LogicalError::Replication(format!(
                        "an event of table tag {i} has no feed"
                    ))));
                }
            }
        }
        Ok(())
    }
}
