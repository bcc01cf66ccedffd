//! An rdkafka consumer loop that feeds an [`Inbox`] (cargo feature `kafka`).
//!
//! For every record: decode → begin a transaction in the consumer's database → record the event
//! id in the inbox (a duplicate stops here) → run the [`EventHandler`] with the open transaction →
//! commit → **then** mark the record's offset as committable. A crash between the database commit
//! and the offset commit redelivers the record, and the inbox recognises it; a crash before the
//! database commit leaves nothing behind, and the record is delivered again. So each event's
//! effects are applied exactly once, with at-least-once delivery underneath.
//!
//! ## Partitions, concurrency and offsets
//!
//! Records of one partition are processed strictly one after another, in offset order (an
//! aggregate's events share a key, so a partition). Records of different partitions are processed
//! concurrently, up to [`ConsumerConfig::concurrency`] partitions at a time (default 1: one record
//! at a time, as before this setting existed). The concurrency lives in the consumer's task (no
//! threads are spawned for it): handlers of different partitions overlap while they wait on the
//! database, each on its own pooled connection, so the pool needs at least `concurrency`
//! connections.
//!
//! A partition's offset N+1 is committed only once the records up to N of that partition are
//! finished (applied, duplicate, skipped, parked) and their transactions committed; offsets are
//! committed in the background at most every [`OFFSET_COMMIT_INTERVAL`], on stop, and on
//! revocation. A partition whose records pile up (its handler is slow) is paused at the broker
//! until it catches up, so it never holds back the others.
//!
//! ## Failures
//!
//! Records that cannot be decoded are skipped or parked per the inbox's [`MalformedPolicy`]
//! (`crate::inbox::MalformedPolicy`), and the loop keeps going: a bad record never crashes the
//! consumer nor stalls its partition. A handler error is retried with backoff (the partition waits:
//! skipping ahead would apply a later event of the same aggregate first); after
//! [`ConsumerConfig::handler_attempts`] the record is parked or the consumer stops, per
//! [`HandlerFailurePolicy`]. A database outage is retried the same way and, when attempts run out,
//! stops the consumer with an error — it never parks anything. When one partition stops the
//! consumer, the other partitions finish the record they are on (a record waiting to be retried is
//! abandoned, uncommitted), the offsets of everything finished are committed, and
//! [`InboxConsumer::run`] returns the error.
//!
//! ## Rebalances
//!
//! With [`PartitionAssignment::Subscribe`], when the group takes partitions away, the consumer
//! commits what it finished on them (synchronously, inside the revocation), drops their buffered
//! records, and never commits an offset of theirs again: a record of a revoked partition that was
//! being processed at that moment still finishes its transaction, but its offset is not committed,
//! so the partition's new owner receives it again — and the inbox reports it as a duplicate. That
//! is the one redelivery a rebalance costs; the effects stay exactly once. A partition is never
//! processed twice at once by one consumer, even when it is revoked and assigned back while its
//! record is still running.
//!
//! ## Purging
//!
//! With [`ConsumerConfig::with_purge`], the consumer runs [`Inbox::purge_older_than`] when it
//! starts and then periodically, on its own connection, beside the records; a purge error is
//! logged and retried at the next period, never stopping the consumer.
//!
//! [`MalformedPolicy`]: crate::inbox::MalformedPolicy

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::DecodeEvent;
use crate::inbox::{
    Delivered, EventHandler, Inbox, InboxError, IncomingRecord, Recorded, SequenceCheck,
    decode_record,
};

/// How often, at most, the consumer commits the offsets of finished records while it runs (it
/// also commits on stop and on revocation). A crash redelivers at most this much finished work,
/// which the inbox recognises as duplicates.
pub const OFFSET_COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Records buffered for one partition before the consumer pauses fetching it (or twice the
/// batch size, when that is larger); fetching resumes when half of that is left.
const LANE_BUFFER: usize = 4096;

/// What happens to a record whose handler keeps failing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HandlerFailurePolicy {
    /// Stop the consumer with the error (its offset is not committed; a restart retries it).
    #[default]
    Stop,
    /// Park the record with the handler's error as the reason and go on.
    Park,
}

/// How an [`InboxConsumer`] gets its partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PartitionAssignment {
    /// Join the consumer group (`subscribe`): the group coordinator spreads the partitions over
    /// the group's instances and rebalances when instances come and go. Use this to scale out.
    #[default]
    Subscribe,
    /// Take every partition of the topics (`assign`), starting at the group's committed offsets
    /// (or the earliest offset). No group membership, no join or rebalance delays; offsets are
    /// still committed under the group id. For a single instance per group: two instances would
    /// both apply every record — harmless to the state (the inbox dedupes) but wasted work.
    /// Partitions added to a topic later are picked up only on restart.
    AllPartitions,
}

/// Settings of an [`InboxConsumer`].
///
/// Build it with [`ConsumerConfig::new`], then set fields or chain the `with_…` methods.
///
/// Changed: the struct is `#[non_exhaustive]` (settings were added: `concurrency`, `batch_size`,
/// `purge`), so it can no longer be written as a struct literal outside this crate; start from
/// [`ConsumerConfig::new`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers.
    pub bootstrap_servers: String,
    /// Consumer group id; its committed offsets say where a restarted consumer resumes.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Extra librdkafka consumer properties. Offsets are always committed by the loop itself
    /// (`enable.auto.commit=false`, `enable.auto.offset.store=false`), whatever is set here.
    pub properties: BTreeMap<String, String>,
    /// Attempts per record when the handler or the database fails (at least 1).
    pub handler_attempts: u32,
    /// Wait before the first retry; doubled per attempt, at most 5 s.
    pub retry_backoff: Duration,
    /// What happens when the attempts are used up by handler errors.
    pub on_handler_failure: HandlerFailurePolicy,
    /// Group subscription or all partitions.
    pub assignment: PartitionAssignment,
    /// How many partitions are processed at the same time (at least 1; default 1). Records of
    /// one partition are always processed one after another, whatever this says; the database
    /// pool needs at least this many connections. 1 keeps the consumer's historical behaviour
    /// (one record at a time), so handlers written for it cannot meet concurrent transactions
    /// of their own by surprise; raise it to the number of partitions one instance gets for
    /// throughput.
    pub concurrency: usize,
    /// Records of one partition applied in one database transaction (at least 1; default 1).
    /// Above 1 the handler opts in to seeing several events in one transaction: they commit
    /// together, and when one of them fails, the whole batch is rolled back and its records are
    /// delivered again one at a time, with the usual retries and failure policy. A batch is taken
    /// from what is already buffered for the partition; the consumer never waits to fill one.
    pub batch_size: usize,
    /// Periodic purge of this consumer's inbox rows by age (default: none).
    pub purge: Option<InboxPurge>,
}

/// When an [`InboxConsumer`] purges its inbox: rows applied more than `older_than` ago, every
/// `every` (see [`Inbox::purge_older_than`] for what a purge gives up and what it keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxPurge {
    /// Age beyond which applied-event rows are deleted; must exceed the broker's redelivery
    /// horizon (topic retention, offset resets, replays).
    pub older_than: Duration,
    /// Time between two purges (more than zero); the first runs when the consumer starts.
    pub every: Duration,
}

impl ConsumerConfig {
    /// Settings for group `group_id` reading `topics` from `bootstrap_servers`, from the earliest
    /// offset when the group has none, with 5 attempts, [`HandlerFailurePolicy::Stop`], one
    /// partition at a time, one record per transaction, and no purge.
    pub fn new(
        bootstrap_servers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            properties: BTreeMap::new(),
            handler_attempts: 5,
            retry_backoff: Duration::from_millis(100),
            on_handler_failure: HandlerFailurePolicy::Stop,
            assignment: PartitionAssignment::Subscribe,
            concurrency: 1,
            batch_size: 1,
            purge: None,
        }
    }

    /// Processes up to `partitions` partitions at the same time (see
    /// [`concurrency`](Self::concurrency)).
    #[must_use]
    pub fn with_concurrency(mut self, partitions: usize) -> Self {
        self.concurrency = partitions;
        self
    }

    /// Applies up to `records` records of one partition per transaction (see
    /// [`batch_size`](Self::batch_size)).
    #[must_use]
    pub fn with_batch_size(mut self, records: usize) -> Self {
        self.batch_size = records;
        self
    }

    /// Purges this consumer's inbox rows older than `older_than` when the consumer starts and
    /// then every `every` (see [`InboxPurge`]).
    #[must_use]
    pub fn with_purge(mut self, older_than: Duration, every: Duration) -> Self {
        self.purge = Some(InboxPurge { older_than, every });
        self
    }

    /// Sets the group subscription or all partitions.
    #[must_use]
    pub fn with_assignment(mut self, assignment: PartitionAssignment) -> Self {
        self.assignment = assignment;
        self
    }

    /// Sets the failure policy for records whose handler keeps failing.
    #[must_use]
    pub fn with_handler_failure(mut self, policy: HandlerFailurePolicy) -> Self {
        self.on_handler_failure = policy;
        self
    }

    /// Sets the attempts per record and the first retry's backoff.
    #[must_use]
    pub fn with_retries(mut self, attempts: u32, backoff: Duration) -> Self {
        self.handler_attempts = attempts;
        self.retry_backoff = backoff;
        self
    }

    /// Sets one extra librdkafka consumer property.
    #[must_use]
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.topics.is_empty() {
            return Err(ConfigError::NoTopics);
        }
        if self.concurrency == 0 {
            return Err(ConfigError::Invalid {
                key: "concurrency",
                reason: "must be at least 1",
            });
        }
        if self.batch_size == 0 {
            return Err(ConfigError::Invalid {
                key: "batch_size",
                reason: "must be at least 1",
            });
        }
        if let Some(purge) = &self.purge
            && purge.every.is_zero()
        {
            return Err(ConfigError::Invalid {
                key: "purge.every",
                reason: "must be more than zero",
            });
        }
        Ok(())
    }
}

/// Everything that stops an [`InboxConsumer`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The Kafka client could not be created or failed fatally.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The inbox failed and retrying did not help (database down, handler failing with the
    /// [`HandlerFailurePolicy::Stop`] policy). The record's offset was not committed.
    #[error(transparent)]
    Inbox(#[from] InboxError),
    /// The configuration is unusable.
    ///
    /// Changed: this used to carry a `String`; `error.to_string()` gives the same text.
    #[error("invalid consumer configuration: {0}")]
    Config(ConfigError),
}

/// Why an [`InboxConsumer`]'s configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// [`ConsumerConfig::topics`] is empty.
    #[error("no topics to consume")]
    NoTopics,
    /// A setting is out of range.
    #[error("`{key}` {reason}")]
    Invalid {
        /// The setting's field name in [`ConsumerConfig`].
        key: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A topic reports more partitions than an `i32` partition number can address.
    #[error("topic {topic} has too many partitions")]
    TooManyPartitions {
        /// The topic.
        topic: String,
    },
}

/// Counters of what a consumer did, shared while it runs.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    applied: AtomicU64,
    duplicates: AtomicU64,
    malformed: AtomicU64,
    parked: AtomicU64,
    ignored: AtomicU64,
    gaps: AtomicU64,
    out_of_order: AtomicU64,
    retries: AtomicU64,
    purged: AtomicU64,
    purges: AtomicU64,
}

/// A point-in-time copy of [`ConsumerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Events applied (handler committed).
    pub applied: u64,
    /// Redelivered events recognised by the inbox and not applied again.
    pub duplicates: u64,
    /// Records that could not be decoded (skipped or parked).
    pub malformed: u64,
    /// Records parked (malformed, or handler failing with the park policy).
    pub parked: u64,
    /// Records of event types the consumer ignores.
    pub ignored: u64,
    /// Applied events that skipped ahead in their aggregate's sequence.
    pub gaps: u64,
    /// Applied events that arrived after a later event of their aggregate.
    pub out_of_order: u64,
    /// Retried attempts (handler or database errors).
    pub retries: u64,
}

impl StatsSnapshot {
    /// Records consumed to a final outcome.
    pub fn records(&self) -> u64 {
        self.applied + self.duplicates + self.malformed + self.ignored
    }
}

impl ConsumerStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            applied: get(&self.applied),
            duplicates: get(&self.duplicates),
            malformed: get(&self.malformed),
            parked: get(&self.parked),
            ignored: get(&self.ignored),
            gaps: get(&self.gaps),
            out_of_order: get(&self.out_of_order),
            retries: get(&self.retries),
        }
    }

    /// Inbox rows deleted by the consumer's periodic purges (see [`ConsumerConfig::with_purge`]).
    pub fn purged_rows(&self) -> u64 {
        self.purged.load(Ordering::Relaxed)
    }

    /// Periodic purges completed without error.
    pub fn purge_runs(&self) -> u64 {
        self.purges.load(Ordering::Relaxed)
    }

    fn count(&self, delivered: &Delivered) {
        let bump = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        match delivered {
            Delivered::Applied { sequence, .. } => {
                bump(&self.applied);
                match sequence {
                    SequenceCheck::Gap { .. } => bump(&self.gaps),
                    SequenceCheck::OutOfOrder { .. } => bump(&self.out_of_order),
                    _ => {}
                }
            }
            Delivered::Duplicate { .. } => bump(&self.duplicates),
            Delivered::Malformed { parked, .. } => {
                bump(&self.malformed);
                if *parked {
                    bump(&self.parked);
                }
            }
            Delivered::Ignored { .. } => bump(&self.ignored),
        }
    }
}

/// A Kafka consumer that applies typed events `E` through an [`Inbox`] and an [`EventHandler`].
///
/// Guarantee: a partition's offset is committed to Kafka only after the outcome (applied,
/// duplicate, skipped, parked) of that record and of every earlier record of the partition is
/// committed to the database, so no event is lost by a crash, and the inbox makes every
/// redelivery a no-op: effects exactly once per event id. Records of one partition are applied in
/// offset order, one at a time; up to [`ConsumerConfig::concurrency`] partitions at once (see the
/// [module docs](self)).
pub struct InboxConsumer<E, H> {
    config: ConsumerConfig,
    inbox: Inbox,
    pool: PgPool,
    handler: H,
    stats: Arc<ConsumerStats>,
    _event: PhantomData<fn() -> E>,
}

/// A partition, by topic and number.
type PartitionKey = (String, i32);

/// What the consume loop and the rebalance callback share: which offsets may be committed.
#[derive(Debug, Default)]
struct Progress {
    /// Per partition, the offset to commit: every record before it is finished.
    done: HashMap<PartitionKey, i64>,
    /// Per partition, bumped on each revocation; work started under an older generation never
    /// records an offset.
    generation: HashMap<PartitionKey, u64>,
    /// Partitions revoked since the loop last looked.
    revoked: Vec<PartitionKey>,
    /// Partitions paused because their buffer is full.
    paused: HashSet<PartitionKey>,
}

impl Progress {
    fn generation(&self, key: &PartitionKey) -> u64 {
        self.generation.get(key).copied().unwrap_or(0)
    }

    /// Every finished offset, to commit.
    fn committable(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.done {
            // Only fails for a negative offset that is not a logical one; ours are positions.
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        tpl
    }
}

fn lock(progress: &Mutex<Progress>) -> MutexGuard<'_, Progress> {
    progress.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The rdkafka context: commits finished work of revoked partitions and fences them.
struct InboxContext {
    progress: Arc<Mutex<Progress>>,
}

impl ClientContext for InboxContext {}

impl ConsumerContext for InboxContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let mut commit = TopicPartitionList::new();
        let mut paused = TopicPartitionList::new();
        {
            let mut p = lock(&self.progress);
            for element in revoked.elements() {
                let key = (element.topic().to_owned(), element.partition());
                if let Some(next) = p.done.remove(&key) {
                    let _ = commit.add_partition_offset(&key.0, key.1, Offset::Offset(next));
                }
                if p.paused.remove(&key) {
                    paused.add_partition(&key.0, key.1);
                }
                *p.generation.entry(key.clone()).or_default() += 1;
                p.revoked.push(key);
            }
        }
        if paused.count() > 0
            && let Err(e) = consumer.resume(&paused)
        {
            tracing::debug!(error = %e, "resuming revoked partitions failed");
        }
        if commit.count() > 0 {
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => tracing::debug!(
                    partitions = commit.count(),
                    "committed finished work of revoked partitions"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "committing revoked partitions failed; the inbox absorbs the redelivery")
                }
            }
        }
        tracing::info!(partitions = revoked.count(), "partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                tracing::info!(partitions = assigned.count(), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; the inbox absorbs the redelivery");
        }
    }
}

/// One partition's records waiting in the consumer.
#[derive(Debug, Default)]
struct Lane {
    records: VecDeque<IncomingRecord>,
    /// A record (or batch) of this partition is being processed.
    busy: bool,
    /// The lane is in the queue of lanes ready to run.
    queued: bool,
}

/// What a lane's work did.
struct Finished {
    key: PartitionKey,
    generation: u64,
    /// The offset after the last record finished, if any finished.
    next: Option<i64>,
    /// An error that stops the consumer.
    error: Option<ConsumerError>,
}

impl<E, H> InboxConsumer<E, H>
where
    E: DecodeEvent + Send,
    H: EventHandler<E>,
{
    /// A consumer applying events to the database behind `pool` (which holds `inbox`'s tables;
    /// run [`Inbox::migrate`] first).
    pub fn new(config: ConsumerConfig, inbox: Inbox, pool: PgPool, handler: H) -> Self {
        Self {
            config,
            inbox,
            pool,
            handler,
            stats: Arc::default(),
            _event: PhantomData,
        }
    }

    /// Live counters; clone the `Arc` before [`run`](Self::run) to watch progress.
    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    fn client(
        &self,
        progress: Arc<Mutex<Progress>>,
    ) -> Result<StreamConsumer<InboxContext>, ConsumerError> {
        self.config.validate().map_err(ConsumerError::Config)?;
        let mut cfg = ClientConfig::new();
        cfg.set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed");
        for (k, v) in &self.config.properties {
            cfg.set(k, v);
        }
        cfg.set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("group.id", &self.config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        Ok(cfg.create_with_context(InboxContext { progress })?)
    }

    /// Consumes until `shutdown` is cancelled (then finishes the records in progress, commits
    /// the offsets of everything finished and returns `Ok`) or a fatal error (then the same,
    /// and returns the error).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let consumer = self.client(progress.clone())?;
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        match self.config.assignment {
            PartitionAssignment::Subscribe => consumer.subscribe(&topics)?,
            PartitionAssignment::AllPartitions => {
                let Some(assignment) = self.all_partitions(&consumer, &shutdown).await? else {
                    return Ok(());
                };
                consumer.assign(&assignment)?;
            }
        }
        tracing::info!(
            group = %self.config.group_id, topics = ?topics, inbox = %self.inbox.table(),
            concurrency = self.config.concurrency, batch_size = self.config.batch_size,
            "consumer started"
        );
        let purging = CancellationToken::new();
        let purge = self.config.purge.map(|settings| {
            tokio::spawn(purge_periodically(
                self.inbox.clone(),
                self.pool.clone(),
                settings,
                self.stats.clone(),
                purging.clone(),
            ))
        });
        let result = self.consume(&consumer, &progress, &shutdown).await;
        purging.cancel();
        if let Some(task) = purge {
            let _ = task.await;
        }
        let finished = lock(&progress).committable();
        if finished.count() > 0
            && let Err(e) = consumer.commit(&finished, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "final offset commit failed; the inbox absorbs the redelivery");
        }
        tracing::info!(group = %self.config.group_id, stats = ?self.stats.snapshot(), "consumer stopped");
        result
    }

    /// Every partition of the topics at the group's committed offsets; waits for topics that do
    /// not exist yet. `None` when shut down while waiting.
    async fn all_partitions(
        &self,
        consumer: &StreamConsumer<InboxContext>,
        shutdown: &CancellationToken,
    ) -> Result<Option<TopicPartitionList>, ConsumerError> {
        let mut tpl = TopicPartitionList::new();
        let mut waited = 0_u32;
        for topic in &self.config.topics {
            loop {
                // A short blocking metadata call, at start-up only.
                let partitions = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
                {
                    Ok(md) => md
                        .topics()
                        .first()
                        .map(|t| t.partitions().len())
                        .unwrap_or(0),
                    Err(e) => {
                        tracing::debug!(%topic, error = %e, "metadata request failed");
                        0
                    }
                };
                if partitions > 0 {
                    for p in 0..partitions {
                        let p = i32::try_from(p).map_err(|_| {
                            ConsumerError::Config(ConfigError::TooManyPartitions {
                                topic: topic.clone(),
                            })
                        })?;
                        tpl.add_partition_offset(topic, p, Offset::Stored)?;
                    }
                    break;
                }
                if waited.is_multiple_of(20) {
                    tracing::warn!(%topic, "waiting for the topic to exist");
                }
                waited += 1;
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
        Ok(Some(tpl))
    }

    /// The loop: receives records into per-partition lanes, runs up to `concurrency` lanes at a
    /// time, and commits finished offsets. Returns once stopping and nothing is in flight.
    async fn consume(
        &self,
        consumer: &StreamConsumer<InboxContext>,
        progress: &Mutex<Progress>,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        // Cancelled when the consumer stops: in-flight work finishes its record, retries give up.
        let stop = CancellationToken::new();
        let concurrency = self.config.concurrency.max(1);
        let batch = self.config.batch_size.max(1);
        let pause_at = LANE_BUFFER.max(batch * 2);
        let resume_at = pause_at / 2;
        let mut lanes: HashMap<PartitionKey, Lane> = HashMap::new();
        let mut ready: VecDeque<PartitionKey> = VecDeque::new();
        let mut in_flight = FuturesUnordered::new();
        let mut failure: Option<ConsumerError> = None;
        let mut stopping = false;
        let mut dirty = false;
        let mut last_commit = Instant::now();
        let mut receive_after = Instant::now();
        loop {
            forget_revoked(progress, &mut lanes);
            while !stopping && in_flight.len() < concurrency {
                let Some(key) = ready.pop_front() else { break };
                let Some(lane) = lanes.get_mut(&key) else {
                    continue;
                };
                lane.queued = false;
                if lane.busy || lane.records.is_empty() {
                    continue;
                }
                let take = lane.records.len().min(batch);
                let records: Vec<IncomingRecord> = lane.records.drain(..take).collect();
                lane.busy = true;
                if lane.records.len() <= resume_at {
                    let resumed = lock(progress).paused.remove(&key);
                    if resumed {
                        set_paused(consumer, &key, false);
                    }
                }
                let generation = lock(progress).generation(&key);
                in_flight.push(self.work(key, generation, records, &stop));
            }
            if stopping && in_flight.is_empty() {
                break;
            }
            let commit_at = last_commit + OFFSET_COMMIT_INTERVAL;
            let receiving = !stopping && Instant::now() >= receive_after;
            tokio::select! {
                biased;
                Some(finished) = in_flight.next(), if !in_flight.is_empty() => {
                    forget_revoked(progress, &mut lanes);
                    if let Some(next) = finished.next {
                        let mut p = lock(progress);
                        if p.generation(&finished.key) == finished.generation {
                            p.done.insert(finished.key.clone(), next);
                            dirty = true;
                        }
                    }
                    if let Some(error) = finished.error {
                        if !stopping {
                            tracing::error!(error = %error, topic = %finished.key.0, partition = finished.key.1, "stopping the consumer");
                        }
                        failure.get_or_insert(error);
                        stopping = true;
                        stop.cancel();
                    }
                    if let Some(lane) = lanes.get_mut(&finished.key) {
                        lane.busy = false;
                        if !lane.records.is_empty() && !lane.queued {
                            lane.queued = true;
                            ready.push_back(finished.key);
                        }
                    }
                }
                () = tokio::time::sleep_until(commit_at), if dirty && !stopping => {
                    forget_revoked(progress, &mut lanes);
                    let finished = lock(progress).committable();
                    if finished.count() > 0 && let Err(e) = consumer.commit(&finished, CommitMode::Async) {
                        tracing::warn!(error = %e, "offset commit failed; the inbox absorbs the redelivery");
                    }
                    dirty = false;
                    last_commit = Instant::now();
                }
                () = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    stop.cancel();
                }
                () = tokio::time::sleep_until(receive_after), if !stopping && !receiving => {}
                message = consumer.recv(), if receiving => {
                    // A revocation is handled inside `recv`: forget it before taking new records.
                    forget_revoked(progress, &mut lanes);
                    match message {
                        Ok(message) => {
                            let record = incoming(&message);
                            let key = (record.topic.clone(), record.partition);
                            let lane = lanes.entry(key.clone()).or_default();
                            lane.records.push_back(record);
                            if !lane.busy && !lane.queued {
                                lane.queued = true;
                                ready.push_back(key.clone());
                            }
                            if lane.records.len() >= pause_at && lock(progress).paused.insert(key.clone()) {
                                tracing::debug!(topic = %key.0, partition = key.1, "partition paused until its buffer drains");
                                set_paused(consumer, &key, true);
                            }
                        }
                        Err(KafkaError::PartitionEOF(_)) => {}
                        Err(e) => {
                            if let Some(code) = e.rdkafka_error_code()
                                && is_fatal(code)
                            {
                                failure.get_or_insert(e.into());
                                stopping = true;
                                stop.cancel();
                            } else {
                                tracing::warn!(error = %e, "kafka consumer error (retrying)");
                                receive_after = Instant::now() + Duration::from_millis(200);
                            }
                        }
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Processes `records` (consecutive records of one partition) in order: as one transaction
    /// when there are several and that succeeds, otherwise one at a time.
    async fn work(
        &self,
        key: PartitionKey,
        generation: u64,
        records: Vec<IncomingRecord>,
        stop: &CancellationToken,
    ) -> Finished {
        let mut finished = Finished {
            key,
            generation,
            next: None,
            error: None,
        };
        if records.len() > 1 {
            match self.deliver_batch(&records).await {
                Ok(Some(outcomes)) => {
                    for outcome in &outcomes {
                        self.stats.count(outcome);
                    }
                    finished.next = records.last().map(|r| r.offset + 1);
                    return finished;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(
                    topic = %finished.key.0, partition = finished.key.1, records = records.len(),
                    error = %e, "batch failed; delivering its records one at a time"
                ),
            }
        }
        for (i, record) in records.iter().enumerate() {
            if i > 0 && stop.is_cancelled() {
                break;
            }
            match self.process(record, stop).await {
                Ok(true) => finished.next = Some(record.offset + 1),
                Ok(false) => break, // stopping in the middle of retries: not committed
                Err(e) => {
                    finished.error = Some(e);
                    break;
                }
            }
        }
        finished
    }

    /// Applies several records in one transaction. `Ok(None)` when one of them is not a cleanly
    /// decodable event (the caller delivers them one at a time, with the malformed policy);
    /// `Err` when anything failed (nothing was committed).
    async fn deliver_batch(
        &self,
        records: &[IncomingRecord],
    ) -> Result<Option<Vec<Delivered>>, InboxError> {
        let mut decoded = Vec::with_capacity(records.len());
        for record in records {
            match decode_record::<E>(record) {
                Ok(event) => decoded.push(event),
                Err(_) => return Ok(None),
            }
        }
        let mut tx = self.pool.begin().await?;
        let mut outcomes = Vec::with_capacity(decoded.len());
        for (mut meta, event) in decoded {
            match self.inbox.record(&mut tx, &meta).await? {
                Recorded::Duplicate => outcomes.push(Delivered::Duplicate {
                    event_id: meta.event_id,
                }),
                Recorded::New(check) => {
                    meta.sequence = check;
                    if check.is_anomaly() {
                        tracing::warn!(
                            consumer = %self.inbox.consumer(), topic = %meta.topic,
                            aggregate_id = ?meta.aggregate_id, event_id = %meta.event_id,
                            sequence = ?check, "sequence anomaly"
                        );
                    }
                    let event_id = meta.event_id;
                    if let Err(source) = self.handler.handle(&mut tx, event, &meta).await {
                        return Err(InboxError::Handler {
                            event_id,
                            event_type: meta.event_type,
                            source,
                        });
                    }
                    outcomes.push(Delivered::Applied {
                        event_id,
                        sequence: check,
                    });
                }
            }
        }
        tx.commit().await?;
        Ok(Some(outcomes))
    }

    /// Delivers one record with retries; `Ok(false)` when stopping interrupted the retries.
    async fn process(
        &self,
        record: &IncomingRecord,
        stop: &CancellationToken,
    ) -> Result<bool, ConsumerError> {
        let attempts = self.config.handler_attempts.max(1);
        let mut backoff = self.config.retry_backoff;
        let mut attempt = 1;
        loop {
            match self.inbox.deliver(&self.pool, record, &self.handler).await {
                Ok(delivered) => {
                    self.stats.count(&delivered);
                    return Ok(true);
                }
                Err(e) if e.is_retryable() && attempt < attempts => {
                    tracing::warn!(
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        attempt, error = %e, "delivery failed; retrying"
                    );
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        () = stop.cancelled() => return Ok(false),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e @ InboxError::Handler { .. })
                    if self.config.on_handler_failure == HandlerFailurePolicy::Park =>
                {
                    let reason = format!("handler failed after {attempts} attempts: {e}");
                    let mut conn = self.pool.acquire().await.map_err(InboxError::from)?;
                    self.inbox.park(&mut conn, record, &reason).await?;
                    tracing::error!(
                        topic = %record.topic, partition = record.partition, offset = record.offset,
                        %reason, "record parked"
                    );
                    self.stats.parked.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Drops the buffered records of partitions revoked since the last look; work in flight on them
/// finishes, but its offsets no longer count (their generation moved on).
fn forget_revoked(progress: &Mutex<Progress>, lanes: &mut HashMap<PartitionKey, Lane>) {
    let revoked = std::mem::take(&mut lock(progress).revoked);
    for key in revoked {
        if let Entry::Occupied(mut lane) = lanes.entry(key) {
            if lane.get().busy {
                lane.get_mut().records.clear();
            } else {
                // Not busy: nothing references it (a stale entry in `ready` is skipped).
                lane.remove();
            }
        }
    }
}

fn set_paused(consumer: &StreamConsumer<InboxContext>, key: &PartitionKey, pause: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&key.0, key.1);
    let result = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = result {
        tracing::warn!(topic = %key.0, partition = key.1, pause, error = %e, "pausing or resuming a partition failed");
    }
}

/// Purges the inbox now and then every `settings.every`, until `cancel`.
async fn purge_periodically(
    inbox: Inbox,
    pool: PgPool,
    settings: InboxPurge,
    stats: Arc<ConsumerStats>,
    cancel: CancellationToken,
) {
    loop {
        let purge = async {
            let mut conn = pool.acquire().await?;
            inbox.purge_older_than(&mut conn, settings.older_than).await
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            result = purge => match result {
                Ok(deleted) => {
                    stats.purged.fetch_add(deleted, Ordering::Relaxed);
                    stats.purges.fetch_add(1, Ordering::Relaxed);
                    if deleted > 0 {
                        tracing::info!(consumer = %inbox.consumer(), deleted, "purged the inbox");
                    }
                }
                Err(e) => tracing::warn!(consumer = %inbox.consumer(), error = %e, "inbox purge failed; retrying at the next period"),
            },
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(settings.every) => {}
        }
    }
}

fn is_fatal(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fatal | C::InvalidArgument | C::UnknownGroup | C::GroupAuthorizationFailed
    )
}

fn incoming(message: &BorrowedMessage<'_>) -> IncomingRecord {
    let headers = message
        .headers()
        .map(|h| {
            h.iter()
                .map(|header| (header.key.to_owned(), header.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    IncomingRecord {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DecodeError;
    use crate::inbox::{EventMetadata, HandlerError, InboxTable};
    use sqlx::PgConnection;

    struct Never;

    impl DecodeEvent for Never {
        fn accepts(_: &str) -> bool {
            false
        }

        fn decode(event_type: &str, _: &[u8]) -> Result<Self, DecodeError> {
            Err(DecodeError::UnknownEventType {
                event_type: event_type.to_owned(),
                target: "Never",
            })
        }
    }

    struct Ignore;

    impl EventHandler<Never> for Ignore {
        async fn handle(
            &self,
            _: &mut PgConnection,
            _: Never,
            _: &EventMetadata,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn no_topics_is_a_typed_config_error() {
        let pool = PgPool::connect_lazy("postgres://localhost/unused").expect("lazy pool");
        let inbox = Inbox::new(InboxTable::default(), "test").expect("inbox");
        let config = ConsumerConfig::new("localhost:9092", "group", Vec::<String>::new());
        let consumer = InboxConsumer::new(config, inbox, pool, Ignore);
        match consumer.run(CancellationToken::new()).await {
            Err(ConsumerError::Config(error)) => {
                assert_eq!(error, ConfigError::NoTopics);
                assert_eq!(
                    ConsumerError::Config(error).to_string(),
                    "invalid consumer configuration: no topics to consume"
                );
            }
            other => panic!("expected Config(NoTopics), got {other:?}"),
        }
    }
}
