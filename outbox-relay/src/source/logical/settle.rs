//! Deferred row marks of the logical source (`table` mode, `acknowledgement = "mark"`): rows
//! streamed and delivered get `published_at` in large background statements, off the pipeline's
//! path, instead of one UPDATE per acknowledged batch gating the slot's confirmation.
//!
//! For a streamed row the slot's confirmed position is already the durable record that it was
//! delivered: the relay confirms an LSN only once Kafka acknowledged every event of the
//! transactions before it. `published_at` is needed later, by `status`, the retention purge, a
//! re-publication after a slot loss and a switch to the polling source, so the mark can wait;
//! what must not happen is a delivered row that stays unmarked for good, or a mark on a row that
//! was not delivered.
//!
//! Guarantees of [`Settle`]:
//! - **Only delivered rows are marked.** The rows recorded ([`Settle::record`]) are those of
//!   acknowledged transactions. A recovery round ([`Settle::recover`]) reads, in one statement,
//!   the unpublished rows visible to it and the WAL insert position `P` after that snapshot: every
//!   row it saw was committed before `P`, so once the source's confirmed position reaches `P`
//!   (on the same PostgreSQL instance) each of them was delivered, streamed or re-published.
//! - **None stays unmarked.** Rows recorded but not yet marked when the relay crashed (their
//!   LSN confirmed, their mark lost with the process) are found by the recovery round the next
//!   start runs once the source is first idle (or after [`SETTLE_DELAY`]), and likewise after a
//!   resume on another PostgreSQL instance. A stop, a slot loss and a
//!   flush mark everything recorded first ([`Settle::flush`]), so a re-publication after a slot
//!   loss publishes nothing twice.
//! - **Bounded lag and memory.** Marks start when the source is idle (nothing in flight),
//!   when [`SETTLE_ROWS`] rows are waiting, or when the oldest waited [`SETTLE_DELAY`]; at most
//!   [`MAX_UNSETTLED`] rows wait (8 bytes each) — beyond that an acknowledgement waits for the
//!   running mark.
//! - **Same server.** Each mark checks first that its session is on the PostgreSQL instance the
//!   rows were streamed from ([`slot::instance`]): after a failover a `seq` may name another
//!   row. Rows of another instance are left to the recovery round.
//! - **Fenced.** With a lease, each statement runs only while the leader's lease holds.
//! - **Failures are loud and lose nothing.** A failed mark is logged and its rows are kept for
//!   the next attempt; a mark is idempotent.

use std::time::Duration;

use outbox_core::OutboxTable;
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{LogicalError, Lsn, slot};
use crate::config::RowAcknowledgement;
use crate::failure::Report;
use crate::leader::Lease;
use crate::source::row_marks::{MarkError, RowKeys, acknowledge_keys};
use crate::table;

/// Rows waiting for their mark that start one even while the source is busy.
pub const SETTLE_ROWS: usize = 250_000;
/// The longest a delivered row waits for its mark while the source is busy.
pub const SETTLE_DELAY: Duration = Duration::from_secs(10);
/// Rows waiting beyond which an acknowledgement waits for the running mark.
pub const MAX_UNSETTLED: usize = 2 * SETTLE_ROWS;
/// Sessions one mark uses at once (the ack pool's size).
const MARK_SESSIONS: usize = crate::source::row_marks::MAX_PENDING_ACKNOWLEDGEMENTS;
/// Rows marked per statement (and transaction): keeps each transaction's WAL, which the
/// walsender decodes too, well under `logical_decoding_work_mem`.
const STATEMENT_ROWS: usize = 10_000;
/// The pause after a failed mark before the next one starts.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// When recorded rows start a mark while the source is busy, and how many may wait: the
/// single-table source's defaults are [`SETTLE_ROWS`], [`SETTLE_DELAY`] and [`MAX_UNSETTLED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SettleLimits {
    /// Rows waiting that start a mark even while the source is busy.
    pub rows: usize,
    /// The longest a recorded row waits for its mark while the source is busy.
    pub delay: Duration,
    /// Rows waiting beyond which [`Settle::record`] waits for the running mark.
    pub max_unsettled: usize,
}

impl Default for SettleLimits {
    fn default() -> Self {
        Self {
            rows: SETTLE_ROWS,
            delay: SETTLE_DELAY,
            max_unsettled: MAX_UNSETTLED,
        }
    }
}

/// Unpublished rows one recovery round reads; a full round is followed by another.
const RECOVERY_ROWS: i64 = 100_000;

/// A recovery round: the unpublished rows one snapshot saw, and the WAL position after it.
#[derive(Debug)]
struct Recovery {
    position: Lsn,
    instance: String,
    seqs: Vec<i64>,
}

/// What a background mark was given, handed back with its outcome.
#[derive(Debug)]
struct Job {
    keys: RowKeys,
    instance: String,
    /// From a recovery round: most rows may be marked already, and a full round asks for
    /// another.
    recovery: bool,
    full: bool,
}

/// Deferred row marks. See the [module docs](self).
#[derive(Debug)]
pub(super) struct Settle {
    pool: PgPool,
    table: OutboxTable,
    lease: Option<Lease>,
    limits: SettleLimits,
    /// Delivered rows not yet marked, and the instance they were streamed from.
    unsettled: RowKeys,
    unsettled_instance: Option<String>,
    /// When the oldest of `unsettled` was recorded.
    since: Option<Instant>,
    running: Option<JoinHandle<(Job, Result<u64, MarkError>)>>,
    recovery: Option<Recovery>,
    /// A recovery round is to be read on this instance, due since then.
    recovery_due: Option<(String, Instant)>,
    /// After a failed mark, no new one starts before this instant (a flush does).
    retry_at: Option<Instant>,
}

impl Settle {
    /// Marks rows of `table` over connections of `pool`, fenced by `lease` when one is given.
    pub(super) fn new(pool: PgPool, table: OutboxTable, lease: Option<Lease>) -> Self {
        Self::with_limits(pool, table, lease, SettleLimits::default())
    }

    /// [`Settle::new`] with other [`SettleLimits`] (the multi-table path keeps fewer rows
    /// waiting, for it has no recovery round: see [`super::multi`]).
    pub(super) fn with_limits(
        pool: PgPool,
        table: OutboxTable,
        lease: Option<Lease>,
        limits: SettleLimits,
    ) -> Self {
        Self {
            pool,
            table,
            lease,
            limits,
            unsettled: RowKeys::default(),
            unsettled_instance: None,
            since: None,
            running: None,
            recovery: None,
            recovery_due: None,
            retry_at: None,
        }
    }

    /// Fences the statements from now on with `lease` (a new leader term of the same process:
    /// rows it recorded under the previous term were delivered and are still marked).
    pub(super) fn set_lease(&mut self, lease: Option<Lease>) {
        self.lease = lease;
    }

    /// Whether recorded rows wait for their mark or a mark is running: the owner should call
    /// [`Settle::poll`] again soon.
    pub(super) fn busy(&self) -> bool {
        self.running.is_some() || !self.unsettled_is_empty()
    }

    /// Records delivered rows, streamed from `instance`; their transactions' LSNs may be
    /// confirmed at once. Waits for the running mark while [`MAX_UNSETTLED`] rows wait.
    pub(super) async fn record(
        &mut self,
        keys: RowKeys,
        instance: Option<&str>,
    ) -> Result<(), LogicalError> {
        if keys.seqs.is_empty() && keys.ids.is_empty() {
            return Ok(());
        }
        if self.unsettled_instance.as_deref() != instance && !self.unsettled_is_empty() {
            // Streamed from another server than the rows still waiting: those are left to the
            // recovery round the resume on the new instance scheduled.
            self.unsettled = RowKeys::default();
        }
        self.unsettled_instance = instance.map(str::to_owned);
        self.since.get_or_insert_with(Instant::now);
        self.unsettled.seqs.extend(keys.seqs);
        self.unsettled.ids.extend(keys.ids);
        while self.unsettled_len() >= self.limits.max_unsettled && self.running.is_some() {
            self.wait_running().await;
        }
        Ok(())
    }

    /// Schedules a recovery round on `instance` (a start, or a resume on another instance): it
    /// is read once the source is idle (or after [`SETTLE_DELAY`]), so that it finds the rows
    /// whose marks were lost rather than the backlog still to be streamed.
    pub(super) fn schedule_recovery(&mut self, instance: &str) {
        self.recovery = None;
        self.recovery_due = Some((instance.to_owned(), Instant::now()));
    }

    /// Reads a recovery round on the ack session: the unpublished rows visible now and the WAL
    /// position after them, to be marked once the source confirmed that position on
    /// `instance`.
    async fn recover(&mut self, instance: &str) -> Result<(), LogicalError> {
        let mut conn = self.pool.acquire().await.map_err(MarkError::from)?;
        let on = slot::instance_of(&mut conn)
            .await
            .map_err(MarkError::from)?;
        if on != instance {
            // The pool reached another server than the source: the next start tries again.
            tracing::warn!(
                "row marks: the session is on another PostgreSQL instance than the stream; no recovery round"
            );
            self.recovery_due = None;
            return Ok(());
        }
        let (position, seqs) =
            table::unpublished_with_position(&mut conn, &self.table, RECOVERY_ROWS)
                .await
                .map_err(MarkError::from)?;
        self.recovery_due = None;
        tracing::debug!(rows = seqs.len(), position = %Lsn(position), "row marks: recovery round read");
        self.recovery = (!seqs.is_empty()).then_some(Recovery {
            position: Lsn(position),
            instance: on,
            seqs,
        });
        Ok(())
    }

    /// Forgets a recovery round not marked yet (a slot is created again: its re-publication
    /// reads and marks every unpublished row).
    pub(super) fn forget_recovery(&mut self) {
        self.recovery = None;
        self.recovery_due = None;
    }

    /// Collects a finished mark and starts the next one that is due: the recovery round once
    /// `confirmed` (on `instance`) reached its position; the recorded rows when `idle`, when
    /// [`SETTLE_ROWS`] wait or after [`SETTLE_DELAY`]; else reads a scheduled recovery round.
    pub(super) async fn poll(
        &mut self,
        confirmed: Lsn,
        instance: Option<&str>,
        idle: bool,
    ) -> Result<(), LogicalError> {
        if self.running.as_ref().is_some_and(JoinHandle::is_finished) {
            self.wait_running().await;
        }
        if self.running.is_some() || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        if let Some(r) = &self.recovery
            && instance == Some(r.instance.as_str())
            && confirmed >= r.position
        {
            let r = self.recovery.take().expect("checked above");
            let full = r.seqs.len() as i64 >= RECOVERY_ROWS;
            let keys = RowKeys {
                seqs: r.seqs,
                ids: Vec::new(),
            };
            self.start(Job {
                keys,
                instance: r.instance,
                recovery: true,
                full,
            });
            return Ok(());
        }
        let due = idle
            || self.unsettled_len() >= self.limits.rows
            || self.since.is_some_and(|s| s.elapsed() >= self.limits.delay);
        if due && !self.unsettled_is_empty() {
            let keys = std::mem::take(&mut self.unsettled);
            self.since = None;
            let instance = self.unsettled_instance.clone().unwrap_or_default();
            self.start(Job {
                keys,
                instance,
                recovery: false,
                full: false,
            });
            return Ok(());
        }
        if self.recovery.is_none()
            && let Some((on, since)) = &self.recovery_due
            && instance == Some(on.as_str())
            && (idle || since.elapsed() >= self.limits.delay)
        {
            let on = on.clone();
            if let Err(e) = self.recover(&on).await {
                tracing::warn!(error = %Report(&e), "row marks: reading a recovery round failed; retrying later");
                self.recovery_due = Some((on, Instant::now()));
            }
        }
        Ok(())
    }

    /// Marks every recorded row now and waits for it (a stop, a slot loss, a flush). A failure
    /// is returned; the rows stay recorded.
    pub(super) async fn flush(&mut self) -> Result<(), LogicalError> {
        self.wait_running().await;
        if self.unsettled_is_empty() {
            return Ok(());
        }
        let keys = std::mem::take(&mut self.unsettled);
        self.since = None;
        let job = Job {
            keys,
            instance: self.unsettled_instance.clone().unwrap_or_default(),
            recovery: false,
            full: false,
        };
        let (job, outcome) = run(
            self.pool.clone(),
            self.table.clone(),
            self.lease.clone(),
            job,
        )
        .await;
        if let Err(e) = outcome {
            self.requeue(job);
            return Err(e.into());
        }
        Ok(())
    }

    fn unsettled_len(&self) -> usize {
        self.unsettled.seqs.len() + self.unsettled.ids.len()
    }

    fn unsettled_is_empty(&self) -> bool {
        self.unsettled_len() == 0
    }

    fn start(&mut self, job: Job) {
        let (pool, table, lease) = (self.pool.clone(), self.table.clone(), self.lease.clone());
        self.running = Some(tokio::spawn(run(pool, table, lease, job)));
    }

    /// Waits for the running mark, if any, and settles its outcome: a failure is logged and its
    /// rows are kept for the next attempt.
    async fn wait_running(&mut self) {
        let Some(handle) = self.running.take() else {
            return;
        };
        match handle.await {
            Ok((job, Ok(rows))) => {
                tracing::debug!(
                    rows,
                    recovery = job.recovery,
                    "delivered rows marked published"
                );
                if job.recovery && job.full {
                    self.recovery_due = Some((job.instance, Instant::now()));
                }
            }
            Ok((job, Err(e))) => {
                tracing::warn!(error = %Report(&e), "marking delivered rows published failed; retrying in a second");
                self.retry_at = Some(Instant::now() + RETRY_PAUSE);
                if job.recovery {
                    self.recovery_due = Some((job.instance, Instant::now()));
                } else {
                    self.requeue(job);
                }
            }
            Err(e) => {
                // The rows are lost from memory: the next start's recovery round marks them.
                tracing::error!(error = %e, "the row mark task failed");
            }
        }
    }

    /// Puts a failed job's rows back in front of those recorded since.
    fn requeue(&mut self, job: Job) {
        if self
            .unsettled_instance
            .as_deref()
            .is_some_and(|i| i != job.instance)
        {
            return;
        }
        self.unsettled_instance = Some(job.instance);
        let mut keys = job.keys;
        keys.seqs.append(&mut self.unsettled.seqs);
        keys.ids.append(&mut self.unsettled.ids);
        self.unsettled = keys;
        self.since.get_or_insert_with(Instant::now);
    }
}

/// Marks `job`'s rows in statements of [`STATEMENT_ROWS`], on [`MARK_SESSIONS`] sessions of
/// `pool` at once (each taking a contiguous share of the rows), after checking that each
/// session is on the instance the rows came from.
async fn run(
    pool: PgPool,
    table: OutboxTable,
    lease: Option<Lease>,
    job: Job,
) -> (Job, Result<u64, MarkError>) {
    let share = job.keys.seqs.len().div_ceil(MARK_SESSIONS).max(1);
    let shares: Vec<&[i64]> = job.keys.seqs.chunks(share).collect();
    let outcome = futures::future::try_join_all((0..MARK_SESSIONS).map(|i| {
        let (pool, table, lease, job) = (&pool, &table, lease.as_ref(), &job);
        let seqs = shares.get(i).copied().unwrap_or_default();
        // The rows known by id only go with the first share.
        let ids = if i == 0 { job.keys.ids.as_slice() } else { &[] };
        async move {
            if seqs.is_empty() && ids.is_empty() {
                return Ok(0);
            }
            let mut conn = pool.acquire().await?;
            let on = slot::instance_of(&mut conn)
                .await
                .map_err(MarkError::Database)?;
            if on != job.instance {
                tracing::warn!(
                    rows = seqs.len() + ids.len(),
                    "row marks: PostgreSQL restarted or failed over since these rows were streamed; \
                     leaving them to the recovery round"
                );
                return Ok(0);
            }
            mark(&mut conn, table, lease, seqs, ids, job.recovery).await
        }
    }))
    .await
    .map(|rows| rows.into_iter().sum());
    (job, outcome)
}

async fn mark(
    conn: &mut PgConnection,
    table: &OutboxTable,
    lease: Option<&Lease>,
    seqs: &[i64],
    ids: &[uuid::Uuid],
    recovery: bool,
) -> Result<u64, MarkError> {
    let mut rows = 0;
    for chunk in seqs.chunks(STATEMENT_ROWS) {
        if let Some(lease) = lease {
            lease.check()?;
        }
        rows += if recovery {
            // Most of a recovery round's rows may be marked already: no wait for missing ones.
            table::mark_published(&mut *conn, table, table::Keys::Seqs(chunk)).await?
        } else {
            let keys = RowKeys {
                seqs: chunk.to_vec(),
                ids: Vec::new(),
            };
            acknowledge_keys(&mut *conn, table, RowAcknowledgement::Mark, &keys).await?
        };
    }
    for chunk in ids.chunks(STATEMENT_ROWS) {
        if let Some(lease) = lease {
            lease.check()?;
        }
        rows += table::mark_published(&mut *conn, table, table::Keys::Ids(chunk)).await?;
    }
    Ok(rows)
}
