//! Row acknowledgements of the `table` write mode, run beside the relay's pipeline: every batch of
//! the polling source, and the logical source's re-published rows and deletions (its streamed
//! rows are marked later, in bulk: `source::logical::settle`).
//!
//! Marking (or deleting) the rows of a delivered batch is the costliest statement of a drain: an
//! UPDATE that cannot be HOT, with new index entries and a full-row WAL record per row. Only what
//! comes *after* it depends on its result — the polling source must not claim those rows again,
//! the logical source must not confirm an LSN past rows it has not marked — so the statement runs
//! on a connection of its own while the relay claims, produces and awaits the next batches, and
//! each dependant waits for its completion instead of the whole pipeline.
//!
//! Guarantees of [`RowMarks`]:
//! - **Durable before released.** A submitted mark carries a tag (the `seq`s to stop excluding,
//!   the LSN to confirm); the tag is handed back only after the mark committed.
//! - **In order.** Tags come back in submission order, so an LSN is never confirmed ahead of an
//!   earlier batch's rows.
//! - **Bounded.** At most [`MAX_PENDING_ACKNOWLEDGEMENTS`] marks run at once (fewer with
//!   [`RowMarks::with_limit`]); a further submit waits for the oldest. After a crash, at most that many acknowledged batches are published again,
//!   besides the batches in flight.
//! - **Fenced.** With a lease, each statement runs only while the leader's lease holds.
//! - **Failures are loud and lose nothing.** A failed mark is returned by the next call; the marks
//!   still running are awaited first, and none of their tags is released, so those rows are
//!   claimed or streamed again (duplicates with stable ids, never a loss).

use std::collections::VecDeque;
use std::time::Duration;

use outbox_core::{OutboxTable, StoredEvent};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::config::RowAcknowledgement;
use crate::failure::ErrorKind;
use crate::leader::{Lease, LeaseLost};
use crate::source::SourceError;
use crate::table;

/// Planner settings of the sessions that run only the relay's own statements (the leader's, the
/// row acknowledgements'): claims and marks by `seq = ANY(…)` planned per call, so the array is
/// hashed, and kept ordered index scans even on a freshly filled table without statistics.
pub(crate) const RELAY_PLANNER_SETTINGS: [(&str, &str); 4] = [
    ("plan_cache_mode", "force_custom_plan"),
    ("enable_sort", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_seqscan", "off"),
];

/// Records in the table that `events` were published. Used by both sources in the `table`
/// write mode; idempotent.
///
/// Rows are found by `seq` (through the partial index of unpublished rows, or the unique `seq`
/// index when deleting), not by `id`: for a thousand random UUIDs the planner prefers a
/// sequential scan of the whole table, which made every acknowledgement cost as much as the
/// backlog is long. An event without a `seq` (not expected from a migrated table) is matched by
/// its id in a second statement.
pub async fn acknowledge_rows<'e>(
    conn: &mut PgConnection,
    table: &OutboxTable,
    how: RowAcknowledgement,
    events: impl IntoIterator<Item = &'e StoredEvent>,
) -> Result<u64, sqlx::Error> {
    acknowledge_keys(conn, table, how, &RowKeys::of(events)).await
}

/// How long an acknowledgement waits for rows it cannot see yet (see [`acknowledge_keys`]).
const VISIBILITY_WAIT: Duration = Duration::from_secs(3);

/// [`acknowledge_rows`] for rows already reduced to their keys.
///
/// A row the logical source received may not be visible yet: PostgreSQL flushes a commit record
/// (which the walsender may then decode and send) *before* the committing session makes the
/// transaction visible to others, and on a loaded machine that gap lasts milliseconds — long
/// enough for the relay to produce the event and come back to mark it. A mark that found no row
/// would leave it unpublished for good. So rows by `seq` that the statement did not reach are
/// looked for again, with growing pauses, for up to [`VISIBILITY_WAIT`]. Rows the look-up finds
/// are marked again before they count as found: a row already marked (re-delivered after a
/// failure) is skipped by that statement, and one that became visible after the first
/// statement's snapshot is marked by it. In `delete` mode an already deleted row looks like a
/// missing one, so re-delivered rows cost that wait once per batch.
pub(crate) async fn acknowledge_keys(
    conn: &mut PgConnection,
    table: &OutboxTable,
    how: RowAcknowledgement,
    keys: &RowKeys,
) -> Result<u64, sqlx::Error> {
    let mut affected = 0;
    let mut due = keys.seqs.clone();
    let deadline = std::time::Instant::now() + VISIBILITY_WAIT;
    let mut pause = Duration::from_millis(2);
    while !due.is_empty() {
        let missing: Vec<i64> = match how {
            RowAcknowledgement::Mark => {
                let n = table::mark_published(&mut *conn, table, table::Keys::Seqs(&due)).await?;
                affected += n;
                if n as usize == due.len() {
                    Vec::new()
                } else {
                    let missing = table::seqs_not_in_table(&mut *conn, table, &due).await?;
                    // Rows visible now were either marked already (re-delivered) or became
                    // visible after the UPDATE's snapshot: mark the latter before taking them
                    // for found (visibility only grows, so this statement sees them all).
                    let absent: std::collections::HashSet<i64> = missing.iter().copied().collect();
                    let visible: Vec<i64> = due
                        .iter()
                        .copied()
                        .filter(|s| !absent.contains(s))
                        .collect();
                    if !visible.is_empty() {
                        affected +=
                            table::mark_published(&mut *conn, table, table::Keys::Seqs(&visible))
                                .await?;
                    }
                    missing
                }
            }
            RowAcknowledgement::Delete => {
                let deleted = table::delete(&mut *conn, table, table::Keys::Seqs(&due)).await?;
                affected += deleted.len() as u64;
                if deleted.len() == due.len() {
                    Vec::new()
                } else {
                    let deleted: std::collections::HashSet<i64> = deleted.into_iter().collect();
                    due.iter()
                        .copied()
                        .filter(|s| !deleted.contains(s))
                        .collect()
                }
            }
        };
        if missing.is_empty() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            match how {
                RowAcknowledgement::Mark => tracing::warn!(
                    rows = missing.len(),
                    first_seq = missing[0],
                    "acknowledged rows not found in the outbox table (deleted by someone else?)"
                ),
                RowAcknowledgement::Delete => tracing::debug!(
                    rows = missing.len(),
                    "acknowledged rows already deleted (re-delivered after a failure)"
                ),
            }
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
        due = missing;
    }
    if !keys.ids.is_empty() {
        affected += match how {
            RowAcknowledgement::Mark => {
                table::mark_published(&mut *conn, table, table::Keys::Ids(&keys.ids)).await?
            }
            RowAcknowledgement::Delete => {
                table::delete(&mut *conn, table, table::Keys::Ids(&keys.ids))
                    .await?
                    .len() as u64
            }
        };
    }
    Ok(affected)
}

/// How many batches' row acknowledgements may run at once, beside the batches in flight.
pub const MAX_PENDING_ACKNOWLEDGEMENTS: usize = 2;

/// A lazily connected pool for [`RowMarks`]: [`MAX_PENDING_ACKNOWLEDGEMENTS`] sessions, planned
/// like the leader's session (`seq = ANY(…)` stays an index scan on a table without statistics).
pub fn pool(options: &PgConnectOptions) -> PgPool {
    pool_of(options, MAX_PENDING_ACKNOWLEDGEMENTS)
}

/// [`pool`] with `size` sessions (at least one), for several [`RowMarks`] to share: waiting
/// acquirers are served first come, first served, so a busy user of the pool cannot overtake
/// the others in the queue.
pub fn pool_of(options: &PgConnectOptions, size: usize) -> PgPool {
    let options = options
        .clone()
        .application_name("outbox-relay-ack")
        .options(RELAY_PLANNER_SETTINGS);
    PgPoolOptions::new()
        .max_connections(u32::try_from(size.max(1)).unwrap_or(u32::MAX))
        .connect_lazy_with(options)
}

/// Why a row acknowledgement failed.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    /// The statement failed.
    #[error("acknowledging rows in the outbox table")]
    Database(#[from] sqlx::Error),
    /// The leader's lease ran out before the statement could run.
    #[error("acknowledging rows in the outbox table")]
    Lease(#[from] LeaseLost),
    /// The background task ended without an answer (it panicked or was cancelled).
    #[error("acknowledging rows in the outbox table: the background task failed: {0}")]
    Task(&'static str),
}

impl MarkError {
    /// What kind of failure this is ([`crate::failure`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            MarkError::Database(_) | MarkError::Task(_) => ErrorKind::Unavailable,
            MarkError::Lease(_) => ErrorKind::LeaseLost,
        }
    }

    /// The same failure as a [`SourceError`] of `source_name`.
    pub fn into_source_error(self, source_name: &'static str) -> SourceError {
        SourceError::new(source_name, self.kind(), self)
    }
}

/// The keys of the rows to acknowledge: `seq` where known, the event id otherwise.
#[derive(Debug, Default)]
pub(crate) struct RowKeys {
    pub(crate) seqs: Vec<i64>,
    pub(crate) ids: Vec<Uuid>,
}

impl RowKeys {
    pub(crate) fn of<'e>(events: impl IntoIterator<Item = &'e StoredEvent>) -> Self {
        let mut keys = RowKeys::default();
        for e in events {
            match e.seq {
                Some(seq) => keys.seqs.push(seq),
                None => keys.ids.push(e.id),
            }
        }
        keys
    }
}

/// Row acknowledgements running in the background. See the [module docs](self).
#[derive(Debug)]
pub struct RowMarks<T> {
    pool: PgPool,
    table: OutboxTable,
    how: RowAcknowledgement,
    lease: Option<Lease>,
    /// Most marks running at once.
    limit: usize,
    /// Running marks, oldest first: each task's verdict arrives on its channel.
    pending: VecDeque<(oneshot::Receiver<Result<(), MarkError>>, T)>,
}

impl<T> RowMarks<T> {
    /// Acknowledges rows of `table` over connections of `pool` (give it at least
    /// [`MAX_PENDING_ACKNOWLEDGEMENTS`] connections), fenced by `lease` when one is given.
    pub fn new(
        pool: PgPool,
        table: OutboxTable,
        how: RowAcknowledgement,
        lease: Option<Lease>,
    ) -> Self {
        Self {
            pool,
            table,
            how,
            lease,
            limit: MAX_PENDING_ACKNOWLEDGEMENTS,
            pending: VecDeque::new(),
        }
    }

    /// Runs at most `limit` marks at once (between 1 and [`MAX_PENDING_ACKNOWLEDGEMENTS`]): the
    /// most connections of a shared pool these marks hold at a time.
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit.clamp(1, MAX_PENDING_ACKNOWLEDGEMENTS);
        self
    }

    /// Whether nothing is running.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Starts acknowledging the rows of `events`; `tag` comes back once they are durably
    /// acknowledged. Returns the tags of marks that completed meanwhile (waiting for the oldest
    /// when the limit of running marks is reached).
    pub async fn submit<'e>(
        &mut self,
        events: impl IntoIterator<Item = &'e StoredEvent>,
        tag: T,
    ) -> Result<Vec<T>, MarkError> {
        let mut done = Vec::new();
        while self.pending.len() >= self.limit {
            done.push(self.next_completed().await?);
        }
        let keys = RowKeys::of(events);
        let (pool, table, how, lease) = (
            self.pool.clone(),
            self.table.clone(),
            self.how,
            self.lease.clone(),
        );
        let (verdict, receiver) = oneshot::channel();
        tokio::spawn(async move {
            let outcome = async {
                let mut conn = pool.acquire().await?;
                if let Some(lease) = &lease {
                    lease.check()?;
                }
                acknowledge_keys(&mut conn, &table, how, &keys).await?;
                Ok(())
            }
            .await;
            let _ = verdict.send(outcome);
        });
        self.pending.push_back((receiver, tag));
        done.extend(self.completed().await?);
        Ok(done)
    }

    /// The tags of the marks that have completed, oldest first, without waiting for the others.
    pub async fn completed(&mut self) -> Result<Vec<T>, MarkError> {
        let mut done = Vec::new();
        while let Some((receiver, _)) = self.pending.front_mut() {
            let outcome = match receiver.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => break,
                Ok(outcome) => outcome,
                Err(oneshot::error::TryRecvError::Closed) => Err(ended()),
            };
            done.push(self.settle_oldest(outcome).await?);
        }
        Ok(done)
    }

    /// Waits until the oldest running mark completes and returns its tag; never returns while
    /// nothing runs. Cancel-safe: dropped before completion, it changes nothing.
    pub async fn next_completed(&mut self) -> Result<T, MarkError> {
        let Some((receiver, _)) = self.pending.front_mut() else {
            return std::future::pending().await;
        };
        let outcome = receiver.await.unwrap_or_else(|_| Err(ended()));
        self.settle_oldest(outcome).await
    }

    /// Waits for every running mark; their tags, oldest first.
    pub async fn finish(&mut self) -> Result<Vec<T>, MarkError> {
        let mut done = Vec::new();
        while !self.pending.is_empty() {
            done.push(self.next_completed().await?);
        }
        Ok(done)
    }

    /// Removes the oldest mark, whose verdict is `outcome`.
    async fn settle_oldest(&mut self, outcome: Result<(), MarkError>) -> Result<T, MarkError> {
        let Some((_, tag)) = self.pending.pop_front() else {
            return Err(MarkError::Task("no acknowledgement is running"));
        };
        match outcome {
            Ok(()) => Ok(tag),
            Err(e) => {
                // Nothing keeps running behind a reported failure; the later marks' rows stay
                // due (their tags are dropped), whatever their own outcome.
                while let Some((receiver, _)) = self.pending.pop_front() {
                    let _ = receiver.await;
                }
                Err(e)
            }
        }
    }
}

fn ended() -> MarkError {
    MarkError::Task("it ended without a verdict")
}
