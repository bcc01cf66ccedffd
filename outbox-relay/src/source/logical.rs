//! The logical-replication source (`--source logical`): committed outbox events decoded from the
//! WAL through the built-in `pgoutput` plugin, one publication and one replication slot.
//!
//! # Guarantees
//!
//! - **Committed only, in commit order.** `pgoutput` (protocol 1, no streaming of in-progress
//!   transactions) sends a transaction only after its commit, and transactions in WAL commit order;
//!   within a transaction, events keep WAL order. A transaction is buffered until its `Commit`
//!   arrives, then all its events are returned, each carrying the transaction's commit and end LSN
//!   ([`Position::Wal`]).
//! - **Rows decoded from the WAL.** Inserted rows come from the `Insert` tuple itself (text format),
//!   never from a re-read of the table.
//! - **The slot only advances over what Kafka acknowledged.** [`Source::acknowledge`] receives the
//!   contiguous acknowledged prefix; the confirmed LSN becomes the end LSN of the last transaction
//!   entirely inside it. The replication client reports exactly that confirmed LSN in every standby status
//!   update, including replies to server keepalives (see the `stream` module); when nothing is pending
//!   (no open, buffered or unacknowledged event) a keepalive's or heartbeat's position may be
//!   confirmed, because nothing unacknowledged precedes it.
//! - **Crash safety.** After a relay crash the server resumes from the slot's
//!   `confirmed_flush_lsn`: the events in flight and those acknowledged after the last status
//!   update are sent again (bounded duplicates, detectable by event id), never fewer. After a
//!   PostgreSQL crash the slot is back at its last save to disk, which PostgreSQL makes only when
//!   the slot's restart position or catalog xmin moves: everything acknowledged since is sent
//!   again. On graceful shutdown (the `shutdown` token
//!   passed to [`Source::next_batch`]) the confirmed LSN is made durable on the slot
//!   (`pg_replication_slot_advance`) so a clean restart produces no duplicates.
//! - **Rows marked published after delivery, off the pipeline's path** (`table` mode). With
//!   `acknowledgement = "mark"`, a streamed row's LSN is confirmed as soon as Kafka acknowledged
//!   it — the slot's confirmed position is the durable record of delivery — and the row gets
//!   `published_at` later, in large background statements (the `settle` module): when the
//!   source is idle, when 250,000 rows wait, or after 10 s. A mark lost in a crash is redone by
//!   the next start, which reads the unpublished rows with the WAL position after them and marks
//!   them once the slot is confirmed past it; no row is marked before it was delivered. Until
//!   then `status` counts those rows as pending. A stop, a flush and a slot loss mark every
//!   delivered row first. Re-published rows, and `acknowledgement = "delete"`, are acknowledged
//!   per batch *before* their LSN is confirmed ([`row_marks`](super::row_marks)).
//! - **Idle heartbeats.** When nothing is in flight for `heartbeat_interval`, a non-transactional
//!   `pg_logical_emit_message(false, '<prefix>-heartbeat', '')` is written so the slot keeps
//!   advancing on an idle database and does not pin WAL.
//! - **Loud slot failures.** The slot is checked at start and every `slot_check_interval`
//!   (`wal_status`, lag). A missing or `lost` slot is an error-level event. In `table` mode it is
//!   recovered without loss: a durable marker slot `<slot>_bf` is created, then a new logical slot
//!   over the replication protocol with an exported snapshot (consistent point C); the rows
//!   still unpublished are read *in that snapshot* — exactly those committed before C — and
//!   re-published ([`Position::Row`]) before streaming from C, which carries everything committed
//!   after C. Nothing is lost and, on this path, nothing is published twice. The rows are read in
//!   keyset pages (`seq` order) of at most a batch, by count and by bytes, each page only once the
//!   previous one was handed on, in a `REPEATABLE READ` transaction of a connection of its own that
//!   imported the snapshot before the session that exported it ends; the stream starts once the
//!   table was read to the end, so a row re-published precedes every streamed event. The marker
//!   slot is dropped once the table was read to the end and every re-published row is
//!   acknowledged; a stop, crash or rewind before that drops the slot, creates it again with a
//!   fresh snapshot and re-publishes the rows still unpublished in it (duplicates only for rows
//!   delivered but not yet marked published when a crash came: with deferred marks, up to the
//!   rows delivered since the last mark). The same procedure runs the
//!   first time a slot is created in `table` mode, so
//!   rows written before the slot existed (e.g. by the polling source) are published too.
//!   In `insert_delete` and `logical_message` modes there is nothing to recover from: a lost slot
//!   is a fatal error that names the slot, the reason, the position after which events may be
//!   missing, and the operator's options.
//! - **A lost slot is never mistaken for a first start.** The relay state table
//!   ([`state`], `outbox_relay_state`) records every slot the relay created or streamed from,
//!   with a confirmed position. A slot missing at start that has a record was lost (dropped,
//!   invalidated, or absent on a promoted standby): recovered from the table in `table` mode, a
//!   fatal [`LogicalError::SlotLost`] otherwise — on every start, also in a crash loop, until an
//!   operator accepts the loss with `outbox-relay slot drop <slot>` (which deletes the record).
//!   Only a slot with no record is created as a first start.
//!
//! # Limits (documented decisions)
//!
//! - A transaction's events are buffered until its `Commit` (its end LSN is part of every event's
//!   position), so one huge transaction is held in memory once.
//! - A re-publication holds one page in memory, not the backlog, but its snapshot transaction
//!   holds back the xmin horizon (VACUUM) while it runs, and the slot is not streamed from
//!   meanwhile (WAL since the consistent point is retained).
//! - The replication client buffers up to 128 messages ahead of the relay; the relay reads ahead
//!   of its window only up to a batch's byte bound.
//! - Between two standby status updates (`status_interval`) an acknowledged position lives only
//!   in the relay: a crash repeats that interval's acknowledged events on top of the events in
//!   flight (the SIGKILL test measures it).
//! - The relay does not carry its confirmed position over when it reopens the source (e.g. after
//!   PostgreSQL restarted): it starts from the slot's position, which after a PostgreSQL crash
//!   is the last one saved to disk. Starting from its own would save those duplicates, but is
//!   only safe on the same WAL history (not after a failover to a standby that was behind).
//! - A re-publication from the table interrupted by a stop, crash or rewind starts again from
//!   the first unpublished row (in a fresh snapshot), not from the page it had reached.
//! - Publication and slot names are `[a-z0-9_]` (publication names must not start with a digit):
//!   `publication_names` in `START_REPLICATION` folds unquoted names to lower case, so anything
//!   else could silently name another publication.
//!
//! # Write modes
//!
//! The mode decides where events come from, what must exist and what acknowledging does:
//! `table` (inserts into the outbox table; the table must be in the publication; acknowledged
//! rows get `published_at`), `insert_delete` (the WAL insert is the event; the delete in the same
//! transaction is ignored), `logical_message` (transactional `pg_logical_emit_message` messages
//! with the configured prefix; no table needed; the publication may be empty).
//!
//! **Logical messages are events only in `logical_message` mode.** `pg_logical_emit_message` is
//! executable by PUBLIC by default, so in the other modes a message with the outbox prefix is
//! someone's injection attempt or a misconfigured writer: it is ignored with a warning (at most
//! one a minute, naming the LSN and the count) and never published. In `logical_message` mode
//! the relay warns at start while PUBLIC can still execute it; docs/postgres.md gives the
//! `REVOKE … FROM PUBLIC` and the grants that close it ([`slot::EMIT_MESSAGE_REVOKE`]).
//!
//! Updates, deletes and truncates are ignored (logged at debug). A *non-transactional* message
//! with the event prefix is refused with an error log: it is written even when its transaction
//! rolls back, so publishing it could publish a phantom.
//!
//! [`Source::acknowledge`]: super::Source::acknowledge
//! [`Source::next_batch`]: super::Source::next_batch
//! [`Position::Wal`]: super::Position::Wal
//! [`Position::Row`]: super::Position::Row

mod config;
mod decode;
mod error;
mod lifecycle;
pub mod multi;
pub mod pgoutput;
mod read_loop;
mod republication;
mod settle;
pub mod slot;
pub mod state;
mod stream;
mod upkeep;
mod window;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::WriteMode;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;

pub use config::LogicalConfig;
pub use error::LogicalError;
pub use pgoutput::{DecodeError, Lsn};
pub use slot::{NameError, PublicationName, SlotName, SlotStatus};

use super::SourceEvent;
use super::row_marks::RowMarks;
use crate::config::RowAcknowledgement;
use crate::leader::Leadership;
use crate::stats::LogicalMetrics;
use decode::OpenTx;
use pgoutput::Relation;
use republication::Republication;
use settle::Settle;
use slot::ResolvedTable;
use stream::{ReplicationTarget, Session};
use window::Window;

/// The logical-replication [`Source`](super::Source). See the [module docs](self) for its
/// guarantees.
pub struct LogicalSource {
    cfg: LogicalConfig,
    pool: PgPool,
    /// The leader lock's session, held as long as the source lives (dropping the source
    /// releases the lock); its lease fences the row acknowledgements, so a relay that lost
    /// leadership marks nothing more.
    #[allow(
        dead_code,
        reason = "held for its `Drop`: the lock lives as long as the source"
    )]
    leader: Option<Leadership>,
    target: ReplicationTarget,
    table: Option<ResolvedTable>,
    /// Multi-table mode: every table the slot decodes, by tag (empty for a single table).
    tables: multi::TableRegistry,
    heartbeat_prefix: String,
    session: Option<Session>,
    relations: HashMap<u32, Relation>,
    open: Option<OpenTx>,
    /// Decoded, complete transactions not yet returned.
    ready: VecDeque<SourceEvent>,
    /// Multi-table mode: the table tag of each of `ready` (empty otherwise).
    ready_tags: VecDeque<u16>,
    /// Multi-table mode: the table tags of the batch returned last ([`Self::take_tables`]).
    taken_tags: Vec<u16>,
    /// Returned, not yet acknowledged (a prefix of these gets acknowledged).
    inflight: Window,
    /// Highest LSN the relay may confirm; never past an unacknowledged transaction.
    confirmed: Lsn,
    /// The position last written to the relay state table ([`state`]).
    state_recorded: Lsn,
    /// The PostgreSQL instance the confirmed position was reached on ([`slot::instance`]).
    instance: Option<String>,
    /// When refused outbox-prefixed messages were last reported, and how many since.
    last_refusal_warning: Option<Instant>,
    refused_since_warning: u64,
    /// A re-publication from the table is not fully acknowledged yet (marker slot exists).
    backfill_due: bool,
    /// The re-publication being read page by page; streaming starts once it was read to the end.
    republication: Option<Republication>,
    /// No session on purpose: it starts once the re-publication was read to the end.
    stream_deferred: bool,
    /// Each batch is cut once its payloads reach this many bytes
    /// ([`Source::limit_batch_bytes`](super::Source::limit_batch_bytes)).
    batch_bytes: usize,
    next_heartbeat: Instant,
    next_slot_check: Instant,
    stopped: bool,
    metrics: Arc<LogicalMetrics>,
    /// `table` mode: row acknowledgements running beside the pipeline, each with the LSN it
    /// lets the slot confirm once durable.
    marks: Option<RowMarks<Option<Lsn>>>,
    /// `table` mode with `acknowledgement = "mark"`: the streamed rows' deferred marks; their
    /// LSNs are confirmed without waiting for them.
    settle: Option<Settle>,
}

impl std::fmt::Debug for LogicalSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalSource")
            .field("slot", &self.cfg.slot)
            .field("publication", &self.cfg.publication)
            .field("confirmed", &self.confirmed)
            .finish_non_exhaustive()
    }
}
impl LogicalSource {
    /// Check the server (`wal_level`, privileges), create or verify the publication and the slot,
    /// re-publish unpublished rows when a `table`-mode slot is new or was lost, and start streaming
    /// from the slot's confirmed position.
    /// Its figures go to a [`LogicalMetrics`] of its own ([`LogicalSource::metrics`]).
    pub async fn connect(cfg: LogicalConfig) -> Result<Self, LogicalError> {
        Self::open(cfg, None, Arc::default()).await
    }

    /// Like [`LogicalSource::connect`], acknowledging rows through the leader lock's session and
    /// adding its figures to `metrics`, which the caller keeps across reopenings.
    pub async fn open(
        cfg: LogicalConfig,
        leader: Option<Leadership>,
        metrics: Arc<LogicalMetrics>,
    ) -> Result<Self, LogicalError> {
        let target = ReplicationTarget::from_url(cfg.database_url.expose())?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(cfg.database_url.expose())
            .await
            .map_err(|source| LogicalError::Database {
                context: "connecting to PostgreSQL",
                source,
            })?;
        slot::preflight(&pool).await?;
        let mut tables = Vec::with_capacity(cfg.tables.len());
        for t in &cfg.tables {
            tables.push(slot::resolve_table(&pool, t).await?);
        }
        let table = match cfg.write_mode {
            _ if !tables.is_empty() => tables.first().cloned(),
            WriteMode::LogicalMessage => None,
            _ => Some(slot::resolve_table(&pool, &cfg.table).await?),
        };
        if tables.is_empty() {
            slot::ensure_publication(&pool, &cfg.publication, table.as_ref()).await?;
        } else {
            if cfg.write_mode != WriteMode::InsertDelete {
                return Err(LogicalError::Config(
                    "a multi-table slot decodes inserts only (write_mode insert_delete); each \
                     table's feed acknowledges its rows"
                        .into(),
                ));
            }
            slot::ensure_publication_tables(&pool, &cfg.publication, &tables).await?;
        }
        // Before any slot is created: a role that cannot keep the durable record fails here.
        {
            let mut conn = pool
                .acquire()
                .await
                .map_err(|source| LogicalError::Database {
                    context: "connecting to PostgreSQL",
                    source,
                })?;
            state::ensure_table(&mut conn, &cfg.table).await?;
        }
        slot::check_emit_message_privileges(&pool, cfg.write_mode).await?;
        let (marks, settle) = if cfg.write_mode == WriteMode::Table {
            let options: sqlx::postgres::PgConnectOptions = cfg
                .database_url
                .expose()
                .parse()
                .map_err(|source| LogicalError::Database {
                    context: "parsing the database URL",
                    source,
                })?;
            let ack_pool = super::row_marks::pool(&options);
            let lease = leader.as_ref().map(Leadership::lease);
            let settle = (cfg.acknowledgement == RowAcknowledgement::Mark)
                .then(|| Settle::new(ack_pool.clone(), cfg.table.clone(), lease.clone()));
            let marks = RowMarks::new(ack_pool, cfg.table.clone(), cfg.acknowledgement, lease);
            (Some(marks), settle)
        } else {
            (None, None)
        };
        let mut me = Self::new(cfg, pool, leader, target, table, marks, metrics);
        me.tables = multi::TableRegistry::new(tables, me.pool.clone(), me.cfg.publication.clone());
        me.settle = settle;
        me.prepare_slot(true).await?;
        let mut attempts = 0;
        loop {
            if me.republishing() {
                // Streaming starts once the table was read to the end (see `next_batch_inner`).
                me.stream_deferred = true;
                return Ok(me);
            }
            match me.start_session().await {
                // The slot vanished between the check and START_REPLICATION: a loss (recovered
                // in table mode, explained and fatal otherwise).
                Err(LogicalError::SlotLost { .. }) if attempts < 3 => {
                    attempts += 1;
                    me.ready.clear();
                    me.ready_tags.clear();
                    me.republication = None;
                    me.prepare_slot(false).await?;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(me),
            }
        }
    }

    /// A source over these connections that has not touched its slot yet: no session, nothing
    /// decoded or in flight, nothing confirmed, the heartbeat and the slot check due after their
    /// intervals.
    fn new(
        cfg: LogicalConfig,
        pool: PgPool,
        leader: Option<Leadership>,
        target: ReplicationTarget,
        table: Option<ResolvedTable>,
        marks: Option<RowMarks<Option<Lsn>>>,
        metrics: Arc<LogicalMetrics>,
    ) -> Self {
        let now = Instant::now();
        Self {
            heartbeat_prefix: slot::heartbeat_prefix(&cfg.message_prefix),
            next_heartbeat: now + cfg.heartbeat_interval,
            next_slot_check: now + cfg.slot_check_interval,
            cfg,
            pool,
            leader,
            target,
            table,
            tables: multi::TableRegistry::default(),
            session: None,
            relations: HashMap::new(),
            open: None,
            ready: VecDeque::new(),
            ready_tags: VecDeque::new(),
            taken_tags: Vec::new(),
            inflight: Window::default(),
            confirmed: Lsn::ZERO,
            state_recorded: Lsn::ZERO,
            instance: None,
            last_refusal_warning: None,
            refused_since_warning: 0,
            backfill_due: false,
            republication: None,
            stream_deferred: false,
            batch_bytes: usize::MAX,
            stopped: false,
            metrics,
            marks,
            settle: None,
        }
    }

    /// Whether this source decodes several tables (its events carry table tags).
    fn multi(&self) -> bool {
        !self.cfg.tables.is_empty()
    }

    /// Multi-table mode: the table tag (index in [`LogicalConfig::tables`], then in the order
    /// [`multi::TableRegistry::add`] added them) of each event of the batch returned last by
    /// `next_batch` or `poll_batch`, in the same order. Empty in single-table mode.
    pub fn take_tables(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.taken_tags)
    }

    /// Multi-table mode: the registry of the slot's tables, through which a table is added
    /// while the source streams ([`multi::TableRegistry::add`]).
    pub fn registry(&self) -> multi::TableRegistry {
        self.tables.clone()
    }

    /// A re-publication from the table is still being read: nothing is streamed until it was
    /// read to the end, so every row it re-publishes is handed on before any streamed event.
    fn republishing(&self) -> bool {
        self.republication.as_ref().is_some_and(|r| !r.done)
    }

    /// Shared live metrics (slot lag, `wal_status`, counters).
    pub fn metrics(&self) -> Arc<LogicalMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The slot's current status from `pg_replication_slots` (`None`: missing).
    pub async fn slot_status(&self) -> Result<Option<SlotStatus>, LogicalError> {
        slot::slot_status(&self.pool, &self.cfg.slot).await
    }

    /// The LSN this source has confirmed (may be ahead of the slot until the next status update).
    pub fn confirmed_lsn(&self) -> Lsn {
        self.confirmed
    }

    /// Stop streaming and make the confirmed LSN durable on the slot. Events returned but not
    /// acknowledged are streamed again by the next session. Idempotent.
    pub async fn close(&mut self) -> Result<(), LogicalError> {
        if let Some(s) = self.session.take() {
            s.stop().await;
        }
        self.stopped = true;
        // Ends the snapshot transaction of a re-publication (the marker slot makes the next start
        // re-publish again).
        self.republication = None;
        self.release_marks(true).await?;
        if self.confirmed != Lsn::ZERO {
            slot::advance_slot(&self.pool, &self.cfg.slot, self.confirmed).await?;
            self.record_state().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
