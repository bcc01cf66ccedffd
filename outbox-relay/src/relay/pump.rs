//! The pump: rounds of fill → await → settle over a window of batches in flight.
//!
//! - **fill** claims batches from the source, plans them ([`plan_batch`]) and hands their
//!   records to the sink, up to `max_in_flight_batches` batches and `max_in_flight_bytes`;
//! - **await** waits for the broker's verdict on the oldest batch;
//! - **settle** parks what must be parked, acknowledges the handled prefix to the source and,
//!   after a failure, drops the window, rewinds the source and recreates the producer
//!   ([`setback`] decides whether to retry, isolate or stop).
//!
//! Batches are always completed, parked and acknowledged in the order they were claimed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Relay;
use super::RelayError;
use super::backoff::Backoff;
use super::plan::{
    Plan, Setback, event_of_record, outcomes_per_event, parks_in, plan_batch, setback,
};
use crate::ack::handled_prefix;
use crate::faults::{failpoint, mutant};
use crate::leader::Lease;
use crate::park::{AggregateKey, ParkRequest, ParkStore};
use crate::route::OutboundRecord;
use crate::sink::{Outcome, PendingBatch, Sink, SinkError};
use crate::source::{Source, SourceEvent};

/// A batch handed to the producer whose outcomes are still awaited.
struct InFlight {
    batch: Vec<SourceEvent>,
    plan: Vec<Plan>,
    records: Vec<OutboundRecord>,
    pending: Box<dyn PendingBatch>,
    started: Instant,
    /// Payload bytes of the batch (for `max_in_flight_bytes`).
    bytes: usize,
}

/// A batch the broker has answered: one outcome per event, in batch order.
struct Answered {
    batch: Vec<SourceEvent>,
    plan: Vec<Plan>,
    records: Vec<OutboundRecord>,
    outcomes: Vec<Outcome>,
}

/// One leader term's pipeline: what it reads from, writes to and answers to, and the rounds'
/// state.
pub(super) struct Pump<'a> {
    pub(super) relay: &'a Relay,
    pub(super) source: &'a mut dyn Source,
    pub(super) parked: &'a mut ParkStore,
    pub(super) sink: &'a mut dyn Sink,
    pub(super) shutdown: &'a CancellationToken,
    pub(super) backoff: &'a mut Backoff,
    pub(super) lease: &'a Lease,
    pub(super) rounds: Rounds,
}

/// What the rounds of one leader term remember.
#[derive(Default)]
pub(super) struct Rounds {
    window: VecDeque<InFlight>,
    /// Aggregates blocked by an event parked in a batch still in flight (not in the table yet);
    /// cleared whenever the window drains.
    local_blocked: HashMap<AggregateKey, Uuid>,
    /// Events still to be sent one per round, alone: after a produce request was refused with a
    /// record-level error, to find the record at fault.
    isolate: usize,
    /// Failed rounds in a row caused by an error the relay does not know, with nothing
    /// delivered in between.
    unlisted_rounds: u32,
}

impl Pump<'_> {
    /// Rounds until shutdown (the window completed and acknowledged, the source flushed) or an
    /// error.
    ///
    /// On shutdown the pump stops claiming at once, waits for the broker's verdict on the
    /// batches already in flight, acknowledges them, flushes the source and returns: a graceful
    /// stop under load re-sends nothing.
    pub(super) async fn run(mut self) -> Result<(), RelayError> {
        loop {
            self.fill().await?;
            let Some(front) = self.rounds.window.pop_front() else {
                if self.shutdown.is_cancelled() {
                    // Clean stop: every acknowledgement durable before the source closes.
                    self.source.flush().await?;
                    return Ok(());
                }
                continue;
            };
            let answered = self.await_verdict(front).await?;
            self.settle(answered).await?;
        }
    }

    /// Fills the window: waits for events only when nothing is in flight; another batch only
    /// while one of up to `batch_bytes` still fits in `max_in_flight_bytes`.
    ///
    /// Once shutdown is requested nothing new is read (under steady writes the window would
    /// otherwise never empty): the batches in flight are completed and acknowledged, and then
    /// the source is asked, with the cancelled token, only for what it already holds. The
    /// polling source holds nothing; the logical source hands over the events it has already
    /// decoded (the rest of a transaction, a re-publication from the table), so its slot can be
    /// confirmed past them and the next start repeats none of them.
    async fn fill(&mut self) -> Result<(), RelayError> {
        let config = &self.relay.config;
        let (limit, depth) = if self.rounds.isolate > 0 {
            (1, 1)
        } else {
            (config.batch_size, config.max_in_flight_batches.max(1))
        };
        while self.rounds.window.len() < depth
            && (self.rounds.window.is_empty()
                || self.rounds.window.iter().map(|w| w.bytes).sum::<usize>()
                    + self.relay.batch_bytes()
                    <= config.max_in_flight_bytes)
            && (self.rounds.window.is_empty() || !self.shutdown.is_cancelled())
        {
            let batch = if self.rounds.window.is_empty() {
                self.rounds.local_blocked.clear();
                self.source.next_batch(limit, self.shutdown).await?
            } else {
                self.source.poll_batch(limit).await?
            };
            if batch.is_empty() {
                break;
            }
            self.produce(batch).await?;
        }
        Ok(())
    }

    /// Plans a claimed batch and hands its records to the producer, at the back of the window.
    async fn produce(&mut self, mut batch: Vec<SourceEvent>) -> Result<(), RelayError> {
        let obtained = Instant::now();
        self.relay.stats.read.inc_by(batch.len() as u64);
        let mut blocked = self.parked.blocked_aggregates().await?;
        blocked.extend(
            self.rounds
                .local_blocked
                .iter()
                .map(|(k, v)| (k.clone(), *v)),
        );
        if mutant("park_without_blocking") {
            // Broken on purpose: a parked event does not hold its aggregate back.
            blocked.clear();
        }
        // Broken on purpose (mutant): park a poison event but let its aggregate flow on.
        let hold = !mutant("park_without_blocking");
        // Schema'd events: their subjects registered (waiting out a registry outage) so that
        // planning encodes them without I/O.
        self.relay
            .router
            .wait_for_schemas(batch.iter().map(|e| &e.event))
            .await;
        // Before planning: a sent event's payload moves into its record.
        let bytes = batch
            .iter()
            .map(|e| e.event.payload.as_ref().map_or(0, String::len))
            .sum::<usize>();
        let (plan, mut records) = plan_batch(&self.relay.router, &mut batch, &mut blocked, hold);
        // One copy of a payload in the relay: the record's (moved there by the router where it
        // is sent unchanged). The event keeps only what acknowledging and parking need (a parked
        // record gets its payload back from the record, see `parks_in`). A schema'd event keeps
        // its JSON: its record holds the encoded value, which is not what the outbox table
        // stores.
        for (e, p) in batch.iter_mut().zip(&plan) {
            if matches!(p, Plan::Send(_))
                && !self.relay.router.has_value_schema(&e.event.event_type)
            {
                e.event.payload = None;
            }
        }
        // Last in the gap between reading a batch and producing it: a pause here leaves nothing
        // but the lease to tell a deposed leader from the leader.
        failpoint("before_produce");
        let started = Instant::now();
        // After a pause since the batch was read (a stopped process), only a heartbeat newer
        // than the read proves the lock is still ours.
        if !mutant("skip_lease_check") {
            self.lease.check_after(obtained).await?;
        }
        let pending = self.sink.enqueue(&records).await;
        // librdkafka copied what it accepted; the relay's copy is needed again only for records
        // refused on the spot (parked with their payload), or when each record is sent alone
        // (its verdict may park it).
        if self.rounds.isolate == 0 && !mutant("retry_failed_only") {
            for i in pending.accepted() {
                records[i].payload = None;
            }
        }
        // Enqueue-time rejections block their aggregate for the batches that follow.
        for i in pending.rejected_now() {
            if let Some(k) = event_of_record(&plan, i) {
                let e = &batch[k].event;
                blocked.insert((e.aggregate_type.clone(), e.aggregate_id.clone()), e.id);
            }
        }
        for (key, first) in blocked {
            self.rounds.local_blocked.entry(key).or_insert(first);
        }
        if mutant("ack_before_kafka") {
            self.lease.check()?;
            self.source.acknowledge(&batch).await?;
        }
        self.rounds.window.push_back(InFlight {
            batch,
            plan,
            records,
            pending,
            started,
            bytes,
        });
        Ok(())
    }

    /// Waits for the broker's verdict on every record of `flight`.
    async fn await_verdict(&mut self, flight: InFlight) -> Result<Answered, RelayError> {
        let InFlight {
            batch,
            plan,
            records,
            pending,
            started,
            ..
        } = flight;
        let mut sent = pending.wait().await;
        if self.rounds.isolate > 0 {
            // Sent alone: a record-level refusal is this record's own.
            for o in &mut sent {
                if let Outcome::Suspect(e) = o {
                    *o = Outcome::Rejected(e.clone());
                }
            }
        }
        let stats = &self.relay.stats;
        if !records.is_empty() {
            stats
                .publish_duration
                .observe(started.elapsed().as_secs_f64());
        }
        stats
            .producer_queue
            .set(i64::try_from(self.sink.in_flight()).unwrap_or(i64::MAX));
        if mutant("retry_failed_only") {
            // Broken on purpose: re-send just the failed records, out of order, and go on.
            for _ in 0..50 {
                let failed: Vec<usize> = (0..sent.len())
                    .filter(|i| matches!(sent[*i], Outcome::Failed(_)))
                    .collect();
                if failed.is_empty() {
                    break;
                }
                self.backoff.wait(self.shutdown).await;
                self.sink.recreate().await?;
                let retry: Vec<_> = failed.iter().map(|i| records[*i].clone()).collect();
                for (i, o) in failed.into_iter().zip(self.sink.send_batch(&retry).await) {
                    sent[i] = o;
                }
            }
        }
        // Per event, in batch order: what happened.
        let outcomes = outcomes_per_event(&plan, &sent);
        failpoint("after_kafka_ack");
        Ok(Answered {
            batch,
            plan,
            records,
            outcomes,
        })
    }

    /// Parks and acknowledges the handled prefix of an answered batch; after a failure,
    /// recovers from the first unhandled event.
    async fn settle(&mut self, answered: Answered) -> Result<(), RelayError> {
        let handled = handled_prefix(&answered.outcomes);
        let parks = parks_in(
            &answered.plan,
            &answered.outcomes,
            &answered.batch,
            &answered.records,
            handled,
        );
        if !parks.is_empty() {
            self.park(&parks).await?;
        }
        if handled > 0 {
            self.acknowledge(&answered, handled).await?;
            self.rounds.unlisted_rounds = 0;
        }
        self.relay.stats.batches.inc();
        if handled < answered.batch.len() {
            self.recover(&answered, handled).await
        } else {
            self.rounds.isolate = self.rounds.isolate.saturating_sub(answered.batch.len());
            self.relay
                .stats
                .sink_connected
                .store(true, Ordering::Relaxed);
            self.backoff.reset();
            Ok(())
        }
    }

    /// Parks `parks` durably (under the lease) and announces them on the dead-letter topic.
    async fn park(&mut self, parks: &[ParkRequest]) -> Result<(), RelayError> {
        for p in parks.iter().filter(|p| p.blocked_by.is_none()) {
            tracing::error!(
                event_id = %p.event.id,
                event_type = %p.event.event_type,
                aggregate_type = %p.event.aggregate_type,
                reason = %p.reason,
                "event parked: it cannot be published; its aggregate is held until it is retried or dropped (outbox-relay parked list)"
            );
        }
        self.lease.check()?;
        self.parked.park(parks).await?;
        self.relay.stats.parked.inc_by(parks.len() as u64);
        self.notify_dead_letters(parks).await;
        Ok(())
    }

    /// Acknowledges the first `handled` events of `answered` to the source (under the lease)
    /// and records what was delivered.
    async fn acknowledge(&mut self, answered: &Answered, handled: usize) -> Result<(), RelayError> {
        let Answered {
            batch, outcomes, ..
        } = answered;
        if !mutant("ack_before_kafka") {
            self.lease.check()?;
            self.source.acknowledge(&batch[..handled]).await?;
        }
        failpoint("after_source_ack");
        let stats = &self.relay.stats;
        let delivered = outcomes[..handled]
            .iter()
            .filter(|o| matches!(o, Outcome::Delivered(_)))
            .count();
        stats.published.inc_by(delivered as u64);
        let now = chrono::Utc::now();
        if delivered > 0 {
            stats
                .last_published_ms
                .store(now.timestamp_millis(), Ordering::Relaxed);
        }
        for (e, o) in batch.iter().zip(outcomes).take(handled) {
            if let (Outcome::Delivered(_), Some(created)) = (o, e.event.created_at) {
                stats
                    .commit_to_ack
                    .observe((now - created).num_microseconds().unwrap_or(0) as f64 / 1e6);
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (e, o) in batch.iter().zip(outcomes).take(handled) {
                if let Outcome::Delivered(d) = o {
                    tracing::debug!(event_id = %e.event.id, event_type = %e.event.event_type,
                        partition = d.partition, offset = d.offset, "published");
                }
            }
        }
        Ok(())
    }

    /// After event `handled` of `answered` failed: stops the relay if the broker's verdict says
    /// so; otherwise drops the window, rewinds the source to that event, recreates the producer
    /// and (unless the next rounds isolate a suspect record) backs off.
    async fn recover(&mut self, answered: &Answered, handled: usize) -> Result<(), RelayError> {
        let Answered {
            batch,
            plan,
            records,
            outcomes,
        } = answered;
        let failed = &batch[handled];
        let (Outcome::Failed(error) | Outcome::Suspect(error)) = &outcomes[handled] else {
            unreachable!("the first unhandled outcome is a failure")
        };
        let step = setback(
            outcomes,
            handled,
            &mut self.rounds.unlisted_rounds,
            |fault| fault.class,
        );
        let isolate = match step {
            Setback::Stop(fix) => {
                let topic = match &plan[handled] {
                    Plan::Send(i) => records[*i].topic.as_str(),
                    Plan::Park(_) => "",
                };
                return Err(
                    SinkError::refused(self.sink.kind().broker(), topic, error, fix).into(),
                );
            }
            Setback::Retry { isolate } => isolate,
        };
        let dropped = batch.len() - handled
            + self
                .rounds
                .window
                .iter()
                .map(|w| w.batch.len())
                .sum::<usize>();
        self.relay.stats.failed.inc_by(dropped as u64);
        let what = if isolate > 0 {
            // One at a time: the suspects of this batch (the records of the refused request).
            // Later batches go back to normal batching.
            self.rounds.isolate = isolate;
            "a produce request was refused with a record-level error: sending the events from here one at a time to find the one at fault before parking anything"
        } else {
            self.relay
                .stats
                .sink_connected
                .store(false, Ordering::Relaxed);
            "delivery failed: dropping the in-flight window, recreating the producer and resuming from the first unacknowledged event"
        };
        tracing::warn!(
            event_id = %failed.event.id,
            event_type = %failed.event.event_type,
            %error,
            acknowledged = handled,
            dropped,
            "{what}"
        );
        self.rounds.window.clear();
        self.rounds.local_blocked.clear();
        self.source.rewind().await?;
        self.sink.recreate().await?;
        if isolate == 0 {
            self.backoff.wait(self.shutdown).await;
        }
        Ok(())
    }

    /// Announces newly parked poison events on the dead-letter topic, when one is configured.
    /// The events are already durably parked; a failure here is only logged.
    async fn notify_dead_letters(&mut self, parks: &[ParkRequest]) {
        let Some(topic) = &self.relay.config.dead_letter_topic else {
            return;
        };
        let records: Vec<OutboundRecord> = parks
            .iter()
            .map(|p| OutboundRecord {
                topic: topic.clone(),
                key: p.event.aggregate_id.clone(),
                payload: Some(
                    serde_json::json!({
                        "id": p.event.id,
                        "aggregatetype": p.event.aggregate_type,
                        "aggregateid": p.event.aggregate_id,
                        "type": p.event.event_type,
                        "reason": p.reason,
                        "blocked_by": p.blocked_by,
                    })
                    .to_string()
                    .into_bytes(),
                ),
                headers: vec![
                    ("id".into(), p.event.id.to_string().into_bytes()),
                    ("eventType".into(), p.event.event_type.clone().into_bytes()),
                    ("outbox-park-reason".into(), p.reason.clone().into_bytes()),
                ],
                timestamp_ms: None,
            })
            .collect();
        for outcome in self.sink.send_batch(&records).await {
            if !matches!(outcome, Outcome::Delivered(_)) {
                tracing::warn!(topic = %topic, ?outcome, "could not announce a parked event on the dead-letter topic");
            }
        }
    }
}
