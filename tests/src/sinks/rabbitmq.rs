//! RabbitMQ as the guarantee suite drives it: the relay publishes to the exchange `outbox` with
//! the destination as routing key; [`prepare`] declares a durable queue named like the
//! destination and binds it for that routing key, and [`consume`] reads that queue back from
//! its start without taking anything off it (every message is left unacknowledged and requeued
//! in place when the reading channel closes), so a destination can be read back several times.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::broker::Consumed;

/// The exchange the relay publishes to (its default `rabbitmq.exchange`).
pub const EXCHANGE: &str = "outbox";

/// The header the relay puts the record key (aggregate id) in.
pub const KEY_HEADER: &str = "aggregateId";

/// How long an unused test queue lives on (RabbitMQ deletes it afterwards).
const QUEUE_EXPIRES_MS: i64 = 30 * 60 * 1000;

/// The broker's URL: `AMQP_URL` (set by `scripts/services.sh`), or the standard local port.
pub fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `OUTBOX_SINK` and the connection settings for a relay process.
pub fn relay_env() -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_SINK", "rabbitmq".to_owned()),
        ("OUTBOX_RABBITMQ__URL", url()),
        ("OUTBOX_RABBITMQ__EXCHANGE", EXCHANGE.to_owned()),
    ]
}

/// Settings under which the relay refuses, for good, every record whose body is larger than
/// `bytes`.
pub fn size_limit_env(bytes: usize) -> Vec<(&'static str, String)> {
    vec![("OUTBOX_RABBITMQ__MAX_MESSAGE_SIZE", bytes.to_string())]
}

async fn connect() -> Result<Connection> {
    Connection::connect(&url(), ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", redacted()))
}

fn redacted() -> String {
    outbox_relay::config::redact_url(&url())
}

/// Declares the exchange (durable, topic, as the relay does) and a durable queue named
/// `destination`, bound to it with `destination` as binding key.
pub async fn prepare(destination: &str) -> Result<()> {
    let connection = connect().await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_EXPIRES_MS));
    channel
        .queue_declare(
            destination.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            destination.into(),
            EXCHANGE.into(),
            destination.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    connection.close(200, "prepared".into()).await?;
    Ok(())
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Reads the queue `destination` from its start until at least `at_least` messages arrived and
/// then nothing new for `quiet`, or until `timeout`; in queue order, duplicates included, the
/// offset counting from 0 in that order. Nothing is taken off the queue.
pub async fn consume(
    destination: &str,
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    let connection = connect().await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(0, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            destination.into(),
            "outbox-tests-reader".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming queue {destination}"))?;
    let deadline = Instant::now() + timeout;
    let mut out: Vec<Consumed> = Vec::new();
    let mut last_new = Instant::now();
    loop {
        let now = Instant::now();
        if now >= deadline || (out.len() >= at_least && now.duration_since(last_new) >= quiet) {
            break;
        }
        let wait = if out.len() >= at_least {
            quiet.saturating_sub(now.duration_since(last_new))
        } else {
            deadline - now
        }
        .min(deadline - now);
        let Ok(next) = tokio::time::timeout(wait, consumer.next()).await else {
            continue;
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        let headers: BTreeMap<String, String> = delivery
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter_map(|(k, v)| text(v).map(|v| (k.as_str().to_owned(), v)))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Consumed {
            topic: destination.to_owned(),
            partition: 0,
            offset: out.len() as i64,
            key: headers.get(KEY_HEADER).cloned(),
            value: (!delivery.data.is_empty())
                .then(|| String::from_utf8_lossy(&delivery.data).into_owned()),
            headers,
            timestamp_ms: delivery
                .properties
                .timestamp()
                .and_then(|s| i64::try_from(s).ok())
                .map(|s| s * 1000),
        });
        last_new = Instant::now();
    }
    // Unacknowledged: closing the channel puts every message back where it was, but the broker
    // requeues them after it has answered the close; wait until they are ready again, or a read
    // right after this one would miss them or see them behind newer messages.
    drop(consumer);
    channel.close(200, "read".into()).await?;
    let channel = connection.create_channel().await?;
    let requeued_by = Instant::now() + timeout;
    loop {
        let ready = channel
            .queue_declare(
                destination.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("counting the messages of queue {destination}"))?
            .message_count();
        if ready as usize >= out.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < requeued_by,
            "queue {destination}: {} messages read but only {ready} back after {timeout:?}",
            out.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    connection.close(200, "read".into()).await?;
    Ok(out)
}
