//! Producer spans for every sink: [`Traced`] wraps the configured [`Sink`] when
//! [`crate::telemetry`] is on, starts one span per record handed to the sink, makes the record
//! carry that span's context as its `traceparent`, and ends the span with the record's
//! [`Outcome`]. The brokers' own code knows nothing of spans, so each broker's spans have the same
//! shape and the same parent.

use std::time::Duration;

use crate::route::OutboundRecord;
use crate::sink::{Fenced, Outcome, PendingBatch, Sink, SinkError, SinkKind};
use crate::telemetry::{ProducerSpans, RecordSpan};

/// A sink whose records get producer spans.
pub struct Traced {
    inner: Box<dyn Sink>,
    spans: ProducerSpans,
}

impl Traced {
    /// `inner` with producer spans when `enabled` (and the `otel` feature is built); `inner`
    /// itself, untouched, otherwise.
    pub fn wrap(inner: Box<dyn Sink>, enabled: bool) -> Box<dyn Sink> {
        let spans = ProducerSpans::new(enabled, inner.kind());
        if spans.is_enabled() {
            Box::new(Traced { inner, spans })
        } else {
            inner
        }
    }
}

/// A batch whose spans end when the broker's verdicts are in.
struct TracedBatch {
    inner: Box<dyn PendingBatch>,
    spans: Vec<Option<RecordSpan>>,
}

#[async_trait::async_trait]
impl PendingBatch for TracedBatch {
    fn rejected_now(&self) -> Vec<usize> {
        self.inner.rejected_now()
    }

    fn accepted(&self) -> Vec<usize> {
        self.inner.accepted()
    }

    async fn wait(self: Box<Self>) -> Vec<Outcome> {
        let TracedBatch { inner, spans } = *self;
        let outcomes = inner.wait().await;
        for (span, outcome) in spans.into_iter().zip(&outcomes) {
            if let Some(span) = span {
                span.end(outcome);
            }
        }
        outcomes
    }
}

#[async_trait::async_trait]
impl Sink for Traced {
    fn kind(&self) -> SinkKind {
        self.inner.kind()
    }

    async fn check_connection(&self) -> Result<(), SinkError> {
        self.inner.check_connection().await
    }

    async fn enqueue(&self, records: &[OutboundRecord]) -> Box<dyn PendingBatch> {
        let mut spans = Vec::with_capacity(records.len());
        let mut carried = Vec::with_capacity(records.len());
        for record in records {
            let span = self.spans.start_record(record);
            let mut record = record.clone();
            if let Some(span) = &span {
                span.carry(&mut record.headers);
            }
            spans.push(span);
            carried.push(record);
        }
        let inner = self.inner.enqueue(&carried).await;
        Box::new(TracedBatch { inner, spans })
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn delivery_timeout(&self) -> Duration {
        self.inner.delivery_timeout()
    }

    async fn recreate(&mut self) -> Result<(), SinkError> {
        self.inner.recreate().await
    }

    fn purge(&self) -> usize {
        self.inner.purge()
    }

    async fn fence(&self, wait: Duration) -> Fenced {
        self.inner.fence(wait).await
    }

    fn watch(
        &self,
        stats: std::sync::Arc<crate::stats::RelayStats>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, SinkError> {
        self.inner.watch(stats, shutdown)
    }
}
