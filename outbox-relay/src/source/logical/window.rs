//! The in-flight/confirm window: events handed to the relay wait in `inflight` until it
//! acknowledges a prefix of them; the confirmed LSN follows the acknowledged prefix.
//!
//! Guarantee: **the slot only advances over what the broker acknowledged.** An acknowledgement
//! must be the exact next prefix of the window (else it is refused); the confirmed LSN becomes the
//! end LSN of the last transaction entirely inside it and never moves backwards. In `table` mode
//! streamed rows are recorded for a deferred mark and their LSN confirmed at once
//! ([`Settle`](super::settle::Settle)); re-published rows and deletions are acknowledged first
//! and release the LSN once durable ([`RowMarks`]). Batches are
//! cut at `max` events and at the batch byte bound.

use crate::failure::Report;
use std::collections::VecDeque;
use std::time::Duration;

use uuid::Uuid;

use super::{LogicalError, LogicalSource, Lsn, slot};
use crate::source::row_marks::{RowKeys, RowMarks};
use crate::source::{Position, SourceEvent};

/// An event handed to the relay and not acknowledged yet.
#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    pub(super) id: Uuid,
    pub(super) position: Position,
}

/// The events handed to the relay and not acknowledged yet, in the order they were handed on.
///
/// Pure bookkeeping (no I/O): it decides how far an acknowledgement lets the slot be confirmed.
/// Guarantee: an acknowledgement is accepted only when it is exactly the window's next prefix, and
/// the position it yields is the end LSN of the last transaction that prefix completes, never
/// that of a transaction still partly in flight.
#[derive(Debug, Default)]
pub(super) struct Window {
    events: VecDeque<InFlight>,
}

impl Window {
    /// Adds a batch just handed to the relay, after everything in flight.
    pub(super) fn admit(&mut self, batch: &[SourceEvent]) {
        self.events.extend(batch.iter().map(|e| InFlight {
            id: e.event.id,
            position: e.position,
        }));
    }

    /// Removes the acknowledged prefix `delivered` and returns the LSN it lets the slot be
    /// confirmed to, if it completes a transaction. Refused, with the window unchanged, when
    /// `delivered` is not the next prefix (more events than in flight, or another order).
    pub(super) fn acknowledge(
        &mut self,
        delivered: &[SourceEvent],
    ) -> Result<Option<Lsn>, LogicalError> {
        if delivered.len() > self.events.len() {
            return Err(LogicalError::Replication(format!(
                "acknowledged {} events but only {} are in flight",
                delivered.len(),
                self.events.len()
            )));
        }
        for (d, f) in delivered.iter().zip(self.events.iter()) {
            if d.event.id != f.id {
                return Err(LogicalError::Replication(format!(
                    "acknowledged event {} is not the next one in flight ({})",
                    d.event.id, f.id
                )));
            }
        }
        let mut new_confirm = None;
        for _ in 0..delivered.len() {
            if let Some(f) = self.events.pop_front()
                && let Position::Wal {
                    end_lsn,
                    last_in_transaction: true,
                    ..
                } = f.position
            {
                new_confirm = Some(Lsn(end_lsn));
            }
        }
        Ok(new_confirm)
    }

    /// Whether nothing is in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Forgets everything in flight (a rewind: it is streamed or re-published again).
    pub(super) fn clear(&mut self) {
        self.events.clear();
    }

    /// The events in flight, oldest first.
    pub(super) fn iter(&self) -> impl Iterator<Item = &InFlight> {
        self.events.iter()
    }
}

impl LogicalSource {
    /// Nothing is pending: no open, ready, in-flight or still-marking event precedes the stream's
    /// current position, so a keepalive's or heartbeat's position may be confirmed.
    pub(super) fn idle(&self) -> bool {
        self.open.is_none()
            && self.ready.is_empty()
            && self.inflight.is_empty()
            && self.marks.as_ref().is_none_or(RowMarks::is_empty)
    }

    /// Confirms the LSNs whose rows' acknowledgements are durable: those completed so far, or
    /// (with `wait`) all of them.
    pub(super) async fn release_marks(&mut self, wait: bool) -> Result<(), LogicalError> {
        if wait {
            self.flush_settle().await?;
        } else {
            self.poll_settle().await?;
        }
        let Some(marks) = self.marks.as_mut() else {
            return Ok(());
        };
        let done = if wait {
            marks.finish().await?
        } else {
            marks.completed().await?
        };
        for lsn in done.into_iter().flatten() {
            self.confirm(lsn);
        }
        Ok(())
    }

    /// Starts the deferred row marks that are due ([`Settle::poll`](super::settle::Settle)).
    pub(super) async fn poll_settle(&mut self) -> Result<(), LogicalError> {
        let idle = self.idle();
        if let Some(settle) = self.settle.as_mut() {
            settle
                .poll(self.confirmed, self.instance.as_deref(), idle)
                .await?;
        }
        Ok(())
    }

    /// Marks every delivered row recorded for a deferred mark, and waits for it.
    pub(super) async fn flush_settle(&mut self) -> Result<(), LogicalError> {
        match self.settle.as_mut() {
            Some(settle) => settle.flush().await,
            None => Ok(()),
        }
    }

    /// Raise the confirmed LSN (monotonic) and hand it to the replication client.
    pub(super) fn confirm(&mut self, lsn: Lsn) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.metrics.confirmed_lsn.set(lsn.0);
            if let Some(s) = &self.session {
                s.confirm(lsn);
            }
        }
    }

    /// Applies what the replication session has already received, without waiting, until `max`
    /// events are ready. A session error is kept for the next blocking read: what is complete
    /// stays usable.
    pub(super) async fn read_buffered(&mut self, max: usize) -> Result<(), LogicalError> {
        let size = |e: &SourceEvent| e.event.payload.as_ref().map_or(0, String::len);
        let mut bytes: usize = self.ready.iter().map(size).sum();
        while self.ready.len() < max && bytes < self.batch_bytes {
            let Some(session) = self.session.as_mut() else {
                break;
            };
            match tokio::time::timeout(Duration::ZERO, session.recv()).await {
                Ok(Ok(Some(ev))) => {
                    let before = self.ready.len();
                    self.handle(ev)?;
                    bytes += self.ready.range(before..).map(size).sum::<usize>();
                }
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(e)) => {
                    tracing::debug!(error = %Report(&e), "replication session failed after events were read");
                    break;
                }
            }
        }
        Ok(())
    }

    /// Move up to `max` ready events to the in-flight window and return them, cut once their
    /// payloads reach the batch byte bound (the first event always goes).
    pub(super) fn take_batch(&mut self, max: usize) -> Vec<SourceEvent> {
        let mut n = 0;
        let mut bytes = 0usize;
        for e in self.ready.iter().take(max.max(1)) {
            if n > 0 && bytes >= self.batch_bytes {
                break;
            }
            bytes += e.event.payload.as_ref().map_or(0, String::len);
            n += 1;
        }
        let batch: Vec<SourceEvent> = self.ready.drain(..n).collect();
        if self.multi() {
            self.taken_tags.clear();
            self.taken_tags.extend(self.ready_tags.drain(..n));
        }
        if tracing::enabled!(tracing::Level::TRACE) {
            for e in &batch {
                tracing::trace!(event_id = %e.event.id, aggregate_seq = ?e.event.aggregate_seq, position = ?e.position, "returned");
            }
        }
        self.inflight.admit(&batch);
        if crate::faults::mutant("confirm_on_receipt") {
            // Broken on purpose: confirm what was merely received, before Kafka has it.
            if let Some(end) = batch.iter().rev().find_map(|e| match e.position {
                Position::Wal {
                    end_lsn,
                    last_in_transaction: true,
                    ..
                } => Some(end_lsn),
                _ => None,
            }) {
                self.confirm(Lsn(end));
            }
        }
        batch
    }

    pub(super) async fn acknowledge_inner(
        &mut self,
        delivered: &[SourceEvent],
    ) -> Result<(), LogicalError> {
        if delivered.is_empty() {
            return Ok(());
        }
        let new_confirm = self.inflight.acknowledge(delivered)?;
        let streamed_only = delivered
            .iter()
            .all(|d| matches!(d.position, Position::Wal { .. }));
        if let Some(settle) = self.settle.as_mut()
            && streamed_only
        {
            // Streamed rows: the confirmed LSN is their durable record; they are marked
            // published later, in the background (`settle`).
            settle
                .record(
                    RowKeys::of(delivered.iter().map(|d| &d.event)),
                    self.instance.as_deref(),
                )
                .await?;
            if let Some(lsn) = new_confirm {
                self.confirm(lsn);
            }
            self.poll_settle().await?;
        } else {
            self.mark_then_confirm(delivered, new_confirm).await?;
        }
        // The marker slot goes only once the table was read to the end and every re-published
        // row is durably marked.
        self.finish_backfill_if_complete().await?;
        if self.stopped {
            self.release_marks(true).await?;
            // Acknowledged after shutdown: make it durable right away.
            slot::advance_slot(&self.pool, &self.cfg.slot, self.confirmed).await?;
        }
        Ok(())
    }

    /// Confirms `new_confirm` once the rows of `delivered` are marked (or deleted) durably, or at
    /// once without a `table`-mode acknowledgement.
    async fn mark_then_confirm(
        &mut self,
        delivered: &[SourceEvent],
        new_confirm: Option<Lsn>,
    ) -> Result<(), LogicalError> {
        match self.marks.as_mut() {
            // table mode: the rows are marked published BEFORE the LSN is confirmed; the mark
            // runs beside the pipeline and releases the LSN once it is durable.
            Some(marks) => {
                let done = marks
                    .submit(delivered.iter().map(|d| &d.event), new_confirm)
                    .await?;
                for lsn in done.into_iter().flatten() {
                    self.confirm(lsn);
                }
            }
            None => {
                if let Some(lsn) = new_confirm {
                    self.confirm(lsn);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use outbox_core::StoredEvent;

    use super::*;

    fn event(n: u128, position: Position) -> SourceEvent {
        let id = Uuid::from_u128(n);
        SourceEvent::new(StoredEvent::new(id, "order", "a", "Created"), position)
    }

    fn wal(commit_lsn: u64, end_lsn: u64, last_in_transaction: bool) -> Position {
        Position::Wal {
            commit_lsn,
            end_lsn,
            last_in_transaction,
        }
    }

    /// Two transactions (200..210 with two events, 300..310 with one) handed on in one batch.
    fn two_transactions() -> (Window, Vec<SourceEvent>) {
        let batch = vec![
            event(1, wal(200, 210, false)),
            event(2, wal(200, 210, true)),
            event(3, wal(300, 310, true)),
        ];
        let mut w = Window::default();
        w.admit(&batch);
        (w, batch)
    }

    #[test]
    fn confirmation_never_passes_the_acknowledged_prefix() {
        let (mut w, batch) = two_transactions();
        assert_eq!(
            w.acknowledge(&batch[..1]).unwrap(),
            None,
            "half a transaction"
        );
        assert_eq!(w.acknowledge(&batch[1..2]).unwrap(), Some(Lsn(210)));
        assert_eq!(w.acknowledge(&batch[2..]).unwrap(), Some(Lsn(310)));
        assert!(w.is_empty());
    }

    #[test]
    fn a_prefix_spanning_transactions_confirms_the_last_complete_one() {
        let (mut w, batch) = two_transactions();
        assert_eq!(w.acknowledge(&batch[..2]).unwrap(), Some(Lsn(210)));
        let (mut w, batch) = two_transactions();
        assert_eq!(w.acknowledge(&batch).unwrap(), Some(Lsn(310)));
        let (mut w, _) = two_transactions();
        assert_eq!(w.acknowledge(&[]).unwrap(), None);
        assert_eq!(w.iter().count(), 3);
    }

    #[test]
    fn chunks_and_rows_confirm_nothing() {
        let batch = vec![
            event(1, Position::Row),
            // A chunk of a transaction handed on before its commit.
            event(2, wal(400, 0, false)),
        ];
        let mut w = Window::default();
        w.admit(&batch);
        assert_eq!(w.acknowledge(&batch).unwrap(), None);
    }

    #[test]
    fn anything_but_the_next_prefix_is_refused_and_changes_nothing() {
        let (mut w, batch) = two_transactions();
        assert!(w.acknowledge(&batch[1..]).is_err(), "skips the first");
        let mut more = batch.clone();
        more.push(event(4, wal(500, 510, true)));
        assert!(w.acknowledge(&more).is_err(), "more than in flight");
        let ids: Vec<Uuid> = w.iter().map(|f| f.id).collect();
        let sent: Vec<Uuid> = batch.iter().map(|e| e.event.id).collect();
        assert_eq!(ids, sent, "the window is unchanged");
        assert_eq!(w.acknowledge(&batch).unwrap(), Some(Lsn(310)));
    }
}
