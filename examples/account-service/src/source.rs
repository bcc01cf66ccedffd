//! Where the projector's consumers read the account events from: one abstraction over the four
//! brokers the relay can publish to (`outbox-relay`'s sinks), so the query model and the legacy
//! list are written once and run unchanged on any of them.
//!
//! Every broker delivers the same thing, an [`IncomingRecord`] (destination, key, payload,
//! headers), which goes through the consumer's [`Inbox`] exactly as on Kafka: one transaction per
//! event in the consumer's database, the event id recorded (a redelivery is a no-op), the
//! per-aggregate sequence checked, the handler run, commit — and **only then** the broker is told
//! the record is done. A crash in between redelivers the record and the inbox absorbs it.
//!
//! How each broker is read, and why that keeps every aggregate's events in order:
//!
//! | sink | read through | position kept by | order |
//! |---|---|---|---|
//! | `kafka` | [`outbox_core::consumer::InboxConsumer`] (rdkafka), group = consumer group | committed offsets | per partition (key = aggregate id) |
//! | `nats` | a durable JetStream pull consumer `<group>_<destination>` filtered on the subject, explicit acks, at most one unacknowledged message | the consumer's ack floor | stream order; with one message in flight, a redelivery can never be overtaken |
//! | `rabbitmq` | a durable queue `<destination>.<group>` bound to the `outbox` topic exchange with the destination as routing key, single active consumer, manual acks | the queue | queue order; unacknowledged messages go back to their place when the consumer goes away |
//! | `redis` | `XREADGROUP` in the group `<group>` of the stream named like the destination, as the one consumer `projector`, `XACK` after the commit | the group's pending list and last id | stream order; a restarted consumer reads its own pending entries first |
//!
//! The mapping back onto a record follows the relay's sinks: NATS headers, AMQP headers and
//! Redis `h:<name>` fields carry the relay's headers (`id`, `eventType`,
//! `outbox-aggregate-seq`, …); the key comes from the `Outbox-Key` header (NATS), the
//! `aggregateId` header (RabbitMQ) or the `key` field (Redis). The record's offset is the stream
//! sequence (NATS), the delivery tag (RabbitMQ: only meaningful within one connection) or the
//! entry id's millisecond part with its sequence part as the partition (Redis).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use outbox_core::consumer::{
    ConsumerConfig, ConsumerStats, HandlerFailurePolicy, InboxConsumer, PartitionAssignment,
    StatsSnapshot,
};
use outbox_core::{
    DecodeEvent, Delivered, EventHandler, Inbox, InboxError, IncomingRecord, SequenceCheck,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The broker the relay publishes to and the consumers read from (the relay's `OUTBOX_SINK`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    /// Kafka (or any Kafka-protocol broker).
    #[default]
    Kafka,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ (AMQP 0-9-1).
    Rabbitmq,
    /// Redis Streams.
    Redis,
}

impl Sink {
    /// Every sink, Kafka first.
    pub const ALL: [Sink; 4] = [Sink::Kafka, Sink::Nats, Sink::Rabbitmq, Sink::Redis];

    /// The name the relay's `OUTBOX_SINK` and `--sink` use.
    pub fn name(self) -> &'static str {
        match self {
            Sink::Kafka => "kafka",
            Sink::Nats => "nats",
            Sink::Rabbitmq => "rabbitmq",
            Sink::Redis => "redis",
        }
    }
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The exchange the relay publishes to by default (`rabbitmq.exchange`).
pub const DEFAULT_EXCHANGE: &str = "outbox";
/// The header the NATS sink puts the key (aggregate id) in.
pub const NATS_KEY_HEADER: &str = "Outbox-Key";
/// The header the RabbitMQ sink puts the key (aggregate id) in.
pub const RABBITMQ_KEY_HEADER: &str = "aggregateId";
/// The consumer name the projector uses in each Redis consumer group. One name per group keeps
/// one pending list, which a restarted projector reads first, so nothing is overtaken.
pub const REDIS_CONSUMER: &str = "projector";

/// How long one wait for the next record may block, so that shutdown is noticed between
/// records without abandoning one the broker already handed over.
const POLL: Duration = Duration::from_secs(1);
/// How long a NATS message may stay unacknowledged before JetStream redelivers it (a projector
/// that died while applying it).
const NATS_ACK_WAIT: Duration = Duration::from_secs(10);
/// Messages RabbitMQ hands over ahead of the acknowledgements.
const RABBITMQ_PREFETCH: u16 = 32;
/// Entries one `XREADGROUP` returns at most.
const REDIS_BATCH: usize = 64;

/// Where the account events are read from, and how to reach that broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSource {
    /// Kafka: the bootstrap servers.
    Kafka {
        /// Bootstrap servers.
        bootstrap_servers: String,
    },
    /// NATS JetStream: the server URL. A stream must capture the destination (`outbox-relay
    /// topics ensure --sink nats`).
    Nats {
        /// `nats://host:port`.
        url: String,
    },
    /// RabbitMQ: the broker URL and the exchange the relay publishes to.
    Rabbitmq {
        /// `amqp://user:password@host:port/vhost`.
        url: String,
        /// The relay's exchange (`outbox` by default).
        exchange: String,
    },
    /// Redis Streams: the server URL.
    Redis {
        /// `redis://host:port`.
        url: String,
    },
}

/// Connection options of the binaries, one set for every sink (`--sink` picks which applies).
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The broker the relay publishes to and the consumers read from.
    #[arg(long, env = "ACCOUNT_SINK", value_enum, default_value_t = Sink::Kafka)]
    pub sink: Sink,
    /// Kafka bootstrap servers (`--sink kafka`).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// NATS server URL (`--sink nats`).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// RabbitMQ URL (`--sink rabbitmq`).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = true
    )]
    pub amqp_url: String,
    /// The exchange the relay publishes to (`--sink rabbitmq`).
    #[arg(long, default_value = DEFAULT_EXCHANGE)]
    pub rabbitmq_exchange: String,
    /// Redis URL (`--sink redis`).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
}

impl SourceArgs {
    /// The source `--sink` selects; fails when Kafka is selected without bootstrap servers.
    pub fn source(&self) -> Result<EventSource> {
        Ok(match self.sink {
            Sink::Kafka => EventSource::Kafka {
                bootstrap_servers: self.bootstrap_servers.clone().context(
                    "--sink kafka needs --bootstrap-servers (or KAFKA_BOOTSTRAP_SERVERS)",
                )?,
            },
            Sink::Nats => EventSource::Nats {
                url: self.nats_url.clone(),
            },
            Sink::Rabbitmq => EventSource::Rabbitmq {
                url: self.amqp_url.clone(),
                exchange: self.rabbitmq_exchange.clone(),
            },
            Sink::Redis => EventSource::Redis {
                url: self.redis_url.clone(),
            },
        })
    }
}

impl EventSource {
    /// Which sink this is.
    pub fn sink(&self) -> Sink {
        match self {
            EventSource::Kafka { .. } => Sink::Kafka,
            EventSource::Nats { .. } => Sink::Nats,
            EventSource::Rabbitmq { .. } => Sink::Rabbitmq,
            EventSource::Redis { .. } => Sink::Redis,
        }
    }

    /// The variables that point `outbox-relay` at this broker (`OUTBOX_SINK` and its URL).
    pub fn relay_env(&self) -> Vec<(&'static str, String)> {
        match self {
            EventSource::Kafka { bootstrap_servers } => vec![
                ("OUTBOX_SINK", "kafka".to_owned()),
                ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", bootstrap_servers.clone()),
            ],
            EventSource::Nats { url } => vec![
                ("OUTBOX_SINK", "nats".to_owned()),
                ("OUTBOX_NATS_URL", url.clone()),
            ],
            EventSource::Rabbitmq { url, exchange } => vec![
                ("OUTBOX_SINK", "rabbitmq".to_owned()),
                ("OUTBOX_RABBITMQ__URL", url.clone()),
                ("OUTBOX_RABBITMQ__EXCHANGE", exchange.clone()),
            ],
            EventSource::Redis { url } => vec![
                ("OUTBOX_SINK", "redis".to_owned()),
                ("OUTBOX_REDIS_URL", url.clone()),
            ],
        }
    }

    /// The variables that point `account-projector` at this broker.
    pub fn projector_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("ACCOUNT_SINK", self.sink().name().to_owned())];
        match self {
            EventSource::Kafka { bootstrap_servers } => {
                env.push(("KAFKA_BOOTSTRAP_SERVERS", bootstrap_servers.clone()))
            }
            EventSource::Nats { url } => env.push(("NATS_URL", url.clone())),
            EventSource::Rabbitmq { url, .. } => env.push(("AMQP_URL", url.clone())),
            EventSource::Redis { url } => env.push(("REDIS_URL", url.clone())),
        }
        env
    }

    /// Creates what the consumer groups `groups` need on `destination` before the relay
    /// publishes to it. Only RabbitMQ needs something: each group's queue, bound to the
    /// exchange (the relay stops on a message no queue takes). Idempotent.
    pub async fn prepare(&self, destination: &str, groups: &[&str]) -> Result<()> {
        if let EventSource::Rabbitmq { url, exchange } = self {
            let connection = amqp_connect(url).await?;
            for group in groups {
                let channel = connection.create_channel().await?;
                declare_queue(&channel, exchange, destination, group).await?;
                let _ = channel.close(200, "declared".into()).await;
            }
            let _ = connection.close(200, "prepared".into()).await;
        }
        Ok(())
    }

    /// Removes what the consumer groups `groups` left on the broker for `destination`: the
    /// RabbitMQ queues, the JetStream consumers, the Redis stream (with its groups). Kafka topics
    /// and JetStream streams are left alone.
    pub async fn remove(&self, destination: &str, groups: &[&str]) -> Result<()> {
        match self {
            EventSource::Kafka { .. } => {}
            EventSource::Nats { url } => {
                let js = nats_connect(url).await?;
                if let Ok(stream) = js.stream_by_subject(destination).await {
                    for group in groups {
                        let _ = js
                            .delete_consumer_from_stream(nats_durable(group, destination), &stream)
                            .await;
                    }
                }
            }
            EventSource::Rabbitmq { url, .. } => {
                let connection = amqp_connect(url).await?;
                let channel = connection.create_channel().await?;
                for group in groups {
                    channel
                        .queue_delete(
                            rabbitmq_queue(destination, group).as_str().into(),
                            lapin::options::QueueDeleteOptions::default(),
                        )
                        .await?;
                }
                let _ = connection.close(200, "removed".into()).await;
            }
            EventSource::Redis { url } => {
                let mut conn = redis_connect(url).await?;
                let _: i64 = redis::cmd("DEL")
                    .arg(destination)
                    .query_async(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }
}

/// The JetStream stream that captures `subject` on the server at `url`, if any.
pub async fn nats_stream_capturing(url: &str, subject: &str) -> Result<Option<String>> {
    let js = nats_connect(url).await?;
    Ok(js.stream_by_subject(subject).await.ok())
}

/// Deletes the JetStream stream `name` on the server at `url`.
pub async fn nats_delete_stream(url: &str, name: &str) -> Result<()> {
    let js = nats_connect(url).await?;
    js.delete_stream(name)
        .await
        .with_context(|| format!("deleting the stream {name}"))?;
    Ok(())
}

/// The JetStream durable consumer of `group` on `destination` (names allow no `.`).
pub fn nats_durable(group: &str, destination: &str) -> String {
    format!("{group}_{destination}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The RabbitMQ queue of `group` on `destination`.
pub fn rabbitmq_queue(destination: &str, group: &str) -> String {
    format!("{destination}.{group}")
}

/// Counters of a consumer, whichever broker it reads: the Kafka loop's own, or the same ones
/// kept by [`Consumer::run`] for the other brokers.
#[derive(Debug, Clone)]
pub struct SourceStats(StatsInner);

#[derive(Debug, Clone)]
enum StatsInner {
    Kafka(Arc<ConsumerStats>),
    Own(Arc<Counters>),
}

impl SourceStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        match &self.0 {
            StatsInner::Kafka(s) => s.snapshot(),
            StatsInner::Own(c) => c.snapshot(),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    applied: AtomicU64,
    duplicates: AtomicU64,
    malformed: AtomicU64,
    parked: AtomicU64,
    ignored: AtomicU64,
    gaps: AtomicU64,
    out_of_order: AtomicU64,
    retries: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> StatsSnapshot {
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
            _ => bump(&self.ignored),
        }
    }
}

/// One consumer: a consumer group on one destination, applying events `E` through `handler`
/// and `inbox` into the database behind `pool`.
pub struct Consumer<E, H> {
    source: EventSource,
    destination: String,
    group: String,
    inbox: Inbox,
    pool: PgPool,
    handler: H,
    stats: SourceStats,
    kafka: Option<InboxConsumer<E, H>>,
}

/// Delivery attempts per record when the handler or the database fails (as the Kafka loop).
const ATTEMPTS: u32 = 5;
/// Wait before the first retry, doubled per attempt, at most 5 s.
const BACKOFF: Duration = Duration::from_millis(100);

impl<E, H> Consumer<E, H>
where
    E: DecodeEvent + Send,
    H: EventHandler<E> + Clone,
{
    /// A consumer of `destination` on `source` in `group`. A handler that keeps failing parks
    /// the record (it names an event the model cannot place) rather than stall the aggregate.
    pub fn new(
        source: EventSource,
        destination: impl Into<String>,
        group: impl Into<String>,
        inbox: Inbox,
        pool: PgPool,
        handler: H,
    ) -> Self {
        let destination = destination.into();
        let group = group.into();
        let (kafka, stats) = match &source {
            EventSource::Kafka { bootstrap_servers } => {
                let mut c =
                    ConsumerConfig::new(bootstrap_servers.clone(), &group, [destination.clone()]);
                c.on_handler_failure = HandlerFailurePolicy::Park;
                c.handler_attempts = ATTEMPTS;
                c.retry_backoff = BACKOFF;
                // One projector instance per group: take every partition, no group join delays.
                c.assignment = PartitionAssignment::AllPartitions;
                let consumer = InboxConsumer::new(c, inbox.clone(), pool.clone(), handler.clone());
                let stats = SourceStats(StatsInner::Kafka(consumer.stats()));
                (Some(consumer), stats)
            }
            _ => (None, SourceStats(StatsInner::Own(Arc::default()))),
        };
        Self {
            source,
            destination,
            group,
            inbox,
            pool,
            handler,
            stats,
            kafka,
        }
    }

    /// Live counters.
    pub fn stats(&self) -> SourceStats {
        self.stats.clone()
    }

    /// Consumes until `shutdown` is cancelled (`Ok`) or a fatal error: the broker unreachable,
    /// the database failing for every attempt.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        if let Some(kafka) = self.kafka.take() {
            return kafka.run(shutdown).await.map_err(Into::into);
        }
        let StatsInner::Own(counters) = &self.stats.0 else {
            bail!("a Kafka consumer without its loop");
        };
        let counters = counters.clone();
        let Some(mut subscription) =
            Subscription::open(&self.source, &self.destination, &self.group, &shutdown).await?
        else {
            return Ok(());
        };
        tracing::info!(
            sink = %self.source.sink(), destination = %self.destination, group = %self.group,
            inbox = %self.inbox.table(), "consumer started"
        );
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            let received = match subscription.next().await {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => break Err(e),
            };
            match self.process(&received.record, &counters, &shutdown).await {
                Ok(true) => {}
                // Shut down in the middle of retries: not acknowledged, delivered again later.
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
            // Only now, after the database commit, is the broker told the record is done.
            if let Err(e) = subscription.ack(received.ack).await {
                break Err(e.context("acknowledging a record (the inbox absorbs its redelivery)"));
            }
        };
        subscription.close().await;
        tracing::info!(group = %self.group, stats = ?counters.snapshot(), "consumer stopped");
        result
    }

    /// Delivers one record through the inbox with retries; `Ok(false)` when shutdown
    /// interrupted the retries.
    async fn process(
        &self,
        record: &IncomingRecord,
        counters: &Counters,
        shutdown: &CancellationToken,
    ) -> Result<bool> {
        let mut backoff = BACKOFF;
        let mut attempt = 1;
        loop {
            match self.inbox.deliver(&self.pool, record, &self.handler).await {
                Ok(delivered) => {
                    counters.count(&delivered);
                    return Ok(true);
                }
                Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                    tracing::warn!(
                        destination = %record.topic, offset = record.offset, attempt, error = %e,
                        "delivery failed; retrying"
                    );
                    bump(&counters.retries);
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(false),
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e @ InboxError::Handler { .. }) => {
                    let reason = format!("handler failed after {ATTEMPTS} attempts: {e}");
                    let mut conn = self.pool.acquire().await?;
                    self.inbox.park(&mut conn, record, &reason).await?;
                    tracing::error!(destination = %record.topic, offset = record.offset, %reason, "record parked");
                    bump(&counters.parked);
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A record off a broker with what acknowledges it.
struct Received {
    record: IncomingRecord,
    ack: Ack,
}

enum Ack {
    Nats(Box<async_nats::jetstream::Message>),
    Rabbitmq(lapin::Acker),
    Redis(String),
}

/// An open subscription to one of the non-Kafka brokers.
enum Subscription {
    Nats {
        consumer: Box<
            async_nats::jetstream::consumer::Consumer<
                async_nats::jetstream::consumer::pull::Config,
            >,
        >,
    },
    Rabbitmq {
        connection: Box<lapin::Connection>,
        consumer: Box<lapin::Consumer>,
    },
    Redis {
        conn: redis::aio::MultiplexedConnection,
        stream: String,
        group: String,
        /// Whether this consumer's own pending entries (delivered to an earlier run, not
        /// acknowledged) have all been read again.
        history_done: bool,
        buffer: VecDeque<Received>,
    },
}

async fn nats_connect(url: &str) -> Result<async_nats::jetstream::Context> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    Ok(async_nats::jetstream::new(client))
}

async fn amqp_connect(url: &str) -> Result<lapin::Connection> {
    lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| {
            format!(
                "connecting to RabbitMQ at {}",
                url.split_once('@').map_or(url, |(_, host)| host)
            )
        })
}

async fn redis_connect(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).context("the Redis URL")?;
    // Replies to a blocking XREADGROUP take up to POLL: the client's 500 ms default is too short.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to Redis at {url}"))
}

/// Declares the relay's exchange (durable, topic, as the relay does) and `group`'s durable queue
/// on `destination`, bound with the destination as routing key. The queue has a single active
/// consumer: a second projector of the same group waits instead of taking messages out of order.
async fn declare_queue(
    channel: &lapin::Channel,
    exchange: &str,
    destination: &str,
    group: &str,
) -> Result<String> {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring the exchange {exchange}"))?;
    let queue = rabbitmq_queue(destination, group);
    let mut arguments = FieldTable::default();
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .with_context(|| format!("declaring the queue {queue}"))?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            destination.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding the queue {queue} to {exchange}"))?;
    Ok(queue)
}

impl Subscription {
    /// Subscribes; for NATS, waits for a stream to capture the destination (`None` when shut
    /// down meanwhile).
    async fn open(
        source: &EventSource,
        destination: &str,
        group: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>> {
        match source {
            EventSource::Kafka { .. } => bail!("Kafka is consumed by outbox-core's loop"),
            EventSource::Nats { url } => {
                use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
                let js = nats_connect(url).await?;
                let mut waited = 0_u32;
                let stream = loop {
                    match js.stream_by_subject(destination).await {
                        Ok(name) => break js.get_stream(name).await?,
                        Err(e) => {
                            if waited.is_multiple_of(20) {
                                tracing::warn!(
                                    %destination, error = %e,
                                    "waiting for a JetStream stream to capture the subject \
                                     (outbox-relay topics ensure --sink nats)"
                                );
                            }
                            waited += 1;
                            tokio::select! {
                                () = shutdown.cancelled() => return Ok(None),
                                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                            }
                        }
                    }
                };
                let name = nats_durable(group, destination);
                let consumer = stream
                    .get_or_create_consumer(
                        &name,
                        pull::Config {
                            durable_name: Some(name.clone()),
                            filter_subject: destination.to_owned(),
                            deliver_policy: DeliverPolicy::All,
                            ack_policy: AckPolicy::Explicit,
                            ack_wait: NATS_ACK_WAIT,
                            // One message in flight: a message whose projector died is
                            // redelivered before any later one is handed out.
                            max_ack_pending: 1,
                            ..Default::default()
                        },
                    )
                    .await
                    .with_context(|| format!("creating the JetStream consumer {name}"))?;
                Ok(Some(Subscription::Nats {
                    consumer: Box::new(consumer),
                }))
            }
            EventSource::Rabbitmq { url, exchange } => {
                use lapin::options::{BasicConsumeOptions, BasicQosOptions};
                let connection = amqp_connect(url).await?;
                let channel = connection.create_channel().await?;
                let queue = declare_queue(&channel, exchange, destination, group).await?;
                channel
                    .basic_qos(RABBITMQ_PREFETCH, BasicQosOptions::default())
                    .await?;
                let consumer = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "account-projector".into(),
                        BasicConsumeOptions::default(),
                        lapin::types::FieldTable::default(),
                    )
                    .await
                    .with_context(|| format!("consuming the queue {queue}"))?;
                Ok(Some(Subscription::Rabbitmq {
                    connection: Box::new(connection),
                    consumer: Box::new(consumer),
                }))
            }
            EventSource::Redis { url } => {
                let mut conn = redis_connect(url).await?;
                let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(destination)
                    .arg(group)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn)
                    .await;
                match created {
                    Ok(()) => {}
                    Err(e) if e.code() == Some("BUSYGROUP") => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("creating the consumer group {group} on {destination}")
                        });
                    }
                }
                Ok(Some(Subscription::Redis {
                    conn,
                    stream: destination.to_owned(),
                    group: group.to_owned(),
                    history_done: false,
                    buffer: VecDeque::new(),
                }))
            }
        }
    }

    /// The next record, waiting at most about [`POLL`]; `None` when nothing came.
    async fn next(&mut self) -> Result<Option<Received>> {
        match self {
            Subscription::Nats { consumer } => {
                let mut batch = consumer
                    .batch()
                    .max_messages(1)
                    .expires(POLL)
                    .messages()
                    .await
                    .context("requesting the next JetStream message")?;
                let Some(message) = batch.next().await else {
                    return Ok(None);
                };
                let message =
                    message.map_err(|e| anyhow::anyhow!("reading from JetStream: {e}"))?;
                let record = nats_record(&message)?;
                Ok(Some(Received {
                    record,
                    ack: Ack::Nats(Box::new(message)),
                }))
            }
            Subscription::Rabbitmq { consumer, .. } => {
                let Ok(next) = tokio::time::timeout(POLL, consumer.next()).await else {
                    return Ok(None);
                };
                let delivery = next
                    .context("the RabbitMQ consumer was cancelled by the broker")?
                    .context("reading from RabbitMQ")?;
                let record = rabbitmq_record(&delivery);
                Ok(Some(Received {
                    record,
                    ack: Ack::Rabbitmq(delivery.acker),
                }))
            }
            Subscription::Redis {
                conn,
                stream,
                group,
                history_done,
                buffer,
            } => {
                if let Some(r) = buffer.pop_front() {
                    return Ok(Some(r));
                }
                // First this consumer's own pending entries (from `0`), then new ones (`>`).
                let mut cmd = redis::cmd("XREADGROUP");
                cmd.arg("GROUP")
                    .arg(&*group)
                    .arg(REDIS_CONSUMER)
                    .arg("COUNT")
                    .arg(REDIS_BATCH);
                if *history_done {
                    cmd.arg("BLOCK").arg(POLL.as_millis() as u64);
                }
                cmd.arg("STREAMS")
                    .arg(&*stream)
                    .arg(if *history_done { ">" } else { "0" });
                let reply: Option<Vec<(String, Vec<RedisEntry>)>> = cmd
                    .query_async(conn)
                    .await
                    .with_context(|| format!("XREADGROUP on {stream}"))?;
                let entries: Vec<RedisEntry> = reply
                    .unwrap_or_default()
                    .into_iter()
                    .flat_map(|(_, entries)| entries)
                    .collect();
                if entries.is_empty() && !*history_done {
                    *history_done = true;
                }
                for (id, fields) in entries {
                    let record = redis_record(stream, &id, fields)?;
                    buffer.push_back(Received {
                        record,
                        ack: Ack::Redis(id),
                    });
                }
                Ok(buffer.pop_front())
            }
        }
    }

    /// Tells the broker the record is done.
    async fn ack(&mut self, ack: Ack) -> Result<()> {
        match (self, ack) {
            (Subscription::Nats { .. }, Ack::Nats(message)) => message
                .double_ack()
                .await
                .map_err(|e| anyhow::anyhow!("JetStream ack: {e}")),
            (Subscription::Rabbitmq { .. }, Ack::Rabbitmq(acker)) => {
                acker
                    .ack(lapin::options::BasicAckOptions::default())
                    .await
                    .context("RabbitMQ ack")?;
                Ok(())
            }
            (
                Subscription::Redis {
                    conn,
                    stream,
                    group,
                    ..
                },
                Ack::Redis(id),
            ) => {
                let _: i64 = redis::cmd("XACK")
                    .arg(&*stream)
                    .arg(&*group)
                    .arg(id)
                    .query_async(conn)
                    .await
                    .context("XACK")?;
                Ok(())
            }
            _ => bail!("an acknowledgement for another broker"),
        }
    }

    /// Closes the connection (RabbitMQ puts unacknowledged messages back in place).
    async fn close(self) {
        if let Subscription::Rabbitmq { connection, .. } = self {
            let _ = connection.close(200, "projector stopped".into()).await;
        }
    }
}

fn nats_record(message: &async_nats::jetstream::Message) -> Result<IncomingRecord> {
    let info = message
        .info()
        .map_err(|e| anyhow::anyhow!("a JetStream message without its metadata: {e}"))?;
    let offset = i64::try_from(info.stream_sequence).context("stream sequence")?;
    let mut headers = Vec::new();
    let mut key = None;
    if let Some(h) = &message.headers {
        for (name, values) in h.iter() {
            let name = name.to_string();
            for value in values {
                if name == NATS_KEY_HEADER {
                    key = Some(value.as_str().as_bytes().to_vec());
                }
                headers.push((name.clone(), Some(value.as_str().as_bytes().to_vec())));
            }
        }
    }
    Ok(IncomingRecord {
        topic: message.subject.to_string(),
        partition: 0,
        offset,
        key,
        payload: (!message.payload.is_empty()).then(|| message.payload.to_vec()),
        headers,
    })
}

fn rabbitmq_record(delivery: &lapin::message::Delivery) -> IncomingRecord {
    use lapin::types::AMQPValue;
    let mut headers = Vec::new();
    let mut key = None;
    if let Some(table) = delivery.properties.headers() {
        for (name, value) in table.inner() {
            let bytes = match value {
                AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
                AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
                _ => None,
            };
            if name.as_str() == RABBITMQ_KEY_HEADER {
                key.clone_from(&bytes);
            }
            headers.push((name.as_str().to_owned(), bytes));
        }
    }
    IncomingRecord {
        topic: delivery.routing_key.as_str().to_owned(),
        partition: 0,
        offset: i64::try_from(delivery.delivery_tag).unwrap_or(i64::MAX),
        key,
        payload: (!delivery.data.is_empty()).then(|| delivery.data.clone()),
        headers,
    }
}

/// An entry's fields, as `XREADGROUP` returns them.
type RedisFields = Vec<(Vec<u8>, Vec<u8>)>;
/// An entry: its id and fields.
type RedisEntry = (String, RedisFields);

fn redis_record(stream: &str, id: &str, fields: RedisFields) -> Result<IncomingRecord> {
    let (ms, seq) = id
        .split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse::<i64>().ok()?, seq.parse::<i32>().ok()?)))
        .with_context(|| format!("entry id `{id}` of {stream} is not <ms>-<seq>"))?;
    let mut record = IncomingRecord {
        topic: stream.to_owned(),
        partition: seq,
        offset: ms,
        ..IncomingRecord::default()
    };
    for (name, value) in fields {
        match name.as_slice() {
            b"key" => record.key = Some(value),
            b"value" => record.payload = Some(value),
            other => {
                if let Some(header) = other.strip_prefix(b"h:") {
                    record
                        .headers
                        .push((String::from_utf8_lossy(header).into_owned(), Some(value)));
                }
            }
        }
    }
    Ok(record)
}
