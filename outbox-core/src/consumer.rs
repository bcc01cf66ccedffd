//! An rdkafka consumer loop that feeds an [`Inbox`] (cargo feature `kafka`).
//!
//! For every record, in partition order: decode → begin a transaction in the consumer's database →
//! record the event id in the inbox (a duplicate stops here) → run the [`EventHandler`] with the
//! open transaction → commit → **then** commit the Kafka offset. A crash between the database
//! commit and the offset commit redelivers the record, and the inbox recognises it; a crash before
//! the database commit leaves nothing behind, and the record is delivered again. So each event's
//! effects are applied exactly once, with at-least-once delivery underneath.
//!
//! Records that cannot be decoded are skipped or parked per the inbox's [`MalformedPolicy`]
//! (`crate::inbox::MalformedPolicy`), and the loop keeps going: a bad record never crashes the
//! consumer nor stalls its partition. A handler error is retried with backoff (the partition waits:
//! skipping ahead would apply a later event of the same aggregate first); after
//! [`ConsumerConfig::handler_attempts`] the record is parked or the consumer stops, per
//! [`HandlerFailurePolicy`]. A database outage is retried the same way and, when attempts run out,
//! stops the consumer with an error — it never parks anything.
//!
//! [`MalformedPolicy`]: crate::inbox::MalformedPolicy

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::event::DecodeEvent;
use crate::inbox::{Delivered, EventHandler, Inbox, InboxError, IncomingRecord, SequenceCheck};

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
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers.
    pub bootstrap_servers: String,
    /// Consumer group id; its committed offsets say where a restarted consumer resumes.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Extra librdkafka consumer properties. Offsets are always committed by the loop itself
    /// (`enable.auto.commit=false`), whatever is set here.
    pub properties: BTreeMap<String, String>,
    /// Attempts per record when the handler or the database fails (at least 1).
    pub handler_attempts: u32,
    /// Wait before the first retry; doubled per attempt, at most 5 s.
    pub retry_backoff: Duration,
    /// What happens when the attempts are used up by handler errors.
    pub on_handler_failure: HandlerFailurePolicy,
    /// Group subscription or all partitions.
    pub assignment: PartitionAssignment,
}

impl ConsumerConfig {
    /// Settings for group `group_id` reading `topics` from `bootstrap_servers`, from the earliest
    /// offset when the group has none, with 5 attempts and [`HandlerFailurePolicy::Stop`].
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
        }
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
/// Guarantee: an offset is committed to Kafka only after the record's outcome (applied, duplicate,
/// skipped, parked) is committed to the database, so no event is lost by a crash, and the inbox
/// makes every redelivery a no-op: effects exactly once per event id.
pub struct InboxConsumer<E, H> {
    config: ConsumerConfig,
    inbox: Inbox,
    pool: PgPool,
    handler: H,
    stats: Arc<ConsumerStats>,
    _event: PhantomData<fn() -> E>,
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

    fn client(&self) -> Result<StreamConsumer, ConsumerError> {
        if self.config.topics.is_empty() {
            return Err(ConsumerError::Config(ConfigError::NoTopics));
        }
        let mut cfg = ClientConfig::new();
        cfg.set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed");
        for (k, v) in &self.config.properties {
            cfg.set(k, v);
        }
        cfg.set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("group.id", &self.config.group_id)
            .set("enable.auto.commit", "false");
        Ok(cfg.create()?)
    }

    /// Consumes until `shutdown` is cancelled (then commits its position and returns `Ok`) or a
    /// fatal error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let consumer = self.client()?;
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
        tracing::info!(group = %self.config.group_id, topics = ?topics, inbox = %self.inbox.table(), "consumer started");
        let result = self.consume(&consumer, &shutdown).await;
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final offset commit failed; the inbox absorbs the redelivery")
            }
        }
        tracing::info!(group = %self.config.group_id, stats = ?self.stats.snapshot(), "consumer stopped");
        result
    }

    /// Every partition of the topics at the group's committed offsets; waits for topics that do
    /// not exist yet. `None` when shut down while waiting.
    async fn all_partitions(
        &self,
        consumer: &StreamConsumer,
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

    async fn consume(
        &self,
        consumer: &StreamConsumer,
        shutdown: &CancellationToken,
    ) -> Result<(), ConsumerError> {
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                m = consumer.recv() => m,
            };
            let message = match message {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(e) => {
                    if let Some(code) = e.rdkafka_error_code()
                        && is_fatal(code)
                    {
                        return Err(e.into());
                    }
                    tracing::warn!(error = %e, "kafka consumer error (retrying)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let record = incoming(&message);
            if !self.process(&record, shutdown).await? {
                return Ok(()); // shutting down in the middle of retries: not committed
            }
            // Only now, after the database commit, is the record's offset committed.
            if let Err(e) = consumer.commit_message(&message, CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit failed; the inbox absorbs the redelivery");
            }
        }
    }

    /// Delivers one record with retries; `Ok(false)` when shutdown interrupted the retries.
    async fn process(
        &self,
        record: &IncomingRecord,
        shutdown: &CancellationToken,
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
                        () = shutdown.cancelled() => return Ok(false),
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
