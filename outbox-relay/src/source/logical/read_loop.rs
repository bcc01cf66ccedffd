//! The read loop: [`LogicalSource::next_batch_inner`] hands the relay a re-publication's pages,
//! then decoded transactions from the replication session, restarting a broken session once in
//! place; and the [`Source`] implementation around it.
//!
//! Guarantee: a re-published row precedes every streamed event (nothing is streamed before the
//! re-publication was read to the end), and a session is replaced only when nothing returned is
//! unacknowledged, so a restart loses nothing.

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{LogicalError, LogicalSource, stream};
use crate::failure::Report;
use crate::source::{Source, SourceError, SourceEvent};

impl LogicalSource {
    /// Wait for the next replication event (or a timer) and apply it.
    async fn step(&mut self, shutdown: &CancellationToken) -> Result<bool, LogicalError> {
        // Nothing is handed on while this waits: deferred row marks may start now.
        self.poll_settle().await?;
        let deadline = self.next_heartbeat.min(self.next_slot_check);
        let finishing = self.finishing_a_transaction();
        let Some(session) = self.session.as_mut() else {
            return Err(LogicalError::Replication("no replication session".into()));
        };
        let marks = self.marks.as_mut();
        let marking = marks.as_ref().is_some_and(|m| !m.is_empty());
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !finishing => Ok(true),
            // A row acknowledgement became durable: its LSN may be confirmed now, not only when
            // the next event arrives.
            done = async { marks.expect("marking").next_completed().await }, if marking => {
                if let Some(lsn) = done? {
                    self.confirm(lsn);
                }
                Ok(false)
            }
            r = session.recv() => {
                match r {
                    Ok(Some(ev)) => self.handle(ev).map(|_| false),
                    Ok(None) => Err(LogicalError::Replication("replication stream ended".into())),
                    Err(e) => Err(stream::classify(&self.cfg.slot, e)),
                }
            }
            _ = tokio::time::sleep_until(deadline) => self.heartbeat_or_check().await.map(|_| false),
        }
    }

    async fn next_batch_inner(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SourceEvent>, LogicalError> {
        if self.stopped {
            return Ok(Vec::new());
        }
        self.release_marks(false).await?;
        if self.republication.is_some() {
            // Re-publication from the table: one page at a time, the next only once the previous
            // one was handed on; nothing is streamed before the table was read to the end.
            if self.ready.is_empty() && self.republishing() {
                if shutdown.is_cancelled() {
                    self.close().await?;
                    return Ok(Vec::new());
                }
                self.next_page(max).await?;
            }
            if !self.ready.is_empty() {
                return Ok(self.take_batch(max));
            }
        }
        if self.session.is_none() {
            if self.stream_deferred && shutdown.is_cancelled() {
                self.close().await?;
                return Ok(Vec::new());
            }
            if self.stream_deferred {
                // The re-publication was read to the end (and everything returned is
                // acknowledged: the relay calls next_batch only then): stream from the slot.
                self.stream_deferred = false;
                self.start_session().await?;
            } else {
                self.restart().await?;
            }
        }
        // The relay calls next_batch only once everything returned before was acknowledged or
        // rewound, so a broken session can be replaced here without losing anything: one
        // in-place restart per call (a lost slot is detected and, in table mode, recovered by
        // it), then errors go to the relay.
        let mut restarted = false;
        while self.ready.is_empty() {
            match self.step(shutdown).await {
                Ok(true) => {
                    self.close().await?;
                    return Ok(Vec::new());
                }
                Ok(false) => {}
                Err(e) if !restarted && self.inflight.is_empty() && self.restartable(&e) => {
                    tracing::warn!(error = %Report(&e), "replication session failed; restarting from the confirmed position");
                    restarted = true;
                    self.restart().await?;
                }
                Err(e @ LogicalError::SlotLost { .. }) => {
                    // The source is reopened: delivered rows are marked before its
                    // re-publication reads the table.
                    if let Err(flush) = self.flush_settle().await {
                        tracing::warn!(error = %Report(&flush), "marking delivered rows failed after the slot was lost; they will be published again");
                    }
                    return Err(self.explain_loss(e).await);
                }
                Err(e) => return Err(e),
            }
        }
        if !shutdown.is_cancelled() {
            self.read_buffered(max).await?;
        }
        Ok(self.take_batch(max))
    }
}

#[async_trait]
#[async_trait]
impl Source for LogicalSource {
    fn name(&self) -> &'static str {
        "logical"
    }

    async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SourceEvent>, SourceError> {
        match self.next_batch_inner(max, shutdown).await {
            Ok(b) => Ok(b),
            Err(e) => {
                if matches!(e, LogicalError::SlotLost { .. }) {
                    tracing::error!(error = %Report(&e), "replication slot lost");
                }
                // The session is unusable after an error: the next call (after the relay's
                // rewind) starts a new one from the confirmed position.
                if let Some(s) = self.session.take() {
                    s.stop().await;
                }
                // A lost slot in table mode with recovery on is recoverable: the relay reopens
                // the source, which re-publishes from the table.
                Err(SourceError::new("logical", self.kind_of(&e), e))
            }
        }
    }

    /// Whatever complete transactions are already buffered, without waiting; lets the relay
    /// produce the next batch while earlier ones are in flight.
    async fn poll_batch(&mut self, max: usize) -> Result<Vec<SourceEvent>, SourceError> {
        if self.stopped {
            return Ok(Vec::new());
        }
        self.release_marks(false).await?;
        if self.ready.is_empty() && self.republishing() {
            // The previous page was handed on (the relay bounds its window by bytes itself).
            self.next_page(max).await?;
        }
        self.read_buffered(max).await?;
        if self.ready.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.take_batch(max))
    }

    async fn acknowledge(&mut self, delivered: &[SourceEvent]) -> Result<(), SourceError> {
        Ok(self.acknowledge_inner(delivered).await?)
    }

    /// Batches, the pages of a re-publication and what is read ahead from the stream are cut at
    /// `bytes` of payload.
    fn limit_batch_bytes(&mut self, bytes: usize) {
        self.batch_bytes = bytes.max(1);
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        Ok(self.release_marks(true).await?)
    }

    async fn rewind(&mut self) -> Result<(), SourceError> {
        if self.stopped {
            return Ok(());
        }
        Ok(self.restart().await?)
    }
}
