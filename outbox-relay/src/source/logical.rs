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
//!   entirely inside it. In `table` mode the rows are marked published *before* that LSN is
//!   confirmed. The replication client reports exactly that confirmed LSN in every standby status
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
//!   delivered but not yet marked published when a crash came). The same procedure runs the
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

pub mod pgoutput;
pub mod slot;
pub mod state;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{MalformedEvent, OutboxTable, StoredEvent, WriteMode};
use pgwire_replication::ReplicationEvent;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use pgoutput::{DecodeError, Lsn};
pub use slot::{NameError, PublicationName, SlotName, SlotStatus};

use super::row_marks::{MarkError, RowMarks};
use super::{Position, Source, SourceError, SourceEvent};
use crate::config::{RelayConfig, RowAcknowledgement};
use crate::failure::{ErrorKind, Report};
use crate::leader::Leadership;
use crate::park::{AggregateKey, ParkRequest};
use crate::stats::LogicalMetrics;
use pgoutput::{PgOutputMessage, Relation};
use slot::ResolvedTable;
use stream::{ReplicationTarget, Session};

/// A failure of the logical source, classified: see [`LogicalError::is_retryable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogicalError {
    /// Invalid configuration (URL, names, missing table). Fatal.
    #[error("logical source configuration: {0}")]
    Config(String),
    /// The server is not configured for logical decoding. Fatal.
    #[error(
        "PostgreSQL wal_level is '{actual}', but the logical source needs wal_level = logical \
         (set wal_level = logical in postgresql.conf and restart PostgreSQL)"
    )]
    WalLevel {
        /// The current setting (or the server's message).
        actual: String,
    },
    /// The role lacks a needed privilege. Fatal.
    #[error("role {role} lacks {missing}")]
    Privilege {
        /// The role.
        role: String,
        /// What is missing.
        missing: String,
    },
    /// The publication is unusable. Fatal.
    #[error("publication: {0}")]
    Publication(String),
    /// The slot is unusable (wrong plugin, database, type, or cannot be created). Fatal.
    #[error("replication slot: {0}")]
    Slot(String),
    /// The slot was dropped or invalidated. Fatal unless recovered (table mode).
    #[error("replication slot {slot} is LOST: {detail}")]
    SlotLost {
        /// Slot name.
        slot: String,
        /// What happened.
        detail: String,
    },
    /// Another session streams from the slot (e.g. another relay instance). Retryable.
    #[error("replication slot in use: {0}")]
    SlotInUse(String),
    /// A SQL statement failed. Retryable.
    #[error("database error while {context}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: sqlx::Error,
    },
    /// Acknowledging delivered rows failed (`table` mode). Retryable unless the lease is lost.
    #[error(transparent)]
    Marks(#[from] MarkError),
    /// The replication stream failed or ended. Retryable.
    #[error("replication stream: {0}")]
    Replication(String),
    /// The stream carried a message that cannot be decoded. Fatal.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl LogicalError {
    /// What kind of failure this is ([`crate::failure`]). A lost slot is reported as not
    /// recoverable here; the source itself decides whether it can recover from the table.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LogicalError::Config(_) => ErrorKind::Config,
            LogicalError::WalLevel { .. }
            | LogicalError::Privilege { .. }
            | LogicalError::Publication(_)
            | LogicalError::Slot(_) => ErrorKind::Setup,
            LogicalError::SlotLost { .. } => ErrorKind::SlotLost { recoverable: false },
            LogicalError::SlotInUse(_) => ErrorKind::Contended,
            LogicalError::Database { .. } | LogicalError::Replication(_) => ErrorKind::Unavailable,
            LogicalError::Marks(e) => e.kind(),
            LogicalError::Decode(_) => ErrorKind::Contract,
        }
    }

    /// Whether retrying (after a pause, with a new session) may succeed: the policy's
    /// [`ErrorKind::restarts_source`].
    pub fn is_retryable(&self) -> bool {
        self.kind().restarts_source()
    }
}

impl From<LogicalError> for SourceError {
    fn from(e: LogicalError) -> Self {
        SourceError::new("logical", e.kind(), e)
    }
}

/// Settings of the logical source.
#[derive(Debug, Clone)]
pub struct LogicalConfig {
    /// PostgreSQL URL (used for the SQL pool and the replication connection). Secret.
    pub database_url: crate::config::Secret,
    /// The outbox table (ignored in `logical_message` mode).
    pub table: OutboxTable,
    /// How services write events.
    pub write_mode: WriteMode,
    /// Replication slot name.
    pub slot: SlotName,
    /// Publication name.
    pub publication: PublicationName,
    /// Prefix of logical-message events; heartbeats use `<prefix>-heartbeat`.
    pub message_prefix: String,
    /// Heartbeat after this much idle time (default 10 s).
    pub heartbeat_interval: Duration,
    /// Standby status update cadence (default 1 s).
    pub status_interval: Duration,
    /// How often the slot's health is checked (default 30 s).
    pub slot_check_interval: Duration,
    /// Recreate a lost slot and re-publish from the table (`table` mode only; default true).
    pub recover_lost_slot: bool,
    /// What acknowledging does to a row in `table` mode (mark `published_at`, or delete).
    pub acknowledgement: RowAcknowledgement,
}

impl LogicalConfig {
    /// Defaults, the configuration file's: slot `outbox_relay`, publication `outbox_relay`, prefix
    /// `outbox`, heartbeat 10 s, status 1 s, slot check 30 s, lost-slot recovery on.
    pub fn new(database_url: impl Into<String>, table: OutboxTable, write_mode: WriteMode) -> Self {
        Self {
            database_url: crate::config::Secret::new(database_url),
            table,
            write_mode,
            slot: SlotName::default(),
            publication: PublicationName::default(),
            message_prefix: outbox_core::DEFAULT_MESSAGE_PREFIX.to_owned(),
            heartbeat_interval: Duration::from_secs(10),
            status_interval: Duration::from_secs(1),
            slot_check_interval: Duration::from_secs(30),
            recover_lost_slot: true,
            acknowledgement: RowAcknowledgement::Mark,
        }
    }

    /// The logical source's settings from the relay configuration (`logical.*` keys).
    pub fn from_relay(config: &RelayConfig, table: OutboxTable) -> Result<Self, LogicalError> {
        let mut cfg = Self::new(config.database_url.expose(), table, config.write_mode);
        cfg.slot = SlotName::parse(&config.logical.slot)
            .map_err(|e| LogicalError::Config(format!("logical.slot: {e}")))?;
        cfg.publication = PublicationName::parse(&config.logical.publication)
            .map_err(|e| LogicalError::Config(format!("logical.publication: {e}")))?;
        cfg.message_prefix = config.logical.message_prefix.clone();
        cfg.heartbeat_interval = config.logical.heartbeat_interval;
        cfg.status_interval = config.logical.status_interval;
        cfg.acknowledgement = config.acknowledgement;
        Ok(cfg)
    }
}

struct OpenTx {
    commit_lsn: Lsn,
    /// Decoded events not handed on yet, malformed ones included (the relay parks those).
    events: Vec<Result<StoredEvent, MalformedEvent>>,
    /// Payload bytes of `events`.
    bytes: usize,
    /// Whether chunks of it were handed on already: a clean stop then reads on to its commit,
    /// so the relay can finish it (see [`LogicalSource::finishing_a_transaction`]).
    handed_on: bool,
}

/// A transaction is handed on in chunks once it holds more than this many events, or
/// [`TX_CHUNK_BYTES`] of payload, before its commit arrives, so a huge transaction never sits in
/// memory whole. That is safe: pgoutput (protocol 1, no `streaming`) sends a transaction only
/// once it has committed, so every event between its Begin and Commit is committed already. The
/// last event received is always held back for the Commit, to carry the LSN the slot may be
/// confirmed to once the whole transaction is acknowledged; the chunks confirm nothing.
const TX_CHUNK_EVENTS: usize = 1000;

/// See [`TX_CHUNK_EVENTS`]. Small, because what a transaction holds before a chunk is handed on
/// (and the rest of the last chunk, left in `ready` after a batch was cut at its byte bound) is
/// memory outside the relay's window bound.
const TX_CHUNK_BYTES: usize = 1 << 20;

/// The payload bytes an event (or what was salvaged of a malformed one) holds.
fn payload_bytes(event: &Result<StoredEvent, MalformedEvent>) -> usize {
    let e = match event {
        Ok(e) => e,
        Err(m) => &m.salvaged,
    };
    e.payload.as_ref().map_or(0, String::len)
}

/// A page of a re-publication from the table holds at most this many payload bytes, whatever
/// the batch byte bound (`max_in_flight_bytes` large, or no bound set): only one page is held
/// in the source at a time.
const PAGE_MAX_BYTES: usize = 8 << 20;

/// A re-publication from the table in progress: unpublished rows read in keyset pages
/// (`seq > after ORDER BY seq`), the next page only once the previous one was handed on.
struct Republication {
    /// A connection of its own, inside a `REPEATABLE READ` transaction that imported the new
    /// slot's exported snapshot (or, without one, took its own at the start). Closed once the
    /// table was read to the end.
    conn: Option<sqlx::PgConnection>,
    /// Reads see exactly the rows committed before the slot's consistent point.
    consistent: bool,
    /// `seq` of the last row read.
    after: i64,
    /// The table was read to the end (an empty page came back).
    done: bool,
    /// Mean payload of the last page, to ask for fewer rows when payloads are large.
    mean_payload: usize,
    rows: u64,
    pages: u64,
    largest_page_rows: usize,
    largest_page_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: Uuid,
    position: Position,
}

/// The logical-replication [`Source`]. See the [module docs](self) for its guarantees.
pub struct LogicalSource {
    cfg: LogicalConfig,
    pool: PgPool,
    /// The leader lock's session (parking, parked aggregates); its lease fences the row
    /// acknowledgements, so a relay that lost leadership marks nothing more.
    leader: Option<Leadership>,
    target: ReplicationTarget,
    table: Option<ResolvedTable>,
    heartbeat_prefix: String,
    session: Option<Session>,
    relations: HashMap<u32, Relation>,
    open: Option<OpenTx>,
    /// Decoded, complete transactions not yet returned.
    ready: VecDeque<SourceEvent>,
    /// Returned, not yet acknowledged (a prefix of these gets acknowledged).
    inflight: VecDeque<InFlight>,
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
    /// Each batch is cut once its payloads reach this many bytes ([`Source::limit_batch_bytes`]).
    batch_bytes: usize,
    next_heartbeat: Instant,
    next_slot_check: Instant,
    stopped: bool,
    /// `<table>_parked` is known to exist.
    parked_table: bool,
    metrics: Arc<LogicalMetrics>,
    /// `table` mode: row acknowledgements running beside the pipeline, each with the LSN it
    /// lets the slot confirm once durable.
    marks: Option<RowMarks<Option<Lsn>>>,
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

/// At most one warning per this interval about refused outbox-prefixed messages.
const INJECTION_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// How long a start waits for a slot that another session is still creating.
const SLOT_CREATION_WAIT: Duration = Duration::from_secs(120);

/// The id a malformed logical message whose own id cannot be read is parked under: unique per
/// message (its LSN) and recognisable (`6f7574626f780000-…`, "outbox" in hex).
fn malformed_message_id(lsn: Lsn) -> Uuid {
    Uuid::from_u64_pair(0x6f75_7462_6f78_0000, lsn.0)
}

fn marker_slot(slot: &SlotName) -> SlotName {
    let base: String = slot.as_str().chars().take(60).collect();
    SlotName::parse(&format!("{base}_bf")).unwrap_or_else(|_| slot.clone())
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
        let table = match cfg.write_mode {
            WriteMode::LogicalMessage => None,
            _ => Some(slot::resolve_table(&pool, &cfg.table.qualified()).await?),
        };
        slot::ensure_publication(&pool, &cfg.publication, table.as_ref()).await?;
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
        let marks = if cfg.write_mode == WriteMode::Table {
            let options: sqlx::postgres::PgConnectOptions = cfg
                .database_url
                .expose()
                .parse()
                .map_err(|source| LogicalError::Database {
                    context: "parsing the database URL",
                    source,
                })?;
            Some(RowMarks::new(
                super::row_marks::pool(&options),
                cfg.table.clone(),
                cfg.acknowledgement,
                leader.as_ref().map(Leadership::lease),
            ))
        } else {
            None
        };
        let now = Instant::now();
        let mut me = Self {
            heartbeat_prefix: slot::heartbeat_prefix(&cfg.message_prefix),
            next_heartbeat: now + cfg.heartbeat_interval,
            next_slot_check: now + cfg.slot_check_interval,
            cfg,
            pool,
            leader,
            target,
            table,
            session: None,
            relations: HashMap::new(),
            open: None,
            ready: VecDeque::new(),
            inflight: VecDeque::new(),
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
            parked_table: false,
            metrics,
            marks,
        };
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
                    me.republication = None;
                    me.prepare_slot(false).await?;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(me),
            }
        }
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

    /// Make sure a usable slot exists; recover (table mode) or fail when it is missing or lost.
    /// Sets `confirmed` to the slot's position.
    ///
    /// A missing slot is a first start only when the relay state table has no record of it
    /// ([`state`]); otherwise it was lost, whether the relay saw it go or not.
    async fn prepare_slot(&mut self, at_start: bool) -> Result<(), LogicalError> {
        let slot = self.cfg.slot.clone();
        let marker = marker_slot(&slot);
        let status = self.settled_slot_status(&slot).await?;
        let table_mode = self.cfg.write_mode == WriteMode::Table;
        let marker_exists = table_mode && slot::slot_status(&self.pool, &marker).await?.is_some();
        match status {
            // A re-publication from the table is pending: the table holds every event the slot
            // would carry, so the slot is created again with a fresh exported snapshot and the
            // unpublished rows are read in it. Resuming the old slot instead would stream the
            // rows committed since its position on top of re-publishing them.
            Some(s) if !s.is_lost() && marker_exists => {
                tracing::warn!(
                    "a previous re-publication from the table was interrupted: \
                    creating the slot again with a fresh snapshot and re-publishing the unpublished rows in it"
                );
                slot::drop_slot(&self.pool, &slot).await?;
                self.create_slot(at_start, marker_exists).await
            }
            Some(s) if !s.is_lost() => {
                slot::verify_slot(&self.pool, &slot, &s).await?;
                s.record_in(&self.metrics);
                let at_slot = s.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
                // Our own position saves re-streaming what was acknowledged since the last status
                // update, but an LSN names a transaction only within one WAL history: after a
                // restart or failover of PostgreSQL (a promoted standby can reuse LSNs the old
                // primary had used for other transactions) only the slot's position is safe.
                let instance = slot::instance(&self.pool).await?;
                let same_instance = self.instance.as_ref() == Some(&instance);
                if !same_instance && self.confirmed > at_slot {
                    tracing::warn!(acknowledged = %self.confirmed, slot_position = %at_slot,
                        "PostgreSQL restarted or failed over since the relay acknowledged its position: resuming from the slot's position (events acknowledged after it are published again)");
                }
                self.confirmed = if same_instance {
                    at_slot.max(self.confirmed)
                } else {
                    at_slot
                };
                self.instance = Some(instance);
                // Also records a slot made by a relay that did not keep a state table yet.
                self.record_state().await?;
                Ok(())
            }
            other => {
                let lost_at = other.as_ref().map(|s| s.confirmed_flush_lsn);
                let record = state::read(&self.pool, &self.cfg.table, &slot).await?;
                if marker_exists {
                    // Nothing streamed is lost: the pending re-publication reads every
                    // unpublished row of the table in the new slot's snapshot.
                    tracing::warn!(
                        "a previous re-publication from the table was interrupted and the slot is gone too: \
                        creating it and re-publishing every unpublished row"
                    );
                    if lost_at.is_some() {
                        slot::drop_slot(&self.pool, &slot).await?;
                    }
                } else if lost_at.is_some() || !at_start || record.is_some() {
                    let state_table = state::state_table(&self.cfg.table);
                    let (detail, since) = match (lost_at, &record) {
                        (Some(at), _) => (
                            "wal_status = 'lost': the WAL it needed was removed (max_slot_wal_keep_size exceeded?)".to_owned(),
                            at.or(record.as_ref().map(|r| r.confirmed_lsn)),
                        ),
                        (None, _) if !at_start => (
                            "the slot disappeared while the relay was using it (dropped?)".to_owned(),
                            Some(self.confirmed),
                        ),
                        (None, Some(r)) => (
                            format!(
                                "the slot does not exist, but {state_table} records that a relay \
                                 streamed from it, {}: it was dropped, invalidated and removed, or \
                                 PostgreSQL failed over to a standby that does not have it",
                                r.describe()
                            ),
                            Some(r.confirmed_lsn),
                        ),
                        (None, None) => unreachable!("guarded above"),
                    };
                    tracing::error!("REPLICATION SLOT LOST: {detail}");
                    if !(table_mode && self.cfg.recover_lost_slot) {
                        let since = since
                            .filter(|l| *l != Lsn::ZERO)
                            .map(|l| format!("LSN {l}"))
                            .unwrap_or_else(|| "the slot's last confirmed position".into());
                        return Err(LogicalError::SlotLost {
                            slot: slot.to_string(),
                            detail: format!(
                                "{detail}; write mode {} has no table to recover from — events \
                                 committed after {since} that were not published yet are lost. \
                                 The relay refuses to start until an operator decides: to accept the \
                                 loss and continue from now, run `outbox-relay slot drop {slot}` \
                                 (forgets the slot in {state_table}) and start the relay again; \
                                 to avoid it, point the relay at the server that still has the slot",
                                self.cfg.write_mode
                            ),
                        });
                    }
                    self.metrics.slot_recoveries.fetch_add(1, Ordering::Relaxed);
                    if lost_at.is_some() {
                        slot::drop_slot(&self.pool, &slot).await?;
                    }
                    tracing::warn!(
                        "recovering the lost slot: creating it and re-publishing every unpublished row from the outbox table"
                    );
                } else if table_mode && self.table_has_published_rows().await? {
                    tracing::warn!(
                        "replication slot does not exist although rows were published before: \
                        it was dropped or lost while no relay ran (or the polling source was used); creating it and \
                        re-publishing every unpublished row"
                    );
                } else {
                    tracing::info!(
                        "replication slot does not exist and no relay streamed from it before; creating it"
                    );
                }
                self.create_slot(at_start, marker_exists).await
            }
        }
    }

    /// Creates the slot over the replication protocol with an exported snapshot and, in `table`
    /// mode, starts re-publishing the unpublished rows in that snapshot (the marker slot, created
    /// first, keeps the re-publication pending until every row is acknowledged).
    async fn create_slot(
        &mut self,
        at_start: bool,
        marker_exists: bool,
    ) -> Result<(), LogicalError> {
        let slot = self.cfg.slot.clone();
        let marker = marker_slot(&slot);
        let table_mode = self.cfg.write_mode == WriteMode::Table;
        if table_mode && !marker_exists {
            // Durable "re-publication pending" marker: created before the new slot, dropped
            // once every re-published row is acknowledged.
            create_marker(&self.pool, &marker).await?;
        }
        // Created over the replication protocol with an exported snapshot, so the rows
        // re-published are exactly those committed before the slot's consistent point:
        // everything later is streamed, nothing is published twice.
        let created = stream::create_slot_exporting(
            &self.target,
            &slot,
            &self.cfg.publication,
            "outbox-relay",
        )
        .await?;
        let Some(exported) = created else {
            // Created concurrently by another instance: use it as found.
            return Box::pin(self.prepare_slot(at_start)).await;
        };
        self.confirmed = exported.consistent_point;
        self.instance = Some(slot::instance(&self.pool).await?);
        // Durable before anything is streamed: from now on a missing slot is a loss.
        self.record_state().await?;
        if table_mode {
            self.backfill(Some(&exported.snapshot)).await?;
        }
        drop(exported);
        Ok(())
    }

    /// Writes the slot and the confirmed position to the relay state table.
    async fn record_state(&mut self) -> Result<(), LogicalError> {
        state::record(
            &self.pool,
            &self.cfg.table,
            &self.cfg.slot,
            self.cfg.write_mode.as_str(),
            self.confirmed,
        )
        .await?;
        self.state_recorded = self.confirmed;
        Ok(())
    }

    /// The slot's status once it is not being created any more. A logical slot without a
    /// confirmed position is still being created by some session — possibly by a relay that was
    /// killed meanwhile, whose walsender drops the half-made slot once it notices. Such a slot
    /// was never streamed from, so waiting for it to either appear for real or vanish (and then
    /// creating it) loses nothing; calling it lost would fail the start for no reason.
    async fn settled_slot_status(
        &self,
        slot: &SlotName,
    ) -> Result<Option<SlotStatus>, LogicalError> {
        let deadline = Instant::now() + SLOT_CREATION_WAIT;
        let mut logged = false;
        loop {
            let status = slot::slot_status(&self.pool, slot).await?;
            match &status {
                Some(s) if s.slot_type == "logical" && s.confirmed_flush_lsn.is_none() => {
                    if Instant::now() >= deadline {
                        return Err(LogicalError::Slot(format!(
                            "replication slot {slot} has been in creation for {SLOT_CREATION_WAIT:?} \
                             (by backend pid {:?}; creation waits for transactions open at that \
                             moment to finish): end that session or those transactions",
                            s.active_pid
                        )));
                    }
                    if !logged {
                        logged = true;
                        tracing::info!(creator_pid = ?s.active_pid,
                            "replication slot is still being created by another session (a relay killed while creating it?); waiting until it is complete or gone");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => return Ok(status),
            }
        }
    }

    async fn table_has_published_rows(&self) -> Result<bool, LogicalError> {
        let Some(t) = &self.table else {
            return Ok(false);
        };
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE published_at IS NOT NULL)",
            t.qualified
        );
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .map_err(|source| LogicalError::Database {
                context: "looking for published rows",
                source,
            })
    }

    /// Starts re-publishing every unpublished row of the table as [`Position::Row`] events (seq
    /// order), read in the exported `snapshot` of a just-created slot when given. Only the
    /// snapshot is imported here (while the session that exported it is still alive and idle):
    /// the rows are read page by page as the relay asks for batches ([`Self::next_page`]).
    async fn backfill(&mut self, snapshot: Option<&str>) -> Result<(), LogicalError> {
        let Some(table) = self.table.as_ref().map(|t| t.qualified.clone()) else {
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
        for (name, value) in super::row_marks::RELAY_PLANNER_SETTINGS {
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
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE published_at IS NULL"
        )))
        .fetch_one(&mut conn)
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
    async fn next_page(&mut self, max: usize) -> Result<(), LogicalError> {
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
        let sql = format!(
            // `o.seq` is the bigint column (`n`), not the text output column of the same name.
            "SELECT * FROM (SELECT p.*, sum(coalesce(octet_length(p.payload), 0)) OVER (ORDER BY p.n) \
                 - coalesce(octet_length(p.payload), 0) AS bytes_before FROM ( \
             SELECT o.id::text, o.aggregatetype::text, o.aggregateid::text, o.type::text, \
                    o.payload::text AS payload, o.seq::text, o.created_at::text, \
                    o.tracingspancontext::text, o.headers::text, o.schema_version::text, \
                    o.topic::text, o.aggregate_seq::text, o.seq AS n \
             FROM {} o WHERE o.published_at IS NULL AND o.seq > $1 ORDER BY o.seq LIMIT $2) p) b \
             WHERE b.bytes_before < $3 ORDER BY b.n",
            t.qualified
        );
        let page: Vec<sqlx::postgres::PgRow> = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(r.after)
            .bind(i64::try_from(rows).unwrap_or(i64::MAX))
            .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
            .fetch_all(&mut *conn)
            .await
            .map_err(|source| LogicalError::Database {
                context: "re-publishing unpublished rows",
                source,
            })?;
        const COLS: [&str; 12] = [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "seq",
            "created_at",
            "tracingspancontext",
            "headers",
            "schema_version",
            "topic",
            "aggregate_seq",
        ];
        let mut page_bytes = 0;
        for row in &page {
            use sqlx::Row;
            let mut values: Vec<Option<String>> = Vec::with_capacity(COLS.len());
            for i in 0..COLS.len() {
                values.push(row.try_get(i).map_err(|source| LogicalError::Database {
                    context: "reading an unpublished row",
                    source,
                })?);
            }
            r.after = row
                .try_get(COLS.len())
                .map_err(|source| LogicalError::Database {
                    context: "reading an unpublished row",
                    source,
                })?;
            let pairs = COLS
                .iter()
                .copied()
                .zip(values.iter().map(|v| v.as_deref()));
            // A malformed row is handed on too: the relay parks it with its reason.
            let event = SourceEvent::decoded(StoredEvent::from_text_columns(pairs), Position::Row);
            page_bytes += event.event.payload.as_ref().map_or(0, String::len);
            self.ready.push_back(event);
        }
        let n = page.len();
        drop(page);
        if n > 0 {
            r.pages += 1;
            r.rows += n as u64;
            r.mean_payload = page_bytes / n;
            r.largest_page_rows = r.largest_page_rows.max(n);
            r.largest_page_bytes = r.largest_page_bytes.max(page_bytes);
            self.metrics.backfill_pages.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .rows_backfilled
                .fetch_add(n as u64, Ordering::Relaxed);
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
    async fn finish_backfill_if_complete(&mut self) -> Result<(), LogicalError> {
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

    async fn start_session(&mut self) -> Result<(), LogicalError> {
        let mut attempt = 0;
        let session = loop {
            match Session::start(
                &self.target,
                &self.cfg.slot,
                &self.cfg.publication,
                self.confirmed,
                self.cfg.status_interval,
                "outbox-relay",
            )
            .await
            {
                Ok(s) => break s,
                // The walsender of a session we just closed may hold the slot for a moment.
                Err(LogicalError::SlotInUse(_)) if attempt < 30 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.metrics.sessions.fetch_add(1, Ordering::Relaxed);
        if let Ok(Some(status)) = slot::slot_status(&self.pool, &self.cfg.slot).await {
            status.record_in(&self.metrics);
        }
        self.metrics
            .confirmed_lsn
            .store(self.confirmed.0, Ordering::Relaxed);
        self.session = Some(session);
        Ok(())
    }

    /// Drop everything not acknowledged and stream again from the confirmed position; recover or
    /// fail loudly when the slot is gone.
    async fn restart(&mut self) -> Result<(), LogicalError> {
        if let Some(s) = self.session.take() {
            s.stop().await;
        }
        // Acknowledgements still running concern delivered rows: let them finish (and confirm
        // their LSNs), so the new session does not stream those rows again.
        if let Err(e) = self.release_marks(true).await {
            tracing::warn!(error = %Report(&e), "acknowledgement failed during a restart; those events will be published again");
        }
        self.relations.clear();
        self.open = None;
        self.ready.clear();
        self.inflight.clear();
        self.republication = None;
        self.stream_deferred = false;
        let mut attempts = 0;
        loop {
            self.prepare_slot(false).await?;
            // A re-publication interrupted by the rewind starts again in a fresh snapshot of a
            // slot created again (`prepare_slot`, the marker slot still exists).
            if self.republishing() {
                // Streaming starts once the table was read to the end.
                self.stream_deferred = true;
                return Ok(());
            }
            match self.start_session().await {
                // The slot vanished between the check and START_REPLICATION: check again
                // (recovers in table mode, fails loudly otherwise).
                Err(LogicalError::SlotLost { .. }) if attempts < 3 => {
                    attempts += 1;
                    self.ready.clear();
                    self.republication = None;
                }
                other => return other,
            }
        }
    }

    /// The full account of a lost slot the stream or a health check reported in a mode that
    /// cannot recover from it (what may be lost since which position, the operator's options),
    /// or `e` itself when the slot turns out to be usable.
    async fn explain_loss(&mut self, e: LogicalError) -> LogicalError {
        if self.restartable(&e) {
            return e;
        }
        if let Some(s) = self.session.take() {
            s.stop().await;
        }
        match self.prepare_slot(false).await {
            Err(full @ LogicalError::SlotLost { .. }) => full,
            _ => e,
        }
    }

    /// The kind of `e` as this source sees it: a lost slot is recoverable in `table` mode with
    /// `recover_lost_slot` (the source re-publishes from the table).
    fn kind_of(&self, e: &LogicalError) -> ErrorKind {
        match e {
            LogicalError::SlotLost { .. } => ErrorKind::SlotLost {
                recoverable: self.cfg.write_mode == WriteMode::Table && self.cfg.recover_lost_slot,
            },
            e => e.kind(),
        }
    }

    /// Whether restarting the replication session (or reopening the source) gets past `e`.
    fn restartable(&self, e: &LogicalError) -> bool {
        self.kind_of(e).restarts_source()
    }

    fn idle(&self) -> bool {
        self.open.is_none()
            && self.ready.is_empty()
            && self.inflight.is_empty()
            && self.marks.as_ref().is_none_or(RowMarks::is_empty)
    }

    /// Confirms the LSNs whose rows' acknowledgements are durable: those completed so far, or
    /// (with `wait`) all of them.
    async fn release_marks(&mut self, wait: bool) -> Result<(), LogicalError> {
        let Some(marks) = self.marks.as_mut() else {
            return Ok(());
        };
        let done = if wait {
            marks.finish().await?
        } else {
            marks.completed().await?
        };
        for lsn in done.into_iter().flatten() {
            self.confirm(lsn);
        }
        Ok(())
    }

    /// Raise the confirmed LSN (monotonic) and hand it to the replication client.
    fn confirm(&mut self, lsn: Lsn) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.metrics.confirmed_lsn.store(lsn.0, Ordering::Relaxed);
            if let Some(s) = &self.session {
                s.confirm(lsn);
            }
        }
    }

    fn is_our_table(&self, rel: &Relation) -> bool {
        self.table
            .as_ref()
            .is_some_and(|t| t.schema == rel.namespace && t.name == rel.name)
    }

    /// Apply one replication event. Completed transactions land in `ready`.
    fn handle(&mut self, ev: ReplicationEvent) -> Result<(), LogicalError> {
        match ev {
            ReplicationEvent::Begin { final_lsn, .. } => {
                if self.open.is_some() {
                    return Err(LogicalError::Replication(
                        "Begin inside an open transaction".into(),
                    ));
                }
                self.open = Some(OpenTx {
                    commit_lsn: Lsn(final_lsn.as_u64()),
                    events: Vec::new(),
                    bytes: 0,
                    handed_on: false,
                });
            }
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                let Some(tx) = self.open.take() else {
                    return Err(LogicalError::Replication("Commit without Begin".into()));
                };
                let commit_lsn = Lsn(lsn.as_u64());
                let end_lsn = Lsn(end_lsn.as_u64());
                if tx.commit_lsn != commit_lsn {
                    tracing::debug!(begin = %tx.commit_lsn, commit = %commit_lsn, "commit LSN differs from Begin's final LSN");
                }
                let n = tx.events.len();
                // (A transaction handed on in chunks always keeps its last event for here.)
                if n == 0 {
                    // Nothing of ours in it: confirmable once nothing earlier is pending.
                    if self.idle() {
                        self.confirm(end_lsn);
                    }
                    return Ok(());
                }
                self.metrics
                    .events_streamed
                    .fetch_add(n as u64, Ordering::Relaxed);
                for (i, event) in tx.events.into_iter().enumerate() {
                    self.ready.push_back(SourceEvent::decoded(
                        event,
                        Position::Wal {
                            commit_lsn: commit_lsn.0,
                            end_lsn: end_lsn.0,
                            last_in_transaction: i + 1 == n,
                        },
                    ));
                }
            }
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(&data)? {
                PgOutputMessage::Relation(rel) => {
                    self.relations.insert(rel.id, rel);
                }
                PgOutputMessage::Insert { relation_id, tuple } => {
                    let Some(rel) = self.relations.get(&relation_id) else {
                        return Err(LogicalError::Replication(format!(
                            "Insert for unknown relation {relation_id}"
                        )));
                    };
                    if !self.is_our_table(rel) {
                        tracing::debug!(table = %rel.name, "ignoring insert into another table");
                        return Ok(());
                    }
                    let named = rel.named_values(&tuple)?;
                    // A malformed row is handed on too: the relay parks it with its reason.
                    let event = StoredEvent::from_text_columns(named);
                    self.push_open(event, "Insert outside a transaction")?;
                }
                PgOutputMessage::Update { relation_id }
                | PgOutputMessage::Delete { relation_id } => {
                    tracing::debug!(
                        relation_id,
                        "ignoring update/delete (publication marks or insert_delete)"
                    );
                }
                PgOutputMessage::Truncate { .. } => tracing::debug!("ignoring truncate"),
                PgOutputMessage::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => self.handle_message(transactional, lsn, &prefix, &content)?,
                PgOutputMessage::Begin { .. }
                | PgOutputMessage::Commit { .. }
                | PgOutputMessage::Origin
                | PgOutputMessage::Type => {}
            },
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => self.handle_message(transactional, Lsn(lsn.as_u64()), &prefix, &content)?,
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.idle() {
                    self.confirm(Lsn(wal_end.as_u64()));
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    fn handle_message(
        &mut self,
        transactional: bool,
        lsn: Lsn,
        prefix: &str,
        content: &[u8],
    ) -> Result<(), LogicalError> {
        if prefix == self.heartbeat_prefix {
            if !transactional && self.idle() {
                self.confirm(lsn);
            }
            return Ok(());
        }
        if prefix != self.cfg.message_prefix {
            tracing::debug!(prefix, "ignoring logical message with another prefix");
            return Ok(());
        }
        if self.cfg.write_mode != WriteMode::LogicalMessage
            && !crate::faults::mutant("accept_messages_any_mode")
        {
            // Any role with EXECUTE on pg_logical_emit_message (PUBLIC by default) can write
            // one: outside logical_message mode it is never an event.
            self.refuse_message(lsn);
            return Ok(());
        }
        if !transactional {
            tracing::error!(%lsn, "refusing a NON-transactional outbox message: it is written even if its transaction rolls back; write events with pg_logical_emit_message(true, …)");
            return Ok(());
        }
        // A malformed message is handed on too: the relay parks it with its reason, under an
        // id derived from its LSN when its own cannot be read.
        let event = StoredEvent::from_logical_message(content).map_err(|mut m| {
            if m.id.is_none() {
                m.salvaged.id = malformed_message_id(lsn);
            }
            m
        });
        self.push_open(event, "transactional message outside a transaction")
    }

    /// Whether part of the transaction being received was handed on already. A clean stop then
    /// reads on to its commit (it is committed and on its way: pgoutput sends only committed
    /// transactions), so the relay finishes it and the slot is confirmed past it; stopping in
    /// the middle would make the next start send the handed-on part again.
    fn finishing_a_transaction(&self) -> bool {
        self.open.as_ref().is_some_and(|t| t.handed_on)
    }

    /// Adds an event to the open transaction; hands a chunk on when the transaction has grown
    /// past [`TX_CHUNK_EVENTS`] or [`TX_CHUNK_BYTES`] (see there why that is safe).
    fn push_open(
        &mut self,
        event: Result<StoredEvent, MalformedEvent>,
        outside: &'static str,
    ) -> Result<(), LogicalError> {
        let Some(tx) = self.open.as_mut() else {
            return Err(LogicalError::Replication(outside.into()));
        };
        tx.bytes += payload_bytes(&event);
        tx.events.push(event);
        if tx.events.len() <= TX_CHUNK_EVENTS && tx.bytes <= TX_CHUNK_BYTES {
            return Ok(());
        }
        tx.handed_on = true;
        let last = tx.events.pop().expect("an event was just added");
        tx.bytes = payload_bytes(&last);
        let chunk = std::mem::replace(&mut tx.events, vec![last]);
        let commit_lsn = tx.commit_lsn.0;
        self.metrics
            .events_streamed
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        for event in chunk {
            self.ready.push_back(SourceEvent::decoded(
                event,
                Position::Wal {
                    commit_lsn,
                    // Not known before the Commit, and never used: a chunk confirms nothing.
                    end_lsn: 0,
                    last_in_transaction: false,
                },
            ));
        }
        Ok(())
    }

    /// Counts a refused outbox-prefixed message and warns, at most once per
    /// [`INJECTION_WARN_INTERVAL`], with the LSN and the number refused since the last warning.
    fn refuse_message(&mut self, lsn: Lsn) {
        self.metrics
            .messages_refused
            .fetch_add(1, Ordering::Relaxed);
        self.refused_since_warning += 1;
        let now = Instant::now();
        if self
            .last_refusal_warning
            .is_none_or(|t| now.duration_since(t) >= INJECTION_WARN_INTERVAL)
        {
            tracing::warn!(
                %lsn,
                refused = self.refused_since_warning,
                write_mode = %self.cfg.write_mode,
                prefix = %self.cfg.message_prefix,
                "ignoring a logical decoding message with the outbox prefix: events are accepted \
                 from pg_logical_emit_message only in the logical_message write mode (someone \
                 emitted it by hand or a writer is misconfigured; it is never published)"
            );
            self.last_refusal_warning = Some(now);
            self.refused_since_warning = 0;
        }
    }

    async fn heartbeat_or_check(&mut self) -> Result<(), LogicalError> {
        self.release_marks(false).await?;
        let now = Instant::now();
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.cfg.heartbeat_interval;
            if self.idle() {
                slot::emit_heartbeat(&self.pool, &self.cfg.message_prefix).await?;
                self.metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
        }
        if now >= self.next_slot_check {
            self.next_slot_check = now + self.cfg.slot_check_interval;
            match slot::slot_status(&self.pool, &self.cfg.slot).await? {
                Some(s) if !s.is_lost() => {
                    s.record_in(&self.metrics);
                    if self.confirmed > self.state_recorded {
                        state::update_confirmed(
                            &self.pool,
                            &self.cfg.table,
                            &self.cfg.slot,
                            self.confirmed,
                        )
                        .await?;
                        self.state_recorded = self.confirmed;
                    }
                    tracing::debug!(lag_bytes = ?s.lag_bytes, retained_bytes = ?s.retained_bytes,
                        wal_status = ?s.wal_status, safe_wal_size = ?s.safe_wal_size, "replication slot status");
                    if s.wal_status.as_deref() == Some("unreserved") {
                        tracing::warn!(lag_bytes = ?s.lag_bytes, safe_wal_size = ?s.safe_wal_size, "replication slot is about to be invalidated (wal_status = unreserved)");
                    }
                }
                Some(s) => {
                    s.record_in(&self.metrics);
                    return Err(LogicalError::SlotLost {
                        slot: self.cfg.slot.to_string(),
                        detail: "wal_status = 'lost'".into(),
                    });
                }
                None => {
                    return Err(LogicalError::SlotLost {
                        slot: self.cfg.slot.to_string(),
                        detail: "the slot no longer exists".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Wait for the next replication event (or a timer) and apply it.
    async fn step(&mut self, shutdown: &CancellationToken) -> Result<bool, LogicalError> {
        let deadline = self.next_heartbeat.min(self.next_slot_check);
        let finishing = self.finishing_a_transaction();
        let Some(session) = self.session.as_mut() else {
            return Err(LogicalError::Replication("no replication session".into()));
        };
        let marks = self.marks.as_mut();
        let marking = marks.as_ref().is_some_and(|m| !m.is_empty());
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !finishing => Ok(true),
            // A row acknowledgement became durable: its LSN may be confirmed now, not only when
            // the next event arrives.
            done = async { marks.expect("marking").next_completed().await }, if marking => {
                if let Some(lsn) = done? {
                    self.confirm(lsn);
                }
                Ok(false)
            }
            r = session.recv() => {
                match r {
                    Ok(Some(ev)) => self.handle(ev).map(|_| false),
                    Ok(None) => Err(LogicalError::Replication("replication stream ended".into())),
                    Err(e) => Err(stream::classify(&self.cfg.slot, e)),
                }
            }
            _ = tokio::time::sleep_until(deadline) => self.heartbeat_or_check().await.map(|_| false),
        }
    }

    async fn next_batch_inner(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SourceEvent>, LogicalError> {
        if self.stopped {
            return Ok(Vec::new());
        }
        self.release_marks(false).await?;
        if self.republication.is_some() {
            // Re-publication from the table: one page at a time, the next only once the previous
            // one was handed on; nothing is streamed before the table was read to the end.
            if self.ready.is_empty() && self.republishing() {
                if shutdown.is_cancelled() {
                    self.close().await?;
                    return Ok(Vec::new());
                }
                self.next_page(max).await?;
            }
            if !self.ready.is_empty() {
                return Ok(self.take_batch(max));
            }
        }
        if self.session.is_none() {
            if self.stream_deferred && shutdown.is_cancelled() {
                self.close().await?;
                return Ok(Vec::new());
            }
            if self.stream_deferred {
                // The re-publication was read to the end (and everything returned is
                // acknowledged: the relay calls next_batch only then): stream from the slot.
                self.stream_deferred = false;
                self.start_session().await?;
            } else {
                self.restart().await?;
            }
        }
        // The relay calls next_batch only once everything returned before was acknowledged or
        // rewound, so a broken session can be replaced here without losing anything: one
        // in-place restart per call (a lost slot is detected and, in table mode, recovered by
        // it), then errors go to the relay.
        let mut restarted = false;
        while self.ready.is_empty() {
            match self.step(shutdown).await {
                Ok(true) => {
                    self.close().await?;
                    return Ok(Vec::new());
                }
                Ok(false) => {}
                Err(e) if !restarted && self.inflight.is_empty() && self.restartable(&e) => {
                    tracing::warn!(error = %Report(&e), "replication session failed; restarting from the confirmed position");
                    restarted = true;
                    self.restart().await?;
                }
                Err(e @ LogicalError::SlotLost { .. }) => return Err(self.explain_loss(e).await),
                Err(e) => return Err(e),
            }
        }
        if !shutdown.is_cancelled() {
            self.read_buffered(max).await?;
        }
        Ok(self.take_batch(max))
    }

    /// Applies what the replication session has already received, without waiting, until `max`
    /// events are ready. A session error is kept for the next blocking read: what is complete
    /// stays usable.
    async fn read_buffered(&mut self, max: usize) -> Result<(), LogicalError> {
        let size = |e: &SourceEvent| e.event.payload.as_ref().map_or(0, String::len);
        let mut bytes: usize = self.ready.iter().map(size).sum();
        while self.ready.len() < max && bytes < self.batch_bytes {
            let Some(session) = self.session.as_mut() else {
                break;
            };
            match tokio::time::timeout(Duration::ZERO, session.recv()).await {
                Ok(Ok(Some(ev))) => {
                    let before = self.ready.len();
                    self.handle(ev)?;
                    bytes += self.ready.range(before..).map(size).sum::<usize>();
                }
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(e)) => {
                    tracing::debug!(error = %Report(&e), "replication session failed after events were read");
                    break;
                }
            }
        }
        Ok(())
    }

    /// Move up to `max` ready events to the in-flight window and return them, cut once their
    /// payloads reach the batch byte bound (the first event always goes).
    fn take_batch(&mut self, max: usize) -> Vec<SourceEvent> {
        let mut n = 0;
        let mut bytes = 0usize;
        for e in self.ready.iter().take(max.max(1)) {
            if n > 0 && bytes >= self.batch_bytes {
                break;
            }
            bytes += e.event.payload.as_ref().map_or(0, String::len);
            n += 1;
        }
        let batch: Vec<SourceEvent> = self.ready.drain(..n).collect();
        if tracing::enabled!(tracing::Level::TRACE) {
            for e in &batch {
                tracing::trace!(event_id = %e.event.id, aggregate_seq = ?e.event.aggregate_seq, position = ?e.position, "returned");
            }
        }
        self.inflight.extend(batch.iter().map(|e| InFlight {
            id: e.event.id,
            position: e.position,
        }));
        if crate::faults::mutant("confirm_on_receipt") {
            // Broken on purpose: confirm what was merely received, before Kafka has it.
            if let Some(end) = batch.iter().rev().find_map(|e| match e.position {
                Position::Wal {
                    end_lsn,
                    last_in_transaction: true,
                    ..
                } => Some(end_lsn),
                _ => None,
            }) {
                self.confirm(Lsn(end));
            }
        }
        batch
    }

    async fn acknowledge_inner(&mut self, delivered: &[SourceEvent]) -> Result<(), LogicalError> {
        if delivered.is_empty() {
            return Ok(());
        }
        if delivered.len() > self.inflight.len() {
            return Err(LogicalError::Replication(format!(
                "acknowledged {} events but only {} are in flight",
                delivered.len(),
                self.inflight.len()
            )));
        }
        for (d, f) in delivered.iter().zip(self.inflight.iter()) {
            if d.event.id != f.id {
                return Err(LogicalError::Replication(format!(
                    "acknowledged event {} is not the next one in flight ({})",
                    d.event.id, f.id
                )));
            }
        }
        let mut new_confirm = None;
        for _ in 0..delivered.len() {
            if let Some(f) = self.inflight.pop_front()
                && let Position::Wal {
                    end_lsn,
                    last_in_transaction: true,
                    ..
                } = f.position
            {
                new_confirm = Some(Lsn(end_lsn));
            }
        }
        match self.marks.as_mut() {
            // table mode: the rows are marked published BEFORE the LSN is confirmed; the mark
            // runs beside the pipeline and releases the LSN once it is durable.
            Some(marks) => {
                let done = marks
                    .submit(delivered.iter().map(|d| &d.event), new_confirm)
                    .await?;
                for lsn in done.into_iter().flatten() {
                    self.confirm(lsn);
                }
            }
            None => {
                if let Some(lsn) = new_confirm {
                    self.confirm(lsn);
                }
            }
        }
        // The marker slot goes only once the table was read to the end and every re-published
        // row is durably marked.
        self.finish_backfill_if_complete().await?;
        if self.stopped {
            self.release_marks(true).await?;
            // Acknowledged after shutdown: make it durable right away.
            slot::advance_slot(&self.pool, &self.cfg.slot, self.confirmed).await?;
        }
        Ok(())
    }
}

async fn create_marker(pool: &PgPool, marker: &SlotName) -> Result<(), LogicalError> {
    // A physical slot that reserves no WAL: a durable, free flag.
    let res = sqlx::query("SELECT pg_create_physical_replication_slot($1, false)")
        .bind(marker.as_str())
        .execute(pool)
        .await;
    match res {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(()),
        Err(source) => Err(LogicalError::Database {
            context: "creating the re-publication marker slot",
            source,
        }),
    }
}

#[async_trait]
impl Source for LogicalSource {
    fn name(&self) -> &'static str {
        "logical"
    }

    async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SourceEvent>, SourceError> {
        match self.next_batch_inner(max, shutdown).await {
            Ok(b) => Ok(b),
            Err(e) => {
                if matches!(e, LogicalError::SlotLost { .. }) {
                    tracing::error!(error = %Report(&e), "replication slot lost");
                }
                // The session is unusable after an error: the next call (after the relay's
                // rewind) starts a new one from the confirmed position.
                if let Some(s) = self.session.take() {
                    s.stop().await;
                }
                // A lost slot in table mode with recovery on is recoverable: the relay reopens
                // the source, which re-publishes from the table.
                Err(SourceError::new("logical", self.kind_of(&e), e))
            }
        }
    }

    /// Whatever complete transactions are already buffered, without waiting; lets the relay
    /// produce the next batch while earlier ones are in flight.
    async fn poll_batch(&mut self, max: usize) -> Result<Vec<SourceEvent>, SourceError> {
        if self.stopped {
            return Ok(Vec::new());
        }
        self.release_marks(false).await?;
        if self.ready.is_empty() && self.republishing() {
            // The previous page was handed on (the relay bounds its window by bytes itself).
            self.next_page(max).await?;
        }
        self.read_buffered(max).await?;
        if self.ready.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.take_batch(max))
    }

    async fn acknowledge(&mut self, delivered: &[SourceEvent]) -> Result<(), SourceError> {
        Ok(self.acknowledge_inner(delivered).await?)
    }

    /// Batches, the pages of a re-publication and what is read ahead from the stream are cut at
    /// `bytes` of payload.
    fn limit_batch_bytes(&mut self, bytes: usize) {
        self.batch_bytes = bytes.max(1);
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        Ok(self.release_marks(true).await?)
    }

    async fn rewind(&mut self) -> Result<(), SourceError> {
        if self.stopped {
            return Ok(());
        }
        Ok(self.restart().await?)
    }

    /// Parks events in the table's `<table>_parked` table (created by the migrations, also in
    /// `logical_message` mode), through the leader's session. Called before `acknowledge` covers
    /// them, so the slot is confirmed past a poison event only once it is durably parked.
    async fn park(&mut self, requests: &[ParkRequest]) -> Result<(), SourceError> {
        if requests.is_empty() {
            return Ok(());
        }
        if !self.parked_table_exists().await? {
            return Err(SourceError::new(
                "logical",
                ErrorKind::Setup,
                format!(
                    "cannot park {} event(s): the parked-events table {} does not exist; \
                     run `outbox-relay migrate` (also needed in logical_message mode)",
                    requests.len(),
                    self.cfg.table.parked_qualified()
                ),
            ));
        }
        let table = self.cfg.table.clone();
        let result = match self.leader.as_mut() {
            Some(l) => crate::park::park(&mut *l.connection().await, &table, requests).await,
            None => match self.pool.acquire().await {
                Ok(mut conn) => crate::park::park(&mut conn, &table, requests).await,
                Err(e) => Err(e),
            },
        };
        result.map_err(|error| SourceError::database("logical", error))
    }

    /// The aggregates with parked events (none when the parked-events table does not exist).
    async fn blocked_aggregates(&mut self) -> Result<HashMap<AggregateKey, Uuid>, SourceError> {
        if !self.parked_table_exists().await? {
            return Ok(HashMap::new());
        }
        let table = self.cfg.table.clone();
        let result = match self.leader.as_mut() {
            Some(l) => crate::park::blocked_aggregates(&mut *l.connection().await, &table).await,
            None => match self.pool.acquire().await {
                Ok(mut conn) => crate::park::blocked_aggregates(&mut conn, &table).await,
                Err(e) => Err(e),
            },
        };
        result.map_err(|error| SourceError::database("logical", error))
    }
}

impl LogicalSource {
    /// Whether `<table>_parked` exists; a positive answer is remembered.
    async fn parked_table_exists(&mut self) -> Result<bool, SourceError> {
        if self.parked_table {
            return Ok(true);
        }
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.cfg.table.parked_qualified())
            .fetch_one(&self.pool)
            .await
            .map_err(|error| SourceError::database("logical", error))?;
        self.parked_table = exists;
        Ok(exists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgoutput::tests::{Buf, relation_msg};
    use pgwire_replication::Lsn as WLsn;

    fn source(mode: WriteMode) -> LogicalSource {
        let url = "postgres://nobody@127.0.0.1:1/none";
        let now = Instant::now();
        LogicalSource {
            cfg: LogicalConfig::new(url, OutboxTable::default(), mode),
            pool: PgPoolOptions::new().connect_lazy(url).unwrap(),
            leader: None,
            target: ReplicationTarget::from_url(url).unwrap(),
            table: Some(ResolvedTable {
                schema: "public".into(),
                name: "outbox".into(),
                qualified: "\"public\".\"outbox\"".into(),
            }),
            heartbeat_prefix: "outbox-heartbeat".into(),
            session: None,
            relations: HashMap::new(),
            open: None,
            ready: VecDeque::new(),
            inflight: VecDeque::new(),
            confirmed: Lsn(100),
            state_recorded: Lsn::ZERO,
            instance: None,
            last_refusal_warning: None,
            refused_since_warning: 0,
            backfill_due: false,
            republication: None,
            stream_deferred: false,
            batch_bytes: usize::MAX,
            next_heartbeat: now,
            next_slot_check: now,
            stopped: false,
            parked_table: false,
            marks: None,
            metrics: Arc::default(),
        }
    }

    fn xlog(data: Vec<u8>) -> ReplicationEvent {
        ReplicationEvent::XLogData {
            wal_start: WLsn::ZERO,
            wal_end: WLsn::ZERO,
            server_time_micros: 0,
            data: data.into(),
        }
    }

    fn insert(rel: u32, id: &str, agg: &str) -> ReplicationEvent {
        xlog(
            Buf::tag(b'I')
                .i32(rel as i32)
                .u8(b'N')
                .i16(5)
                .text(id)
                .text("order")
                .text(agg)
                .text("Created")
                .u8(b'n')
                .0,
        )
    }

    fn begin(lsn: u64) -> ReplicationEvent {
        ReplicationEvent::Begin {
            final_lsn: WLsn::from_u64(lsn),
            xid: 1,
            commit_time_micros: 0,
        }
    }

    fn commit(lsn: u64, end: u64) -> ReplicationEvent {
        ReplicationEvent::Commit {
            lsn: WLsn::from_u64(lsn),
            end_lsn: WLsn::from_u64(end),
            commit_time_micros: 0,
        }
    }

    fn keepalive(lsn: u64) -> ReplicationEvent {
        ReplicationEvent::KeepAlive {
            wal_end: WLsn::from_u64(lsn),
            reply_requested: true,
            server_time_micros: 0,
        }
    }

    const ID1: &str = "00000000-0000-0000-0000-000000000001";
    const ID2: &str = "00000000-0000-0000-0000-000000000002";
    const ID3: &str = "00000000-0000-0000-0000-000000000003";

    /// Batches are cut at the byte bound set with `limit_batch_bytes`, not only at `max`: the
    /// events whose preceding payloads stay under it go (the first one always, however large),
    /// and order is kept across the cuts.
    #[tokio::test]
    async fn batches_are_cut_at_the_byte_bound() {
        let mut s = source(WriteMode::InsertDelete);
        let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
        s.handle(begin(200)).unwrap();
        s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
            .unwrap();
        let blob = format!("\"{}\"", "x".repeat(998));
        let big = format!("\"{}\"", "y".repeat(9_998));
        let mut ids = Vec::new();
        for i in 0..10u128 {
            let id = Uuid::from_u128(i + 1).to_string();
            let payload = if i == 5 { &big } else { &blob };
            s.handle(xlog(
                Buf::tag(b'I')
                    .i32(7)
                    .u8(b'N')
                    .i16(5)
                    .text(&id)
                    .text("order")
                    .text("a")
                    .text("Created")
                    .text(payload)
                    .0,
            ))
            .unwrap();
            ids.push(id);
        }
        s.handle(commit(200, 210)).unwrap();
        assert_eq!(s.ready.len(), 10);
        let sizes = |b: &[SourceEvent]| -> Vec<usize> {
            b.iter()
                .map(|e| e.event.payload.as_ref().map_or(0, String::len))
                .collect()
        };
        // Without a bound only `max` cuts.
        assert_eq!(s.take_batch(2).len(), 2);
        s.limit_batch_bytes(2500);
        let b = s.take_batch(100);
        assert_eq!(sizes(&b), vec![1000; 3], "cut once 2500 bytes are reached");
        let b = s.take_batch(100);
        assert_eq!(
            sizes(&b),
            vec![10_000],
            "a payload over the bound goes alone"
        );
        let b = s.take_batch(100);
        assert_eq!(sizes(&b), vec![1000; 3]);
        let b = s.take_batch(1);
        assert_eq!(b.len(), 1, "`max` still cuts");
        let b = s.take_batch(100);
        assert_eq!(b.len(), 0);
        let order: Vec<String> = s.inflight.iter().map(|f| f.id.to_string()).collect();
        assert_eq!(order, ids, "order is kept across the cuts");
    }

    /// A transaction larger than a chunk is handed on before its commit arrives, and still
    /// confirms its end LSN only once its last event is acknowledged.
    #[tokio::test]
    async fn a_large_transaction_is_handed_on_in_chunks_and_confirmed_at_its_end() {
        let mut s = source(WriteMode::InsertDelete);
        let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
        s.handle(begin(200)).unwrap();
        s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
            .unwrap();
        let n = 2 * TX_CHUNK_EVENTS + 500;
        let ids: Vec<String> = (0..n)
            .map(|i| Uuid::from_u128(i as u128 + 1).to_string())
            .collect();
        for id in &ids {
            s.handle(insert(7, id, "a")).unwrap();
        }
        let open = s.open.as_ref().map_or(0, |t| t.events.len());
        assert!(
            open <= TX_CHUNK_EVENTS,
            "{open} events of the open transaction buffered"
        );
        assert_eq!(s.ready.len() + open, n);
        assert!(
            s.ready.iter().all(|e| matches!(
                e.position,
                Position::Wal {
                    commit_lsn: 200,
                    last_in_transaction: false,
                    ..
                }
            )),
            "chunks are never the end of their transaction"
        );
        let early = s.take_batch(n);
        s.acknowledge_inner(&early).await.unwrap();
        assert_eq!(
            s.confirmed,
            Lsn(100),
            "an unfinished transaction confirms nothing"
        );
        s.handle(keepalive(5000)).unwrap();
        assert_eq!(s.confirmed, Lsn(100), "nor does a keepalive inside it");
        s.handle(commit(200, 210)).unwrap();
        let rest = s.take_batch(n);
        assert_eq!(early.len() + rest.len(), n);
        let order: Vec<String> = early
            .iter()
            .chain(&rest)
            .map(|e| e.event.id.to_string())
            .collect();
        assert_eq!(order, ids, "the transaction's order is kept");
        assert_eq!(
            rest.last().unwrap().position,
            Position::Wal {
                commit_lsn: 200,
                end_lsn: 210,
                last_in_transaction: true
            }
        );
        s.acknowledge_inner(&rest).await.unwrap();
        assert_eq!(s.confirmed, Lsn(210));
    }

    #[tokio::test]
    async fn confirmation_never_passes_the_acknowledged_prefix() {
        let mut s = source(WriteMode::InsertDelete);
        let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
        s.handle(begin(200)).unwrap();
        s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
            .unwrap();
        s.handle(insert(7, ID1, "a")).unwrap();
        // A delete of the insert_delete trick is ignored.
        s.handle(xlog(Buf::tag(b'D').i32(7).u8(b'K').i16(1).text(ID1).0))
            .unwrap();
        s.handle(insert(7, ID2, "a")).unwrap();
        // A keepalive inside an open transaction never confirms.
        s.handle(keepalive(5000)).unwrap();
        assert_eq!(s.confirmed, Lsn(100));
        assert!(s.ready.is_empty(), "nothing is returned before the commit");
        s.handle(commit(200, 210)).unwrap();
        s.handle(begin(300)).unwrap();
        s.handle(insert(7, ID3, "b")).unwrap();
        s.handle(commit(300, 310)).unwrap();
        // Received but not acknowledged: keepalives must not confirm.
        s.handle(keepalive(400)).unwrap();
        assert_eq!(s.confirmed, Lsn(100));

        let batch = s.take_batch(10);
        assert_eq!(batch.len(), 3);
        assert_eq!(
            batch[0].position,
            Position::Wal {
                commit_lsn: 200,
                end_lsn: 210,
                last_in_transaction: false
            }
        );
        assert_eq!(
            batch[1].position,
            Position::Wal {
                commit_lsn: 200,
                end_lsn: 210,
                last_in_transaction: true
            }
        );
        s.handle(keepalive(400)).unwrap();
        assert_eq!(
            s.confirmed,
            Lsn(100),
            "in flight: keepalive must not confirm"
        );
        s.acknowledge_inner(&batch[..1]).await.unwrap();
        assert_eq!(s.confirmed, Lsn(100), "half a transaction confirms nothing");
        s.acknowledge_inner(&batch[1..2]).await.unwrap();
        assert_eq!(s.confirmed, Lsn(210));
        s.handle(keepalive(400)).unwrap();
        assert_eq!(s.confirmed, Lsn(210), "tx 2 still in flight");
        s.acknowledge_inner(&batch[2..]).await.unwrap();
        assert_eq!(s.confirmed, Lsn(310));
        // Now idle: a keepalive or heartbeat may be confirmed.
        s.handle(keepalive(400)).unwrap();
        assert_eq!(s.confirmed, Lsn(400));
        s.handle(ReplicationEvent::Message {
            transactional: false,
            lsn: WLsn::from_u64(450),
            prefix: "outbox-heartbeat".into(),
            content: Vec::new().into(),
        })
        .unwrap();
        assert_eq!(s.confirmed, Lsn(450));
        // An empty transaction while idle is confirmable at once.
        s.handle(begin(500)).unwrap();
        s.handle(commit(500, 510)).unwrap();
        assert_eq!(s.confirmed, Lsn(510));
        // Never backwards.
        s.handle(keepalive(10)).unwrap();
        assert_eq!(s.confirmed, Lsn(510));
    }

    #[tokio::test]
    async fn acknowledging_out_of_order_or_too_much_is_refused() {
        let mut s = source(WriteMode::InsertDelete);
        let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
        s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
            .unwrap();
        s.handle(begin(200)).unwrap();
        s.handle(insert(7, ID1, "a")).unwrap();
        s.handle(insert(7, ID2, "a")).unwrap();
        s.handle(commit(200, 210)).unwrap();
        let batch = s.take_batch(10);
        assert!(s.acknowledge_inner(&batch[1..]).await.is_err());
        let mut more = batch.clone();
        more.push(batch[0].clone());
        assert!(s.acknowledge_inner(&more).await.is_err());
        assert_eq!(s.confirmed, Lsn(100));
    }

    #[tokio::test]
    async fn messages_and_other_tables() {
        let mut s = source(WriteMode::LogicalMessage);
        s.table = None;
        let content = format!(
            r#"{{"id":"{ID1}","aggregatetype":"order","aggregateid":"1","type":"Created","payload":{{"a":1}}}}"#
        );
        s.handle(begin(200)).unwrap();
        // insert into some other table is ignored
        s.handle(xlog(relation_msg(9, "public", "accounts", &["id"])))
            .unwrap();
        s.handle(xlog(Buf::tag(b'I').i32(9).u8(b'N').i16(1).text("x").0))
            .unwrap();
        for (prefix, transactional) in [("outbox", true), ("other", true), ("outbox", false)] {
            s.handle(ReplicationEvent::Message {
                transactional,
                lsn: WLsn::from_u64(205),
                prefix: prefix.into(),
                content: content.clone().into_bytes().into(),
            })
            .unwrap();
        }
        s.handle(commit(200, 210)).unwrap();
        let batch = s.take_batch(10);
        assert_eq!(
            batch.len(),
            1,
            "only the transactional message with our prefix"
        );
        assert_eq!(batch[0].event.payload.as_deref(), Some(r#"{"a":1}"#));
    }

    /// Outside `logical_message` mode an outbox-prefixed message is never an event (anyone with
    /// EXECUTE on pg_logical_emit_message could write one); the transaction's real insert is.
    #[tokio::test]
    async fn messages_are_refused_outside_logical_message_mode() {
        for mode in [WriteMode::Table, WriteMode::InsertDelete] {
            let mut s = source(mode);
            let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
            let content = format!(
                r#"{{"id":"{ID2}","aggregatetype":"order","aggregateid":"1","type":"Injected","payload":{{}}}}"#
            );
            s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
                .unwrap();
            s.handle(begin(200)).unwrap();
            s.handle(ReplicationEvent::Message {
                transactional: true,
                lsn: WLsn::from_u64(205),
                prefix: "outbox".into(),
                content: content.clone().into_bytes().into(),
            })
            .unwrap();
            s.handle(insert(7, ID1, "a")).unwrap();
            s.handle(commit(200, 210)).unwrap();
            let batch = s.take_batch(10);
            assert_eq!(batch.len(), 1, "{mode}");
            assert_eq!(batch[0].event.id.to_string(), ID1);
            assert_eq!(s.metrics.messages_refused.load(Ordering::Relaxed), 1);
            // A transaction holding only an injected message confirms like an empty one.
            s.acknowledge_inner(&batch).await.unwrap();
            s.handle(begin(300)).unwrap();
            s.handle(ReplicationEvent::Message {
                transactional: true,
                lsn: WLsn::from_u64(305),
                prefix: "outbox".into(),
                content: content.into_bytes().into(),
            })
            .unwrap();
            s.handle(commit(300, 310)).unwrap();
            assert!(s.ready.is_empty());
            assert_eq!(s.confirmed, Lsn(310));
        }
    }

    #[test]
    fn default_names_are_valid_and_marker_fits() {
        // One name per thing: the library's defaults are the configuration file's.
        let settings = crate::config::LogicalSettings::default();
        assert_eq!(SlotName::default().as_str(), settings.slot);
        assert_eq!(PublicationName::default().as_str(), settings.publication);
        assert!(SlotName::parse(&settings.slot).is_ok());
        assert!(PublicationName::parse(&settings.publication).is_ok());
        let long = SlotName::parse(&"s".repeat(63)).unwrap();
        assert_eq!(marker_slot(&long).as_str().len(), 63);
        assert_eq!(marker_slot(&SlotName::parse("a").unwrap()).as_str(), "a_bf");
    }
}
