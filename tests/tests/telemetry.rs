//! OpenTelemetry producer spans (feature `otel`, `telemetry.enabled`), against the real broker:
//! one `PRODUCER` span per event, parented to the `traceparent` written with the event, with the
//! messaging attributes, and the record carrying the producer span's context.
//!
//! The spans are collected by an in-memory exporter installed as the global tracer provider (the
//! relay uses the global provider, as it does when embedded in a service).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry::Value;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use outbox_core::{NewEvent, Outbox};
use outbox_tests::*;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);

/// Keeps every exported span.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn string(span: &SpanData, key: &str) -> Option<String> {
    attribute(span, key).map(|v| v.as_str().into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_published_event_gets_one_producer_span_parented_to_its_write_time_trace()
-> Result<()> {
    let spans = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());

    let db = TestDb::migrated("otel").await?;
    let agg_type = unique("otel");
    let topic = format!("outbox.event.{agg_type}");
    create_topic(&topic, 2).await?;
    let mut config = relay_config(&db);
    config.telemetry.enabled = true;
    // A producer limit stands in for a broker that refuses large records (a failed send).
    config
        .kafka
        .properties
        .insert("message.max.bytes".into(), "20000".into());
    let relay = InProcessRelay::start(config)?;

    // Five events written inside five traces, one without trace context, one poison event.
    let mut written: HashMap<Uuid, (String, String)> = HashMap::new();
    let mut tx = db.pool.begin().await?;
    let mut events = Vec::new();
    let mut parents = Vec::new();
    for i in 0..5 {
        let trace_id = format!("{:032x}", Uuid::new_v4().as_u128());
        let span_id = format!("{:016x}", 0x1000 + i as u64);
        events.push(
            NewEvent::new(&agg_type, format!("a{i}"), "Traced", None)
                .with_traceparent(format!("00-{trace_id}-{span_id}-01")),
        );
        parents.push((trace_id, span_id));
    }
    events.push(NewEvent::new(&agg_type, "untraced", "Untraced", None));
    events.push(NewEvent::new(
        &agg_type,
        "poison",
        "TooLarge",
        Some(serde_json::json!({ "pad": "x".repeat(30_000) })),
    ));
    let ids = Outbox::default().publish_new(&mut tx, events).await?;
    tx.commit().await?;
    for (id, parent) in ids.iter().zip(parents) {
        written.insert(*id, parent);
    }
    let (untraced, poison) = (ids[5], ids[6]);

    wait_drained(&db.pool, LONG).await?;
    let records = consume(&[&topic], 6, Duration::from_millis(1500), LONG).await?;
    relay.stop().await?;
    provider.force_flush()?;

    let spans = spans.0.lock().unwrap().clone();
    let by_id = |id: Uuid| -> Vec<&SpanData> {
        spans
            .iter()
            .filter(|s| string(s, "messaging.message.id").as_deref() == Some(&id.to_string()))
            .collect()
    };
    assert_eq!(records.len(), 6, "{records:?}");
    for record in &records {
        let id = record.event_id();
        let found = by_id(id);
        assert_eq!(
            found.len(),
            1,
            "one producer span per event ({id}): {found:?}"
        );
        let span = found[0];
        assert_eq!(span.span_kind, SpanKind::Producer);
        assert_eq!(span.name, format!("send {topic}"));
        assert_eq!(string(span, "messaging.system").as_deref(), Some("kafka"));
        assert_eq!(
            string(span, "messaging.operation.type").as_deref(),
            Some("send")
        );
        assert_eq!(
            string(span, "messaging.destination.name").as_deref(),
            Some(topic.as_str())
        );
        assert_eq!(
            string(span, "messaging.destination.partition.id"),
            Some(record.partition.to_string()),
            "partition of {id}"
        );
        assert_eq!(
            attribute(span, "messaging.kafka.offset"),
            Some(Value::I64(record.offset)),
            "offset of {id}"
        );
        assert_eq!(span.status, Status::Unset);
        // The record carries the producer span's context.
        let cx = &span.span_context;
        assert_eq!(
            record.header("traceparent"),
            Some(format!("00-{}-{}-01", cx.trace_id(), cx.span_id()).as_str()),
            "traceparent header of {id}"
        );
        if id == untraced {
            assert_eq!(
                span.parent_span_id,
                opentelemetry::trace::SpanId::INVALID,
                "an event without trace context starts a trace"
            );
        } else {
            let (trace_id, span_id) = written.get(&id).context("a written event")?;
            assert_eq!(
                &cx.trace_id().to_string(),
                trace_id,
                "same trace as the write"
            );
            assert_eq!(
                &span.parent_span_id.to_string(),
                span_id,
                "parent = the write"
            );
            assert!(span.parent_span_is_remote);
        }
    }
    // The record the producer refused: one span, with an error status.
    let failed = by_id(poison);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        matches!(&failed[0].status, Status::Error { description } if description.to_lowercase().contains("too large")),
        "{:?}",
        failed[0].status
    );
    assert!(string(failed[0], "error.type").is_some());
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.span_kind == SpanKind::Producer)
            .count(),
        7,
        "no other producer spans"
    );
    Ok(())
}

/// The spans of a relay publishing to `sink`: one per event, `messaging.system` naming the
/// broker, parented to the write, and the span's context in the message as `traceparent`.
async fn spans_for_sink(sink: SinkUnderTest, system: &str) -> Result<()> {
    let spans = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());

    let db = TestDb::migrated(&format!("otel_{system}")).await?;
    let agg_type = unique(&format!("otel_{system}"));
    let destination = format!("outbox.event.{agg_type}");
    sink.prepare(&destination).await?;
    let mut env: Vec<(String, String)> = vec![("OUTBOX_DATABASE_URL".into(), db.url.clone())];
    env.extend(sink.relay_env().into_iter().map(|(k, v)| (k.to_owned(), v)));
    let (loaded, _) = outbox_relay::config::load::load(None, env, &[])?;
    let mut config = relay_config(&db);
    config.sink = loaded.sink;
    config.nats = loaded.nats;
    config.rabbitmq = loaded.rabbitmq;
    config.redis = loaded.redis;
    config.telemetry.enabled = true;
    let relay = InProcessRelay::start(config)?;

    let trace_id = format!("{:032x}", Uuid::new_v4().as_u128());
    let mut tx = db.pool.begin().await?;
    let events = vec![
        NewEvent::new(&agg_type, "a1", "Traced", None)
            .with_traceparent(format!("00-{trace_id}-00000000000000aa-01")),
        NewEvent::new(&agg_type, "a2", "Untraced", None),
    ];
    let ids = Outbox::default().publish_new(&mut tx, events).await?;
    tx.commit().await?;

    wait_drained(&db.pool, LONG).await?;
    let records = sink
        .consume(&destination, 2, Duration::from_millis(1500), LONG)
        .await?;
    relay.stop().await?;
    provider.force_flush()?;

    let spans = spans.0.lock().unwrap().clone();
    assert_eq!(records.len(), 2, "{records:?}");
    for record in &records {
        let id = record.event_id();
        let found: Vec<&SpanData> = spans
            .iter()
            .filter(|s| string(s, "messaging.message.id").as_deref() == Some(&id.to_string()))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one producer span per event ({id}): {found:?}"
        );
        let span = found[0];
        assert_eq!(span.span_kind, SpanKind::Producer);
        assert_eq!(span.name, format!("send {destination}"));
        assert_eq!(string(span, "messaging.system").as_deref(), Some(system));
        assert_eq!(
            string(span, "messaging.destination.name").as_deref(),
            Some(destination.as_str())
        );
        assert_eq!(span.status, Status::Unset);
        let cx = &span.span_context;
        assert_eq!(
            record.headers.get("traceparent").map(String::as_str),
            Some(format!("00-{}-{}-01", cx.trace_id(), cx.span_id()).as_str()),
            "the {system} message carries the producer span's context ({id})"
        );
        if id == ids[0] {
            assert_eq!(
                cx.trace_id().to_string(),
                trace_id,
                "same trace as the write"
            );
            assert_eq!(span.parent_span_id.to_string(), "00000000000000aa");
        } else {
            assert_eq!(span.parent_span_id, opentelemetry::trace::SpanId::INVALID);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_messages_get_producer_spans() -> Result<()> {
    spans_for_sink(SinkUnderTest::Nats, "nats").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_messages_get_producer_spans() -> Result<()> {
    spans_for_sink(SinkUnderTest::Rabbitmq, "rabbitmq").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_entries_get_producer_spans() -> Result<()> {
    spans_for_sink(SinkUnderTest::Redis, "redis").await
}
