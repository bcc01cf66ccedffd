//! The relay's main loop: source → route → sink → ack → source position.
//!
//! One round: take a batch of committed events from the source, route each to a record, produce
//! them all, wait for Kafka's verdict on each, acknowledge the contiguous prefix of successes to
//! the source. After any failure the rest of the batch is dropped, the producer recreated and the
//! source rewound, so the failed event and everything after it are produced again, in order.
//!
//! Used by the `outbox-relay` binary and, for teams without a sidecar, embedded in a service:
//!
//! ```no_run
//! # async fn demo() -> Result<(), outbox_relay::RelayError> {
//! use outbox_relay::{Relay, RelayConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! let mut config = RelayConfig::default();
//! config.database_url = outbox_relay::config::Secret::new("postgres://app@localhost/app");
//! config.kafka.bootstrap_servers = "localhost:9092".into();
//! let shutdown = CancellationToken::new();
//! Relay::new(config)?.run(shutdown.clone()).await
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outbox_core::{OutboxTable, WriteMode};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ack::handled_prefix;
use crate::config::{ConfigError, RelayConfig, RowAcknowledgement, SourceKind, redact_url};
use crate::failure::{Action, ErrorKind, Report, decide};
use crate::faults::{failpoint, mutant};
use crate::leader::{Leadership, Lease, LeaseLost};
use crate::park::{AggregateKey, ParkError, ParkRequest, ParkStore};
use crate::route::{OutboundRecord, RouteError, Router};
use crate::sink::kafka::{KafkaSink, Outcome, Pending, SinkError, classify};
use crate::sink::{ErrorClass, UNLISTED_ERROR_ROUNDS};
use crate::source::polling::{PollingSettings, PollingSource};
use crate::source::{Source, SourceError, SourceEvent};
use crate::stats::RelayStats;
use crate::table::purge_published;
use backoff::Backoff;
use plan::{Plan, event_of_record, outcomes_per_event, parks_in, plan_batch, suspects_from};

mod backoff;
mod plan;

/// Why the relay stopped (other than a requested shutdown).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// PostgreSQL could not be reached at start-up, or the outbox is not set up.
    #[error("{context}")]
    Database {
        /// What the relay was doing.
        context: String,
        /// The driver's error.
        #[source]
        error: sqlx::Error,
    },
    /// The database is reachable but not ready for the relay (e.g. the table is missing).
    #[error("{0}")]
    NotReady(String),
    /// Kafka could not be reached or the producer could not be built.
    #[error(transparent)]
    Kafka(#[from] SinkError),
    /// The source failed in a way retrying cannot fix.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Parking events, or reading which aggregates parked events hold, failed.
    #[error(transparent)]
    Park(#[from] ParkError),
    /// An event cannot be routed (illegal topic name).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// This relay's leader lease ran out or its heartbeat failed ([`crate::leader`]); the relay
    /// steps down to standby on its own, so [`Relay::run`] does not return it.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
}

impl RelayError {
    /// What kind of failure this is: the input of the relay's one error policy
    /// ([`crate::failure::decide`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            RelayError::Config(_) | RelayError::Route(_) => ErrorKind::Config,
            RelayError::Database { .. } => ErrorKind::Unavailable,
            RelayError::NotReady(_) => ErrorKind::Setup,
            RelayError::Kafka(e) => e.kind(),
            RelayError::Source(e) => e.kind(),
            RelayError::Park(e) => e.kind(),
            RelayError::LeaseLost(_) => ErrorKind::LeaseLost,
        }
    }

    /// The process exit code for this error: 2 for configuration problems, 1 otherwise
    /// ([`ErrorKind::exit_code`]).
    pub fn exit_code(&self) -> i32 {
        self.kind().exit_code()
    }
}

/// A configured relay. See the [module docs](self).
pub struct Relay {
    config: RelayConfig,
    table: OutboxTable,
    router: Router,
    options: PgConnectOptions,
    stats: Arc<RelayStats>,
}

impl Relay {
    /// Validates the configuration; nothing is connected yet.
    pub fn new(config: RelayConfig) -> Result<Self, RelayError> {
        let table = config.validate()?;
        let router = Router::new(&config.route)
            .map_err(|e| ConfigError::new("route.topic", e.to_string()))?;
        let options = PgConnectOptions::from_str(config.database_url.expose()).map_err(|e| {
            ConfigError::new(
                "database_url",
                format!("`{}`: {e}", redact_url(config.database_url.expose())),
            )
        })?;
        Ok(Self {
            config,
            table,
            router,
            options,
            stats: Arc::new(RelayStats::default()),
        })
    }

    /// The relay's live counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Checks that PostgreSQL is reachable and the outbox is set up, and that Kafka answers.
    async fn preflight(&self) -> Result<KafkaSink, RelayError> {
        let url = redact_url(self.config.database_url.expose());
        let mut conn = tokio::time::timeout(self.config.connect_timeout, self.options.connect())
            .await
            .map_err(|_| {
                RelayError::NotReady(format!(
                    "cannot connect to PostgreSQL at {url}: no answer within {}",
                    crate::config::duration::format(&self.config.connect_timeout)
                ))
            })?
            .map_err(|error| RelayError::Database {
                context: format!("cannot connect to PostgreSQL at {url}"),
                error,
            })?;
        if self.config.write_mode != WriteMode::LogicalMessage {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(self.table.qualified())
                .fetch_one(&mut conn)
                .await
                .map_err(|error| RelayError::Database {
                    context: "cannot look up the outbox table".into(),
                    error,
                })?;
            let version = outbox_core::schema_version(&mut conn, &self.table)
                .await
                .map_err(|e| {
                    RelayError::NotReady(format!("cannot read the outbox schema version: {e}"))
                })?;
            if !exists || version.is_none() {
                return Err(RelayError::NotReady(format!(
                    "the outbox table {} is {} in {url}: run `outbox-relay migrate` first",
                    self.table,
                    if exists { "not migrated" } else { "missing" }
                )));
            }
            if let Some(v) = version.filter(|v| *v < outbox_core::SCHEMA_VERSION) {
                tracing::warn!(
                    table = %self.table,
                    version = v,
                    newest = outbox_core::SCHEMA_VERSION,
                    "the outbox table's schema is older than this relay's: run `outbox-relay migrate` (until then wake-ups may not reach the relay and malformed rows are not refused at write time)"
                );
            }
        }
        let _ = conn.close().await;
        let sink = KafkaSink::new(self.config.kafka.clone())?
            .with_producer_spans(self.config.telemetry.enabled);
        sink.check_connection().await?;
        Ok(sink)
    }

    /// Runs until `shutdown` is cancelled (then drains the batch in flight, acknowledges it and
    /// returns `Ok`) or until a failure that retrying cannot fix.
    ///
    /// Everything it logs carries the span `relay` with the fields `table`, `source` and, for the
    /// logical source, `slot`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "relay",
            table = %self.table.qualified(),
            source = match self.config.source {
                SourceKind::Polling => "polling",
                SourceKind::Logical => "logical",
            },
            slot = tracing::field::Empty,
        );
        if self.config.source == SourceKind::Logical {
            span.record("slot", self.config.logical.slot.as_str());
        }
        self.run_in_span(shutdown).instrument(span).await
    }

    async fn run_in_span(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        if let Some(addr) = self.config.admin_addr {
            crate::admin::serve(
                addr,
                Arc::new(self.config.clone()),
                self.table.clone(),
                &self.options,
                self.stats.clone(),
                shutdown.clone(),
            )
            .await
            .map_err(|e| {
                RelayError::Config(ConfigError::new(
                    "admin_addr",
                    format!("cannot listen on {addr}: {e}"),
                ))
            })?;
        }
        let mut sink = self.preflight().await?;
        self.stats.kafka_connected.store(true, Ordering::Relaxed);
        tracing::info!(
            source = ?self.config.source,
            table = %self.table,
            topic = self.router_template(),
            "relay started"
        );
        let purger = self.spawn_purger(shutdown.clone());
        let broker_watch = crate::sink::kafka::watch_brokers(
            &self.config.kafka,
            self.stats.clone(),
            shutdown.clone(),
        )?;
        let mut backoff = Backoff::new();
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            let leader = match Leadership::acquire(
                &self.options,
                &self.table,
                self.config.standby_interval,
                self.config.leader_lease,
                &shutdown,
            )
            .await
            {
                Ok(Some(l)) => l,
                Ok(None) => break Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach PostgreSQL for the leader lock; retrying");
                    backoff.wait(&shutdown).await;
                    continue;
                }
            };
            self.stats.active.store(true, Ordering::Relaxed);
            let lease = leader.lease();
            // Parks go through the leader's session too; the handle stops working when the
            // source drops the leadership.
            let mut parked = ParkStore::new(self.table.clone(), leader.session());
            let outcome = match self.open_source(leader).await {
                Ok(mut source) => {
                    self.stats.source_running.store(true, Ordering::Relaxed);
                    source.limit_batch_bytes(self.batch_bytes());
                    let outcome = self
                        .pump(
                            source.as_mut(),
                            &mut parked,
                            &mut sink,
                            &shutdown,
                            &mut backoff,
                            &lease,
                        )
                        .await;
                    if outcome.is_err() {
                        // The source (and with it the leader lock) is dropped at the end of this
                        // block: first make sure nothing of the abandoned window can still reach
                        // Kafka after another relay — or this one, after a rewind — resumes from
                        // the durable position.
                        self.fence_producer(&mut sink, &lease).await?;
                    }
                    outcome
                }
                Err(e) => Err(RelayError::Source(e)),
            };
            self.stats.source_running.store(false, Ordering::Relaxed);
            self.stats.active.store(false, Ordering::Relaxed);
            let Err(e) = outcome else { break Ok(()) };
            match decide(e.kind(), lease.check().is_ok()) {
                Action::StepDown => self.step_down(&mut sink, &lease, &e)?,
                Action::RestartSource => {
                    tracing::warn!(error = %Report(&e), "source interrupted; resuming from the last acknowledged position");
                    backoff.wait(&shutdown).await;
                }
                Action::Stop => break Err(e),
            }
        };
        if let Some(p) = purger {
            p.abort();
        }
        broker_watch.abort();
        match &result {
            Ok(()) => tracing::info!(published = self.stats.published.get(), "relay stopped"),
            Err(e) => tracing::error!(error = %Report(e), "relay failed"),
        }
        result
    }

    /// After the lease was lost: drops every record still queued in the producer (purge, then a
    /// fresh producer) and goes back to standby; the next leader resumes from the first
    /// unacknowledged event.
    fn step_down(
        &self,
        sink: &mut KafkaSink,
        lease: &Lease,
        cause: &RelayError,
    ) -> Result<(), RelayError> {
        // `run` fenced the producer before the source and its lock went; nothing is left.
        let purged = sink.purge();
        sink.recreate()?;
        self.stats.lease_lost.inc();
        self.stats.producer_queue.set(0);
        let reason = lease.check().err().map(|l| l.reason).unwrap_or_default();
        tracing::error!(
            %reason,
            cause = %Report(cause),
            purged,
            "leader lease lost: stepped down to standby without producing or acknowledging anything more; the active relay resumes from the first unacknowledged event"
        );
        Ok(())
    }

    /// Called when the pump stopped on an error, while this relay still holds the source and
    /// its leader lock: drops every record of the abandoned window still queued in the producer,
    /// waits (at most while the lease holds, and never past the delivery timeout) for the
    /// produce requests already on the wire to be answered, drops whatever is still unanswered
    /// and replaces the producer. Only then may the lock go, so no standby that takes over —
    /// and no rewound pipeline of this relay — is followed by a late copy of the old window.
    async fn fence_producer(&self, sink: &mut KafkaSink, lease: &Lease) -> Result<(), RelayError> {
        let wait = lease
            .remaining()
            .min(self.config.kafka.delivery_timeout)
            .min(Duration::from_secs(5));
        let fenced = sink.fence(wait).await;
        sink.recreate()?;
        self.stats.producer_queue.set(0);
        if fenced.held > 0 {
            tracing::warn!(
                held = fenced.held,
                unanswered = fenced.unanswered,
                "fenced the producer before releasing the source: its unsent records were dropped and are sent again from the durable position"
            );
        }
        Ok(())
    }

    /// The byte bound of one batch: an equal share of `max_in_flight_bytes` for each batch in
    /// flight and one more for the batch being claimed, so the window and the claim being read
    /// stay within the bound together.
    fn batch_bytes(&self) -> usize {
        (self.config.max_in_flight_bytes / (self.config.max_in_flight_batches.max(1) + 1)).max(1)
    }

    fn router_template(&self) -> &str {
        &self.config.route.topic
    }

    async fn open_source(&self, leader: Leadership) -> Result<Box<dyn Source>, SourceError> {
        match self.config.source {
            SourceKind::Polling => Ok(Box::new(
                PollingSource::new(
                    PollingSettings {
                        table: self.table.clone(),
                        acknowledgement: self.config.acknowledgement,
                        poll_interval: self.config.poll_interval,
                        listen: self.config.listen,
                    },
                    leader,
                    &self.options,
                )
                .await?,
            )),
            SourceKind::Logical => {
                use crate::source::logical::{LogicalConfig, LogicalSource};
                let cfg = LogicalConfig::from_relay(&self.config, self.table.clone())?;
                Ok(Box::new(
                    LogicalSource::open(cfg, Some(leader), self.stats.logical.clone()).await?,
                ))
            }
        }
    }

    /// Rounds of claim → produce → acknowledge until shutdown or an error, with up to
    /// `max_in_flight_batches` batches produced ahead while the oldest awaits Kafka's verdict.
    /// Batches are always completed, parked and acknowledged in the order they were claimed.
    ///
    /// On shutdown the pump stops claiming at once, waits for Kafka's verdict on the batches
    /// already in flight, acknowledges them, flushes the source and returns: a graceful stop
    /// under load re-sends nothing.
    async fn pump(
        &self,
        source: &mut dyn Source,
        parked: &mut ParkStore,
        sink: &mut KafkaSink,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        lease: &Lease,
    ) -> Result<(), RelayError> {
        let max_in_flight = self.config.max_in_flight_batches.max(1);
        let mut window: VecDeque<InFlight> = VecDeque::with_capacity(max_in_flight);
        // Aggregates blocked by an event parked in a batch still in flight (not in the table
        // yet); cleared whenever the window drains.
        let mut local_blocked: HashMap<AggregateKey, Uuid> = HashMap::new();
        // Events still to be sent one per round, alone: after a produce request was refused with
        // a record-level error, to find the record at fault ([`ErrorClass::Record`]).
        let mut isolate: usize = 0;
        // Failed rounds in a row caused by an error the relay does not know, with nothing
        // delivered in between ([`ErrorClass::Unlisted`]).
        let mut unlisted_rounds: u32 = 0;
        loop {
            let (limit, depth) = if isolate > 0 {
                (1, 1)
            } else {
                (self.config.batch_size, max_in_flight)
            };
            // Fill the window: wait for events only when nothing is in flight. By bytes: another
            // batch only while one of up to `batch_bytes` still fits.
            //
            // Once shutdown is requested nothing new is read (under steady writes the window
            // would otherwise never empty): the batches in flight are completed and
            // acknowledged, and then the source is asked, with the cancelled token, only for
            // what it already holds. The polling source holds nothing; the logical source hands
            // over the events it has already decoded (the rest of a transaction, a
            // re-publication from the table), so its slot can be confirmed past them and the
            // next start repeats none of them.
            while window.len() < depth
                && (window.is_empty()
                    || window.iter().map(|w| w.bytes).sum::<usize>() + self.batch_bytes()
                        <= self.config.max_in_flight_bytes)
                && (window.is_empty() || !shutdown.is_cancelled())
            {
                let batch = if window.is_empty() {
                    local_blocked.clear();
                    source.next_batch(limit, shutdown).await?
                } else {
                    source.poll_batch(limit).await?
                };
                if batch.is_empty() {
                    break;
                }
                let obtained = std::time::Instant::now();
                self.stats.read.inc_by(batch.len() as u64);
                let mut blocked = parked.blocked_aggregates().await?;
                blocked.extend(local_blocked.iter().map(|(k, v)| (k.clone(), *v)));
                if mutant("park_without_blocking") {
                    // Broken on purpose: a parked event does not hold its aggregate back.
                    blocked.clear();
                }
                // Broken on purpose (mutant): park a poison event but let its aggregate flow on.
                let hold = !mutant("park_without_blocking");
                let (plan, mut records) = plan_batch(&self.router, &batch, &mut blocked, hold);
                let bytes = batch
                    .iter()
                    .map(|e| e.event.payload.as_ref().map_or(0, String::len))
                    .sum::<usize>();
                // One copy of a payload in the relay: the record's. The event keeps only what
                // acknowledging and parking need (a parked record gets its payload back from
                // the record, see `parks_in`).
                let mut batch = batch;
                for (e, p) in batch.iter_mut().zip(&plan) {
                    if matches!(p, Plan::Send(_)) {
                        e.event.payload = None;
                    }
                }
                // Last in the gap between reading a batch and producing it: a pause here leaves
                // nothing but the lease to tell a deposed leader from the leader.
                failpoint("before_produce");
                let started = std::time::Instant::now();
                // After a pause since the batch was read (a stopped process), only a heartbeat
                // newer than the read proves the lock is still ours.
                if !mutant("skip_lease_check") {
                    lease.check_after(obtained).await?;
                }
                let pending = sink.enqueue(&records).await;
                // librdkafka copied what it accepted; the relay's copy is needed again only for
                // records refused on the spot (parked with their payload), or when each record
                // is sent alone (its verdict may park it).
                if isolate == 0 && !mutant("retry_failed_only") {
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
                    local_blocked.entry(key).or_insert(first);
                }
                if mutant("ack_before_kafka") {
                    lease.check()?;
                    source.acknowledge(&batch).await?;
                }
                window.push_back(InFlight {
                    batch,
                    plan,
                    records,
                    pending,
                    started,
                    bytes,
                });
            }
            let Some(InFlight {
                batch,
                plan,
                records,
                pending,
                started,
                ..
            }) = window.pop_front()
            else {
                if shutdown.is_cancelled() {
                    // Clean stop: every acknowledgement durable before the source closes.
                    source.flush().await?;
                    return Ok(());
                }
                continue;
            };
            let mut sent = pending.wait().await;
            if isolate > 0 {
                // Sent alone: a record-level refusal is this record's own.
                for o in &mut sent {
                    if let Outcome::Suspect(e) = o {
                        *o = Outcome::Rejected(e.clone());
                    }
                }
            }
            if !records.is_empty() {
                self.stats
                    .publish_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            self.stats.producer_queue.set(i64::from(sink.in_flight()));
            if mutant("retry_failed_only") {
                // Broken on purpose: re-send just the failed records, out of order, and go on.
                for _ in 0..50 {
                    let failed: Vec<usize> = (0..sent.len())
                        .filter(|i| matches!(sent[*i], Outcome::Failed(_)))
                        .collect();
                    if failed.is_empty() {
                        break;
                    }
                    backoff.wait(shutdown).await;
                    sink.recreate()?;
                    let retry: Vec<_> = failed.iter().map(|i| records[*i].clone()).collect();
                    for (i, o) in failed.into_iter().zip(sink.send_batch(&retry).await) {
                        sent[i] = o;
                    }
                }
            }
            // Per event, in batch order: what happened.
            let outcomes = outcomes_per_event(&plan, &sent);
            failpoint("after_kafka_ack");
            let handled = handled_prefix(&outcomes);
            let parks = parks_in(&plan, &outcomes, &batch, &records, handled);
            if !parks.is_empty() {
                for p in parks.iter().filter(|p| p.blocked_by.is_none()) {
                    tracing::error!(
                        event_id = %p.event.id,
                        event_type = %p.event.event_type,
                        aggregate_type = %p.event.aggregate_type,
                        reason = %p.reason,
                        "event parked: it cannot be published; its aggregate is held until it is retried or dropped (outbox-relay parked list)"
                    );
                }
                lease.check()?;
                parked.park(&parks).await?;
                self.stats.parked.inc_by(parks.len() as u64);
                self.notify_dead_letters(sink, &parks).await;
            }
            if handled > 0 {
                if !mutant("ack_before_kafka") {
                    lease.check()?;
                    source.acknowledge(&batch[..handled]).await?;
                }
                failpoint("after_source_ack");
                let delivered = outcomes[..handled]
                    .iter()
                    .filter(|o| matches!(o, Outcome::Delivered(_)))
                    .count();
                self.stats.published.inc_by(delivered as u64);
                let now = chrono::Utc::now();
                if delivered > 0 {
                    self.stats
                        .last_published_ms
                        .store(now.timestamp_millis(), Ordering::Relaxed);
                }
                for (e, o) in batch.iter().zip(&outcomes).take(handled) {
                    if let (Outcome::Delivered(_), Some(created)) = (o, e.event.created_at) {
                        self.stats
                            .commit_to_ack
                            .observe((now - created).num_microseconds().unwrap_or(0) as f64 / 1e6);
                    }
                }
            }
            self.stats.batches.inc();
            if tracing::enabled!(tracing::Level::DEBUG) {
                for (e, o) in batch.iter().zip(&outcomes).take(handled) {
                    if let Outcome::Delivered(d) = o {
                        tracing::debug!(event_id = %e.event.id, event_type = %e.event.event_type,
                            partition = d.partition, offset = d.offset, "published");
                    }
                }
            }
            if handled > 0 {
                unlisted_rounds = 0;
            }
            if handled < batch.len() {
                let failed = &batch[handled];
                let error = match &outcomes[handled] {
                    Outcome::Failed(e) | Outcome::Suspect(e) => Some(e.clone()),
                    _ => None,
                };
                let class = match &outcomes[handled] {
                    Outcome::Suspect(_) => ErrorClass::Record,
                    _ => error.as_ref().map_or(ErrorClass::Retry, classify),
                };
                let topic = match &plan[handled] {
                    Plan::Send(i) => records[*i].topic.as_str(),
                    Plan::Park(_) => "",
                };
                let dropped =
                    batch.len() - handled + window.iter().map(|w| w.batch.len()).sum::<usize>();
                if let Some(e) = &error {
                    match class {
                        ErrorClass::Stop(fix) => {
                            return Err(SinkError::refused(topic, e, fix).into());
                        }
                        ErrorClass::Unlisted => {
                            unlisted_rounds += 1;
                            if unlisted_rounds >= UNLISTED_ERROR_ROUNDS {
                                return Err(SinkError::refused(
                                    topic,
                                    e,
                                    format!(
                                        "the relay does not know this error as transient and it persisted over {unlisted_rounds} attempts with nothing delivered: look it up in the brokers' logs, fix the cause, then restart the relay"
                                    ),
                                )
                                .into());
                            }
                        }
                        ErrorClass::Record => {
                            // One at a time: the suspects of this batch (the records of the
                            // refused request). Later batches go back to normal batching.
                            isolate = suspects_from(&outcomes, handled);
                        }
                        ErrorClass::Retry => {}
                    }
                }
                let error = error.map(|e| e.to_string()).unwrap_or_default();
                self.stats.failed.inc_by(dropped as u64);
                if class == ErrorClass::Record {
                    tracing::warn!(
                        event_id = %failed.event.id,
                        event_type = %failed.event.event_type,
                        %error,
                        acknowledged = handled,
                        dropped,
                        "a produce request was refused with a record-level error: sending the events from here one at a time to find the one at fault before parking anything"
                    );
                } else {
                    tracing::warn!(
                        event_id = %failed.event.id,
                        event_type = %failed.event.event_type,
                        %error,
                        acknowledged = handled,
                        dropped,
                        "delivery failed: dropping the in-flight window, recreating the producer and resuming from the first unacknowledged event"
                    );
                    self.stats.kafka_connected.store(false, Ordering::Relaxed);
                }
                window.clear();
                local_blocked.clear();
                source.rewind().await?;
                sink.recreate()?;
                if class != ErrorClass::Record {
                    backoff.wait(shutdown).await;
                }
            } else {
                isolate = isolate.saturating_sub(batch.len());
                self.stats.kafka_connected.store(true, Ordering::Relaxed);
                backoff.reset();
            }
        }
    }

    /// Announces newly parked poison events on the dead-letter topic, when one is configured.
    /// The events are already durably parked; a failure here is only logged.
    async fn notify_dead_letters(&self, sink: &KafkaSink, parks: &[ParkRequest]) {
        let Some(topic) = &self.config.dead_letter_topic else {
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
                    .to_string(),
                ),
                headers: vec![
                    ("id".into(), p.event.id.to_string().into_bytes()),
                    ("eventType".into(), p.event.event_type.clone().into_bytes()),
                    ("outbox-park-reason".into(), p.reason.clone().into_bytes()),
                ],
                timestamp_ms: None,
            })
            .collect();
        for outcome in sink.send_batch(&records).await {
            if !matches!(outcome, Outcome::Delivered(_)) {
                tracing::warn!(topic = %topic, ?outcome, "could not announce a parked event on the dead-letter topic");
            }
        }
    }

    fn spawn_purger(&self, shutdown: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        if self.config.acknowledgement != RowAcknowledgement::Mark
            || self.config.retention.is_zero()
            || self.config.write_mode != WriteMode::Table
        {
            return None;
        }
        let options = self.options.clone();
        let table = self.table.clone();
        let retention = self.config.retention;
        Some(tokio::spawn(async move {
            let every = Duration::from_secs(60).min(retention);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match options.connect().await {
                    Ok(mut conn) => match purge_published(&mut conn, &table, retention).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(rows = n, "purged published outbox rows past retention")
                        }
                        Err(e) => tracing::warn!(error = %e, "purging published rows failed"),
                    },
                    Err(e) => tracing::warn!(error = %e, "purging published rows: cannot connect"),
                }
            }
        }))
    }
}

/// A batch handed to the producer whose outcomes are still awaited.
struct InFlight {
    batch: Vec<SourceEvent>,
    plan: Vec<Plan>,
    records: Vec<OutboundRecord>,
    pending: Pending,
    started: std::time::Instant,
    /// Payload bytes of the batch (for `max_in_flight_bytes`).
    bytes: usize,
}
