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
use outbox_core::OutboxTable;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgListener};
use tokio_util::sync::CancellationToken;

use std::collections::VecDeque;

use crate::config::RowAcknowledgement;
use crate::failure::{ErrorKind, Report};
use crate::leader::Leadership;
use crate::source::row_marks::{RELAY_PLANNER_SETTINGS, RowMarks};
use crate::source::{Position, Source, SourceError, SourceEvent};
use crate::table::{Claim, ReadError};

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
    claim: Claim,
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
        let claim = Claim::new(&settings.table);
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
            claim,
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
        let rows = self
            .claim
            .fetch(
                &mut *self.leader.connection().await,
                max,
                &in_flight,
                self.max_batch_bytes,
                self.highest_claimed,
            )
            .await
            .map_err(|e| match e {
                ReadError::Database(error) => SourceError::database("polling", error),
                unreadable => SourceError::new("polling", ErrorKind::Contract, unreadable),
            })?;
        let batch: Vec<SourceEvent> = rows
            .into_iter()
            .map(|decoded| SourceEvent::decoded(decoded, Position::Row))
            .collect();
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
}
