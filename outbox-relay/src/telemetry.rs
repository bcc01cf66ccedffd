//! OpenTelemetry producer spans (cargo feature `otel`, setting `telemetry.enabled`).
//!
//! With both on, every record the relay hands to its sink gets one span that follows the
//! OpenTelemetry messaging semantic conventions, whatever the broker:
//!
//! - name `send <destination>`, kind `PRODUCER`;
//! - `messaging.system` = the sink (`kafka`, `nats`, `rabbitmq`, `redis`),
//!   `messaging.operation.type = "send"`, `messaging.operation.name = "send"`,
//!   `messaging.destination.name` = the destination (topic, subject, routing key, stream),
//!   `messaging.message.id` = the event id;
//! - once the broker answered: for Kafka `messaging.destination.partition.id` and
//!   `messaging.kafka.offset`; for any broker, status `ERROR` with `error.type` (the broker's
//!   error name) when the record was not delivered.
//!
//! The span's parent is the W3C `traceparent` the service captured when it wrote the event (a
//! remote parent); an event written without one starts a new trace. The span lasts from the moment
//! the record is handed to the sink until the broker's verdict on its batch is in.
//!
//! **Which `traceparent` travels with the record.** Without the feature (or with
//! `telemetry.enabled = false`) the write-time value is forwarded unchanged. With producer spans
//! on, the record carries the *producer span's* context instead (as the broker's header, property
//! or field named `traceparent`): the OpenTelemetry messaging conventions make the send span the
//! message's creation context when there is no separate "create" span, and W3C Trace Context has
//! each participant that records a span pass on its own span id as the parent id. A consumer's
//! span is then a child of the relay's send span, which is itself a child of the write — one
//! unbroken trace from the business operation to the consumer.
//!
//! One implementation serves every sink: [`crate::sink::traced::Traced`] wraps the configured
//! sink when spans are on, so no broker's code deals with spans.
//!
//! Export: the `outbox-relay` binary installs a global tracer provider that batches spans to an
//! OTLP/HTTP (protobuf) collector — `telemetry.otlp_endpoint`, else the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (and the other `OTEL_EXPORTER_OTLP_*` variables), else
//! `http://localhost:4318` — with `service.name` = `telemetry.service_name`. An embedded relay
//! uses whatever global tracer provider the service installed (`opentelemetry::global`).
//! Sampling is the SDK's default, parent-based: an unsampled write-time context gives an
//! unsampled producer span.

use crate::config::{SinkKind, TelemetrySettings};
use crate::route::OutboundRecord;
use crate::sink::{DeliveryError, Outcome};

/// Installing the OTLP exporter failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up OpenTelemetry export: {0}")]
pub struct TelemetryError(String);

/// The installed tracer provider; [`TelemetryGuard::shutdown`] flushes what is still buffered.
#[derive(Debug)]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl TelemetryGuard {
    /// Exports the spans still buffered and stops the exporter. Blocks: call it outside the async
    /// runtime (or from a thread of its own).
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing OpenTelemetry spans at exit failed");
        }
    }
}

/// Installs the global tracer provider with an OTLP/HTTP exporter when `settings.enabled`;
/// `Ok(None)` when telemetry is off. Blocks (it builds a blocking HTTP client): call it outside
/// the async runtime, or from a thread of its own.
pub fn install(settings: &TelemetrySettings) -> Result<Option<TelemetryGuard>, TelemetryError> {
    if !settings.enabled {
        return Ok(None);
    }
    #[cfg(feature = "otel")]
    {
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary);
        let endpoint = settings.otlp_endpoint.trim().trim_end_matches('/');
        if !endpoint.is_empty() {
            let url = if endpoint.ends_with("/v1/traces") {
                endpoint.to_owned()
            } else {
                format!("{endpoint}/v1/traces")
            };
            builder = builder.with_endpoint(url);
        }
        let exporter = builder.build().map_err(|e| TelemetryError(e.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing::info!(
            endpoint = if endpoint.is_empty() {
                "(OTEL_EXPORTER_OTLP_ENDPOINT or default)"
            } else {
                endpoint
            },
            "exporting producer spans over OTLP/HTTP"
        );
        Ok(Some(TelemetryGuard { provider }))
    }
    #[cfg(not(feature = "otel"))]
    Err(TelemetryError(
        "this outbox-relay was built without the `otel` feature".into(),
    ))
}

/// Starts producer spans for one sink's records (a no-op unless the `otel` feature and
/// `telemetry.enabled` are both on).
#[derive(Clone)]
pub struct ProducerSpans {
    #[cfg(feature = "otel")]
    tracer: Option<std::sync::Arc<opentelemetry::global::BoxedTracer>>,
    /// The broker, as `messaging.system`.
    #[cfg(feature = "otel")]
    sink: SinkKind,
}

impl std::fmt::Debug for ProducerSpans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerSpans")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

/// The open producer span of one record.
pub struct RecordSpan {
    #[cfg(feature = "otel")]
    span: opentelemetry::global::BoxedSpan,
    #[cfg(feature = "otel")]
    sink: SinkKind,
    traceparent: String,
}

impl ProducerSpans {
    /// Spans of records sent to `sink`, from the global tracer provider when `enabled` (and the
    /// `otel` feature is built); otherwise none.
    pub fn new(enabled: bool, sink: SinkKind) -> Self {
        #[cfg(feature = "otel")]
        {
            Self {
                tracer: enabled
                    .then(|| std::sync::Arc::new(opentelemetry::global::tracer("outbox-relay"))),
                sink,
            }
        }
        #[cfg(not(feature = "otel"))]
        {
            let _ = (enabled, sink);
            Self {}
        }
    }

    /// Starts the span of `record` (parented to its `traceparent` header, identified by its `id`
    /// header), or `None` when spans are off.
    pub fn start_record(&self, record: &OutboundRecord) -> Option<RecordSpan> {
        if !self.is_enabled() {
            return None;
        }
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        self.start(&record.topic, header("id"), header("traceparent"))
    }

    /// Whether spans are created.
    pub fn is_enabled(&self) -> bool {
        #[cfg(feature = "otel")]
        {
            self.tracer.is_some()
        }
        #[cfg(not(feature = "otel"))]
        {
            false
        }
    }

    /// Starts the producer span of a record to `topic` carrying event `message_id`, as a child
    /// of `traceparent` (the write-time context) when there is one.
    fn start(
        &self,
        topic: &str,
        message_id: Option<&str>,
        traceparent: Option<&str>,
    ) -> Option<RecordSpan> {
        #[cfg(feature = "otel")]
        {
            use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
            use opentelemetry::{Context, KeyValue};
            let tracer = self.tracer.as_ref()?;
            let parent = match traceparent.and_then(parse_traceparent) {
                Some(remote) => Context::new().with_remote_span_context(remote),
                None => Context::new(),
            };
            let mut attributes = vec![
                KeyValue::new("messaging.system", self.sink.name()),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "send"),
                KeyValue::new("messaging.destination.name", topic.to_owned()),
            ];
            if let Some(id) = message_id {
                attributes.push(KeyValue::new("messaging.message.id", id.to_owned()));
            }
            let span = tracer
                .span_builder(format!("send {topic}"))
                .with_kind(SpanKind::Producer)
                .with_attributes(attributes)
                .start_with_context(tracer.as_ref(), &parent);
            use opentelemetry::trace::Span as _;
            let cx = span.span_context();
            let traceparent = if cx.is_valid() {
                format!(
                    "00-{}-{}-{:02x}",
                    cx.trace_id(),
                    cx.span_id(),
                    cx.trace_flags().to_u8()
                )
            } else {
                traceparent.unwrap_or_default().to_owned()
            };
            Some(RecordSpan {
                span,
                sink: self.sink,
                traceparent,
            })
        }
        #[cfg(not(feature = "otel"))]
        {
            let _ = (topic, message_id, traceparent);
            None
        }
    }
}

impl RecordSpan {
    /// The `traceparent` the record carries: the producer span's context.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// Puts the span's context into `headers` as the `traceparent` header (replacing the
    /// write-time one, or added when the event had none).
    pub fn carry(&self, headers: &mut Vec<(String, Vec<u8>)>) {
        let value = self.traceparent.as_bytes().to_vec();
        match headers.iter_mut().find(|(name, _)| name == "traceparent") {
            Some((_, v)) => *v = value,
            None => headers.push(("traceparent".to_owned(), value)),
        }
    }

    /// Ends the span with the broker's verdict.
    pub fn end<E: DeliveryError>(self, outcome: &Outcome<E>) {
        #[cfg(feature = "otel")]
        {
            use opentelemetry::KeyValue;
            use opentelemetry::trace::{Span as _, Status};
            let mut span = self.span;
            match outcome {
                Outcome::Delivered(d) if self.sink == SinkKind::Kafka => {
                    span.set_attribute(KeyValue::new(
                        "messaging.destination.partition.id",
                        d.partition.to_string(),
                    ));
                    span.set_attribute(KeyValue::new("messaging.kafka.offset", d.offset));
                }
                Outcome::Delivered(_) => {}
                Outcome::Rejected(e) | Outcome::Suspect(e) | Outcome::Failed(e) => {
                    span.set_attribute(KeyValue::new("error.type", e.kind()));
                    span.set_status(Status::error(e.to_string()));
                }
                Outcome::Held { .. } => {
                    span.set_attribute(KeyValue::new("error.type", "held"));
                    span.set_status(Status::error(
                        "not sent: held behind a rejected record of the same key",
                    ));
                }
            }
            span.end();
        }
        #[cfg(not(feature = "otel"))]
        let _ = outcome;
    }
}

/// A W3C `traceparent` as a remote span context (version 00 layout; later versions are read
/// by their first four fields, as the specification asks).
#[cfg(feature = "otel")]
fn parse_traceparent(value: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    if !outbox_core::is_valid_traceparent(value) {
        return None;
    }
    let mut parts = value.split('-');
    let _version = parts.next()?;
    let trace_id = TraceId::from_hex(parts.next()?).ok()?;
    let span_id = SpanId::from_hex(parts.next()?).ok()?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let cx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(
            cx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_sampled() && cx.is_remote());
        assert!(parse_traceparent("00-zz-00f067aa0ba902b7-01").is_none());
    }
}

#[cfg(test)]
mod span_tests {
    use super::*;
    #[cfg(feature = "otel")]
    use opentelemetry::trace::Tracer as _;

    #[test]
    fn spans_are_off_when_disabled() {
        let spans = ProducerSpans::new(false, SinkKind::Nats);
        assert!(!spans.is_enabled());
        let record = OutboundRecord {
            topic: "t".into(),
            key: "k".into(),
            payload: None,
            headers: vec![("id".into(), b"e-1".to_vec())],
            timestamp_ms: None,
        };
        assert!(spans.start_record(&record).is_none());
    }

    #[test]
    fn a_span_carries_its_context_in_place_of_the_written_one() {
        let span = RecordSpan {
            #[cfg(feature = "otel")]
            span: opentelemetry::global::tracer("test").start("t"),
            #[cfg(feature = "otel")]
            sink: SinkKind::Redis,
            traceparent: "00-c-d-01".into(),
        };
        let mut written = vec![
            ("id".to_owned(), b"e-1".to_vec()),
            ("traceparent".to_owned(), b"00-a-b-01".to_vec()),
        ];
        span.carry(&mut written);
        assert_eq!(
            written[1],
            ("traceparent".to_owned(), b"00-c-d-01".to_vec())
        );
        assert_eq!(written.len(), 2);
        let mut untraced = vec![("id".to_owned(), b"e-2".to_vec())];
        span.carry(&mut untraced);
        assert_eq!(
            untraced[1],
            ("traceparent".to_owned(), b"00-c-d-01".to_vec())
        );
    }
}
