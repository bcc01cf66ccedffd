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
//! ## Sharded
//!
//! With `shards` set, several relays poll the table, each only the rows of the shards it owns
//! ([`crate::shard`]; the claim is [`Claim::sharded`]). All of an aggregate's rows are in one
//! shard, so the order argument above holds per shard. The source reads the shards it may claim
//! from under the lock session's mutex, together with the claim, and reports which shards have
//! rows in flight: a shard the heartbeat drains is released only once none of its rows is in
//! flight any more — every claimed row acknowledged durably, or, after a rewind, the producer
//! replaced (the next claim, which the relay makes only after replacing it).
//!
//! ## Wake-ups
//!
//! The poll interval adapts ([`PollPace`]): right after a claim that found rows the next poll
//! follows within [`TIGHT_POLL`], and every empty poll doubles the wait, up to `poll_interval`.
//! While rows keep coming the relay therefore polls every few milliseconds, and an idle relay
//! polls once per `poll_interval`. Writers pay nothing for it: no trigger, no notification, so
//! their commits stay parallel (a notifying transaction commits one at a time with every other
//! one). Where the optional NOTIFY trigger is installed
//! ([`outbox_core::notify_trigger_sql`]) the source also `LISTEN`s and polls at once on a
//! notification.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::OutboxTable;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use std::collections::VecDeque;

use crate::config::RowAcknowledgement;
use crate::failure::{ErrorKind, Report};
use crate::leader::Leadership;
use crate::shard::Ownership;
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
    /// The longest wait between two polls when no notification arrives: where an idle source's
    /// waits end up ([`PollPace`]).
    pub poll_interval: Duration,
    /// Whether to `LISTEN` for the insert trigger's notifications.
    pub listen: bool,
}

/// The wait after a claim that found rows: how soon the next poll follows while rows keep coming.
pub const TIGHT_POLL: Duration = Duration::from_millis(2);

/// The adaptive wait between two empty polls: [`TIGHT_POLL`] after a claim that found rows,
/// doubled by every empty poll since, at most the configured `poll_interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollPace {
    next: Duration,
    longest: Duration,
}

impl PollPace {
    /// A pace that relaxes up to `longest`; it starts relaxed (an idle relay's first wait).
    pub fn new(longest: Duration) -> Self {
        Self {
            next: longest,
            longest,
        }
    }

    /// A claim found rows: the next empty poll waits only [`TIGHT_POLL`].
    pub fn tighten(&mut self) {
        self.next = TIGHT_POLL.min(self.longest);
    }

    /// A poll came back empty: how long to wait before the next one. The wait after that is
    /// twice as long, up to the poll interval.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = wait.saturating_mul(2).min(self.longest);
        wait
    }
}

/// Reads unpublished rows through the leader's session. See the [module docs](self).
pub struct PollingSource {
    leader: Leadership,
    listener: Option<Listening>,
    /// The wait before the next poll when a claim comes back empty.
    pace: PollPace,
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
    /// The shards this instance owns, when the table is sharded.
    ownership: Option<Arc<Ownership>>,
    /// The shard of every row in `in_flight` (sharded only).
    shard_of: HashMap<i64, u32>,
    /// Shards of rows dropped by a rewind: busy until the next claim, which comes only after the
    /// relay replaced the producer that may still hold their records.
    rewound: BTreeSet<u32>,
}

/// Where a polling source hears the insert trigger's notifications.
#[derive(Debug, Clone)]
pub enum Wakeups {
    /// A `LISTEN` session of the source's own (a single-table relay).
    Own,
    /// The relay's one `LISTEN` session, shared by the pipelines of all its tables
    /// ([`SharedListener`]).
    Shared(SharedListener),
}

/// What the source waits on between polls.
enum Listening {
    Own(PgListener),
    Shared(Arc<Notify>),
}

/// One `LISTEN` session for every table of a relay: each polling source subscribes to its
/// table's channel and is woken when a notification arrives on it. The session is opened on the
/// first subscription; after it is lost, `PgListener` reconnects and listens again on every
/// channel, and the sources poll on their own pace meanwhile (no notification is needed for
/// correctness, only for latency).
#[derive(Debug, Clone)]
pub struct SharedListener {
    inner: Arc<ListenerInner>,
}

#[derive(Debug)]
struct ListenerInner {
    /// By channel: the wake-up of the source that listens on it.
    channels: std::sync::Mutex<HashMap<String, std::sync::Weak<Notify>>>,
    /// Channels to `LISTEN` on, for the session's task.
    requests: tokio::sync::mpsc::UnboundedSender<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ListenerInner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SharedListener {
    /// Starts the listening task (it connects on the first subscription). Needs a Tokio runtime.
    pub fn start(options: &PgConnectOptions) -> Self {
        let (requests, mut asked) = tokio::sync::mpsc::unbounded_channel::<String>();
        let channels: std::sync::Mutex<HashMap<String, std::sync::Weak<Notify>>> =
            std::sync::Mutex::default();
        let pool = listen_pool(options);
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<ListenerInner>| {
            let weak = weak.clone();
            let task = tokio::spawn(async move {
                let Some(first) = asked.recv().await else {
                    return;
                };
                let mut listener = loop {
                    match PgListener::connect_with(&pool).await {
                        Ok(l) => break l,
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot open the shared notification listener yet; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                };
                let mut pending = vec![first];
                // A table that restarts its pipeline subscribes again to the same channel.
                let mut listening = std::collections::HashSet::new();
                loop {
                    for channel in pending.drain(..) {
                        if listening.contains(&channel) {
                            continue;
                        }
                        match listener.listen(&channel).await {
                            Ok(()) => {
                                listening.insert(channel);
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, channel, "LISTEN failed; the table is polled on its own pace");
                            }
                        }
                    }
                    tokio::select! {
                        channel = asked.recv() => match channel {
                            Some(c) => pending.push(c),
                            None => return,
                        },
                        n = listener.recv() => match n {
                            Ok(n) => {
                                let Some(inner) = weak.upgrade() else { return };
                                let wake = inner
                                    .channels
                                    .lock()
                                    .ok()
                                    .and_then(|c| c.get(n.channel()).and_then(std::sync::Weak::upgrade));
                                if let Some(wake) = wake {
                                    wake.notify_one();
                                }
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "the shared notification listener was interrupted; polling until it reconnects");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        },
                    }
                }
            });
            ListenerInner {
                channels,
                requests,
                task,
            }
        });
        Self { inner }
    }

    /// Wakes the returned handle whenever a notification arrives on `channel` (one source per
    /// channel: a second subscription replaces the first).
    fn subscribe(&self, channel: &str) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        if let Ok(mut channels) = self.inner.channels.lock() {
            channels.retain(|_, w| w.strong_count() > 0);
            channels.insert(channel.to_owned(), Arc::downgrade(&wake));
        }
        let _ = self.inner.requests.send(channel.to_owned());
        wake
    }
}

/// The one-connection pool a `LISTEN` session is opened from.
fn listen_pool(options: &PgConnectOptions) -> sqlx::PgPool {
    sqlx::pool::PoolOptions::<sqlx::Postgres>::new()
        .max_connections(1)
        .connect_lazy_with(options.clone().application_name("outbox-relay-listen"))
}

/// Where a polling source acknowledges its rows: a pool (its own, or one every table of the
/// relay shares) and how many of its connections the source may hold at once.
#[derive(Debug, Clone)]
pub struct MarkSessions {
    /// The pool.
    pub pool: sqlx::PgPool,
    /// Most acknowledgements of this source running at once (1 to
    /// [`crate::source::row_marks::MAX_PENDING_ACKNOWLEDGEMENTS`]).
    pub limit: usize,
}

impl PollingSource {
    /// A polling source that reads and acknowledges through `leader`'s lock-holding session and
    /// listens for wake-ups on a connection of its own.
    pub async fn new(
        settings: PollingSettings,
        leader: Leadership,
        options: &PgConnectOptions,
    ) -> Result<Self, SourceError> {
        let marks = MarkSessions {
            pool: crate::source::row_marks::pool(options),
            limit: crate::source::row_marks::MAX_PENDING_ACKNOWLEDGEMENTS,
        };
        Self::sharing(settings, leader, options, marks, &Wakeups::Own).await
    }

    /// A polling source that claims on `leader`'s lock-holding session, acknowledges on
    /// `marks` and hears notifications through `wakeups` (with `settings.listen`).
    pub async fn sharing(
        settings: PollingSettings,
        leader: Leadership,
        options: &PgConnectOptions,
        marks: MarkSessions,
        wakeups: &Wakeups,
    ) -> Result<Self, SourceError> {
        let listener = if settings.listen {
            // The channel of the table as resolved on the leader's session: the trigger names it
            // after the table it fires on, whatever spelling configured this relay.
            let channel = settings
                .table
                .resolve(&mut *leader.connection().await)
                .await
                .map_err(|error| SourceError::database("polling", error))?
                .notify_channel();
            match wakeups {
                Wakeups::Own => {
                    let mut listener = PgListener::connect_with(&listen_pool(options))
                        .await
                        .map_err(|error| SourceError::database("polling", error))?;
                    listener
                        .listen(&channel)
                        .await
                        .map_err(|error| SourceError::database("polling", error))?;
                    Some(Listening::Own(listener))
                }
                Wakeups::Shared(shared) => Some(Listening::Shared(shared.subscribe(&channel))),
            }
        } else {
            None
        };
        let ownership = leader.ownership();
        let claim = match &ownership {
            Some(own) => {
                let ready = crate::table::shard_index_ready(
                    &mut *leader.connection().await,
                    &settings.table,
                    own.count(),
                )
                .await
                .map_err(|error| SourceError::database("polling", error))?;
                if !ready {
                    tracing::warn!(
                        shards = own.count(),
                        "the shard index of the outbox table is missing: claims scan the unpublished rows of every shard; run `outbox-relay migrate` with the same `shards` setting"
                    );
                }
                Claim::sharded(&settings.table, own.count())
            }
            None => Claim::new(&settings.table),
        };
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
        if ownership.is_some() {
            // The sharded claim ends in a sort of at most a batch per shard; with sorts ruled
            // out above its estimated cost is huge, which would make every claim pay for JIT
            // compilation (about 100 ms) for a statement that runs in a few milliseconds.
            sqlx::query("SET jit = off")
                .execute(&mut *leader.connection().await)
                .await
                .map_err(|error| SourceError::database("polling", error))?;
        }
        let marks = RowMarks::new(
            marks.pool,
            settings.table.clone(),
            settings.acknowledgement,
            Some(leader.lease()),
        )
        .with_limit(marks.limit);
        Ok(Self {
            pace: PollPace::new(settings.poll_interval),
            leader,
            listener,
            claim,
            in_flight: VecDeque::new(),
            highest_claimed: 0,
            marks,
            max_batch_bytes: i64::MAX,
            mean_payload: 0,
            ownership,
            shard_of: HashMap::new(),
            rewound: BTreeSet::new(),
        })
    }

    /// Stops excluding rows whose acknowledgement is durable.
    fn release(&mut self, done: Vec<Vec<i64>>) {
        if done.is_empty() {
            return;
        }
        let done: std::collections::HashSet<i64> = done.into_iter().flatten().collect();
        self.in_flight.retain(|seq| !done.contains(seq));
        if self.ownership.is_some() {
            for seq in &done {
                self.shard_of.remove(seq);
            }
            self.report_busy();
        }
    }

    /// Tells the shard ownership which shards have rows in flight.
    fn report_busy(&self) {
        if let Some(own) = &self.ownership {
            let mut busy: BTreeSet<u32> = self.shard_of.values().copied().collect();
            busy.extend(self.rewound.iter().copied());
            own.set_busy(busy);
        }
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
        let read_error = |e| match e {
            ReadError::Database(error) => SourceError::database("polling", error),
            unreadable => SourceError::new("polling", ErrorKind::Contract, unreadable),
        };
        // Held until the claimed rows are registered as in flight: the heartbeat rebalances
        // the shards on this session, so it never releases a shard between the two.
        let mut session = self.leader.connection().await;
        let (batch, shards): (Vec<SourceEvent>, Vec<Option<u32>>) = match &self.ownership {
            None => self
                .claim
                .fetch(
                    &mut session,
                    max,
                    &in_flight,
                    self.max_batch_bytes,
                    self.highest_claimed,
                )
                .await
                .map_err(read_error)?
                .into_iter()
                .map(|decoded| (SourceEvent::decoded(decoded, Position::Row), None))
                .unzip(),
            Some(own) => {
                let owned = own.claimable();
                // The producer was replaced since any rewind: those shards are idle again.
                self.rewound.clear();
                let rows = if owned.is_empty() {
                    Vec::new()
                } else {
                    self.claim
                        .fetch_sharded(
                            &mut session,
                            max,
                            &in_flight,
                            self.max_batch_bytes,
                            self.highest_claimed,
                            &owned,
                        )
                        .await
                        .map_err(read_error)?
                };
                rows.into_iter()
                    .map(|row| {
                        (
                            SourceEvent::decoded(row.event, Position::Row),
                            Some(row.shard),
                        )
                    })
                    .unzip()
            }
        };
        if !batch.is_empty() {
            self.pace.tighten();
        }
        if !batch.is_empty() {
            let bytes: usize = batch
                .iter()
                .map(|e| e.event.payload.as_ref().map_or(0, String::len))
                .sum();
            self.mean_payload = bytes / batch.len();
        }
        for (e, shard) in batch.iter().zip(shards) {
            let seq = e.event.seq.unwrap_or_default();
            self.in_flight.push_back(seq);
            self.highest_claimed = self.highest_claimed.max(seq);
            if let Some(shard) = shard {
                self.shard_of.insert(seq, shard);
            }
        }
        self.report_busy();
        drop(session);
        Ok(batch)
    }

    async fn wait_for_wakeup(&mut self, shutdown: &CancellationToken) {
        let interval = self.pace.next_wait();
        match &mut self.listener {
            Some(Listening::Shared(wake)) => tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(interval) => {}
                _ = wake.notified() => {}
            },
            Some(Listening::Own(listener)) => tokio::select! {
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
        // Their shards stay busy until the next claim (after the producer is replaced).
        self.rewound
            .extend(self.shard_of.drain().map(|(_, shard)| shard));
        self.report_busy();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_tightens_on_rows_and_relaxes_to_the_poll_interval_when_idle() {
        let longest = Duration::from_millis(100);
        let mut pace = PollPace::new(longest);
        assert_eq!(pace.next_wait(), longest, "an idle relay starts relaxed");
        pace.tighten();
        let waits: Vec<Duration> = (0..8).map(|_| pace.next_wait()).collect();
        assert_eq!(
            waits,
            [2, 4, 8, 16, 32, 64, 100, 100].map(Duration::from_millis),
            "rows keep the next poll close; every empty poll doubles the wait, up to the interval"
        );
        pace.tighten();
        assert_eq!(pace.next_wait(), TIGHT_POLL);
    }

    #[test]
    fn a_poll_interval_below_the_tight_wait_is_kept() {
        let longest = Duration::from_millis(1);
        let mut pace = PollPace::new(longest);
        pace.tighten();
        assert_eq!(pace.next_wait(), longest);
        assert_eq!(pace.next_wait(), longest);
    }
}
