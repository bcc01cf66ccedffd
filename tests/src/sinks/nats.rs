//! NATS JetStream for the end-to-end suite: the relay publishes each destination as a subject;
//! a test stream per destination captures it; reading back uses an ordered consumer filtered on
//! the subject, so records come in stream order (`offset` = stream sequence).
//!
//! The server is `NATS_URL` (written by `scripts/services.sh`), `nats://127.0.0.1:4222` when unset.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;

use crate::broker::Consumed;

/// The header the relay puts the record key (aggregate id) in.
pub const KEY_HEADER: &str = "Outbox-Key";

/// The server the tests use.
pub fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// `OUTBOX_SINK=nats` and the server's URL for a relay process.
pub fn relay_env() -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_SINK", "nats".to_owned()),
        ("OUTBOX_NATS_URL", url()),
        ("OUTBOX_NATS__DELIVERY_TIMEOUT", "10s".to_owned()),
    ]
}

/// A JetStream context on the test server.
pub async fn jetstream() -> Result<jetstream::Context> {
    jetstream_at(&url()).await
}

/// A JetStream context on the server at `url`.
pub async fn jetstream_at(url: &str) -> Result<jetstream::Context> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    Ok(jetstream::new(client))
}

/// The stream name the tests give `destination`'s stream.
pub fn stream_name(destination: &str) -> String {
    destination
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

/// Creates a file-backed stream capturing exactly `destination` (2 minutes of duplicate
/// window), unless a stream captures it already.
pub async fn prepare(destination: &str) -> Result<()> {
    prepare_limited(destination, None).await
}

/// [`prepare`] with the stream's `max_msg_size` set to `max_message_size` (a broker-side limit
/// the relay must treat as a refusal for good).
pub async fn prepare_limited(destination: &str, max_message_size: Option<i32>) -> Result<()> {
    prepare_at(&url(), destination, max_message_size).await
}

/// [`prepare_limited`] on the server at `url`.
pub async fn prepare_at(url: &str, destination: &str, max_message_size: Option<i32>) -> Result<()> {
    let js = jetstream_at(url).await?;
    if js.stream_by_subject(destination).await.is_ok() && max_message_size.is_none() {
        return Ok(());
    }
    js.create_or_update_stream(stream::Config {
        name: stream_name(destination),
        subjects: vec![destination.to_owned()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        max_message_size: max_message_size.unwrap_or(-1),
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating a stream for {destination}"))?;
    Ok(())
}

/// Reads `destination` from the start of its stream until at least `at_least` records arrived
/// and then nothing new for `quiet`, or until `timeout`; in stream order, duplicates included.
pub async fn consume(
    destination: &str,
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    consume_at(&url(), destination, at_least, quiet, timeout).await
}

/// [`consume`] from the server at `url`.
pub async fn consume_at(
    url: &str,
    destination: &str,
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    consume_from(
        &jetstream_at(url).await?,
        destination,
        at_least,
        quiet,
        timeout,
    )
    .await
}

/// [`consume`] through `js`, a JetStream context on a client the caller connected (with TLS or
/// credentials, say).
pub async fn consume_from(
    js: &jetstream::Context,
    destination: &str,
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    let name = js
        .stream_by_subject(destination)
        .await
        .with_context(|| format!("no stream captures {destination}"))?;
    let stream = js.get_stream(&name).await?;
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: destination.to_owned(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = reader.messages().await?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait = if out.len() >= at_least {
            quiet.min(deadline - now)
        } else {
            deadline - now
        };
        let message = match tokio::time::timeout(wait, messages.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(m)) => m?,
        };
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let offset = i64::try_from(info.stream_sequence)?;
        let timestamp_ms = i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).ok();
        let mut headers = BTreeMap::new();
        if let Some(h) = &message.headers {
            for (name, values) in h.iter() {
                if let Some(v) = values.last() {
                    headers.insert(name.to_string(), v.as_str().to_owned());
                }
            }
        }
        out.push(Consumed {
            topic: destination.to_owned(),
            partition: 0,
            offset,
            key: headers.get(KEY_HEADER).cloned(),
            value: Some(String::from_utf8_lossy(&message.payload).into_owned()),
            headers,
            timestamp_ms,
        });
    }
    Ok(out)
}
