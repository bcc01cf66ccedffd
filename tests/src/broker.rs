//! The broker side of a test: creating topics and reading every record of them back.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::database::unique;
use crate::ledger::Ledger;
use crate::services::services;

/// Creates `topic` with `partitions` partitions (replication 1) on the test broker.
pub async fn create_topic(topic: &str, partitions: i32) -> Result<()> {
    create_topic_on(&services().bootstrap, topic, partitions).await
}

/// Creates `topic` with `partitions` partitions (replication 1) on the broker at `bootstrap`;
/// fails when the broker refuses it (an existing topic included).
pub async fn create_topic_on(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    Ok(())
}

/// A record read back from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key as UTF-8.
    pub key: Option<String>,
    /// Value as UTF-8.
    pub value: Option<String>,
    /// Headers (last value per name).
    pub headers: BTreeMap<String, String>,
    /// Record timestamp (ms).
    pub timestamp_ms: Option<i64>,
}

impl Consumed {
    /// The `id` header as a UUID.
    pub fn event_id(&self) -> Uuid {
        Uuid::parse_str(self.headers.get("id").expect("record has an id header"))
            .expect("id header is a uuid")
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Reads every record of `topics` from the beginning until at least `at_least` records have
/// arrived and then nothing new for `quiet`, or until `timeout`. Reads past `at_least` so that
/// duplicates are seen too.
pub async fn consume(
    topics: &[&str],
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    consume_from(&services().bootstrap, topics, at_least, quiet, timeout).await
}

/// [`consume`] from another cluster (e.g. librdkafka's mock cluster).
pub async fn consume_from(
    bootstrap: &str,
    topics: &[&str],
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    let bootstrap = bootstrap.to_owned();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        consume_blocking(&bootstrap, &topics, at_least, quiet, timeout)
    })
    .await?
}

/// [`consume_from`] until at least as many records as `ledger` has committed events were read.
pub async fn consume_committed(
    bootstrap: &str,
    topics: &[&str],
    ledger: &Ledger,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    consume_from(bootstrap, topics, ledger.committed.len(), quiet, timeout).await
}

fn consume_blocking(
    bootstrap: &str,
    topics: &[String],
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    let deadline = Instant::now() + timeout;
    // Wait for the topics to exist (the relay or the test creates them), then assign every
    // partition from the beginning.
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        loop {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
            let parts = md
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if parts > 0 {
                for p in 0..parts as i32 {
                    tpl.add_partition_offset(topic, p, Offset::Beginning)?;
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("topic {topic} never appeared");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut last_new = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for i in 0..h.count() {
                        let hh = h.get(i);
                        headers.insert(
                            hh.key.to_owned(),
                            hh.value
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default(),
                        );
                    }
                }
                out.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
                    headers,
                    timestamp_ms: m.timestamp().to_millis(),
                });
                last_new = Instant::now();
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "consumer error (retrying)");
            }
            None => {}
        }
        let now = Instant::now();
        if out.len() >= at_least && now.duration_since(last_new) >= quiet {
            return Ok(out);
        }
        if now > deadline {
            return Ok(out);
        }
    }
}
