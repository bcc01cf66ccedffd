//! Broker side: topics, the raw producer ceiling and the latency consumer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};

/// Partitions of every benchmark topic.
pub const PARTITIONS: i32 = 6;

/// Creates `topic` with [`PARTITIONS`] partitions.
pub async fn create_topic(bootstrap: &str, topic: &str) -> Result<()> {
    outbox_tests::broker::create_topic_on(bootstrap, topic, PARTITIONS).await
}

/// Counts delivery reports.
#[derive(Default)]
struct Counting {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The raw producer ceiling: `n` records shaped like the relay's (200-byte value, key over 1k
/// aggregates, the relay's id/CloudEvents headers), produced with the relay's producer settings;
/// returns the time from the first send to the last acknowledgement. With `warm_up`, one more
/// record is produced and acknowledged before the clock starts, so the producer's start-up (its
/// idempotent producer id, the partitions' leaders) is not counted: at a small `n` it would be
/// most of the time.
pub fn producer_ceiling(bootstrap: &str, topic: &str, n: u64, warm_up: bool) -> Result<Duration> {
    let mut settings = outbox_relay::RelayConfig::default().kafka;
    settings.bootstrap_servers = bootstrap.to_owned();
    let config = settings.client_config()?;
    let producer: BaseProducer<Counting> = config.create_with_context(Counting::default())?;
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("producer metadata")?;
    let payload = crate::db::payload_json("acct-0", 1).to_string();
    let time = chrono::Utc::now()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .into_bytes();
    if warm_up {
        producer
            .send(BaseRecord::to(topic).key("warm-up").payload(&payload))
            .map_err(|(e, _)| e)
            .context("producer ceiling: warm-up send")?;
        producer
            .flush(Duration::from_secs(30))
            .context("producer ceiling: warm-up flush")?;
    }
    let warm = u64::from(warm_up);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    for i in 0..n {
        let key = format!("acct-{}", i % crate::db::AGGREGATES);
        let id = uuid::Uuid::now_v7().to_string();
        let event_type = crate::db::EVENT_TYPES[(i % 4) as usize];
        let headers = OwnedHeaders::new_with_capacity(10)
            .insert(header("id", id.as_bytes()))
            .insert(header("eventType", event_type.as_bytes()))
            .insert(header("schemaVersion", b"1"))
            .insert(header("ce_specversion", b"1.0"))
            .insert(header("ce_id", id.as_bytes()))
            .insert(header("ce_source", b"/outbox/account"))
            .insert(header("ce_type", event_type.as_bytes()))
            .insert(header("ce_subject", key.as_bytes()))
            .insert(header("ce_time", &time))
            .insert(header("content-type", b"application/json"));
        let mut record = BaseRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(1));
                    if Instant::now() > deadline {
                        bail!("producer ceiling: queue stayed full past the deadline");
                    }
                }
                Err((e, _)) => bail!("producer ceiling: send failed: {e}"),
            }
        }
        if i % 1024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("producer ceiling: flush")?;
    let elapsed = started.elapsed();
    let failed = producer.context().failed.load(Ordering::Relaxed);
    let delivered = producer.context().delivered.load(Ordering::Relaxed);
    if failed > 0 || delivered != n + warm {
        bail!("producer ceiling: {delivered} delivered, {failed} failed of {n}");
    }
    Ok(elapsed)
}

fn header<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

/// The value of header `key` of `m` as text, if present and UTF-8.
fn text_header<'m>(m: &'m rdkafka::message::BorrowedMessage<'_>, key: &str) -> Option<&'m str> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)?
        .value
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// One record seen by the latency consumer.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// The event id (the `id` header).
    pub id: Option<uuid::Uuid>,
    /// The event's `created_at` (the `ce_time` header), Unix microseconds.
    pub created_us: i64,
    /// When the consumer received it, Unix microseconds.
    pub received_us: i64,
}

/// A consumer thread reading every partition of a topic from the beginning with
/// `fetch.wait.max.ms=10`, recording `ce_time` and the receive time of each record.
pub struct LatencyConsumer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<Vec<Seen>>>,
}

impl LatencyConsumer {
    /// Starts reading `topic` (which must exist); at most `limit` records are kept.
    pub fn start(bootstrap: &str, topic: &str, limit: usize) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", crate::db::unique("bench_latency"))
            .set("enable.auto.commit", "false")
            // 10 ms, not 1: a 1 ms wait makes ~1000 fetch requests a second, and Tansu's fetch
            // cost grows with what a partition holds, so on a slow machine the consumer fell
            // further behind the relay's acknowledgements every second of the window
            // (BENCHMARKS.md, "Latency: where the tail went").
            .set("fetch.wait.max.ms", "10")
            .set("fetch.min.bytes", "1")
            .set("fetch.error.backoff.ms", "5")
            .set("isolation.level", "read_uncommitted")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::with_capacity(limit.min(1 << 20));
            // Bounded by the stop flag (set by the caller, which itself runs with deadlines) and
            // by a hard cap of ten minutes.
            let hard_stop = Instant::now() + Duration::from_secs(600);
            while !s.load(Ordering::Relaxed) && Instant::now() < hard_stop {
                let Some(result) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let received_us = chrono::Utc::now().timestamp_micros();
                let Ok(m) = result else { continue };
                let created = text_header(&m, "ce_time")
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
                let id = text_header(&m, "id").and_then(|v| uuid::Uuid::parse_str(v).ok());
                if let Some(t) = created
                    && seen.len() < limit
                {
                    seen.push(Seen {
                        id,
                        created_us: t.timestamp_micros(),
                        received_us,
                    });
                }
                c.fetch_add(1, Ordering::Relaxed);
            }
            Ok(seen)
        });
        Ok(Self {
            stop,
            count,
            thread,
        })
    }

    /// Records received so far.
    pub fn received(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops the thread and returns what it saw.
    pub fn finish(self) -> Result<Vec<Seen>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("latency consumer panicked"))?
    }
}
