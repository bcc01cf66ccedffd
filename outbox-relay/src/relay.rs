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

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outbox_core::{OutboxTable, WriteMode};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, RelayConfig, RowAcknowledgement, SourceKind, redact_url};
use crate::failure::{Action, ErrorKind, Report, decide};
use crate::leader::{Leadership, Lease, LeaseLost, Sharding};
use crate::park::{ParkError, ParkStore};
use crate::route::{RouteError, Router};
use crate::sink::select::SharedClient;
use crate::sink::{Sink, SinkError};
use crate::source::polling::{PollingSettings, PollingSource};
use crate::source::{Source, SourceError};
use crate::stats::RelayStats;
use crate::table::purge_published;
use backoff::Backoff;
use budget::SharedSessions;
use pump::{Pump, Rounds};

mod backoff;
pub mod budget;
pub mod group;
mod plan;
mod pump;

pub use group::RelayGroup;

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
    /// The broker could not be reached, its client could not be built, or it refuses the
    /// records until an operator acts.
    #[error(transparent)]
    Sink(#[from] SinkError),
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
    /// One table's pipeline of a multi-table relay stopped on this error ([`RelayGroup`]).
    #[error("outbox table {table}")]
    Table {
        /// The table, as configured.
        table: String,
        /// Why its pipeline stopped.
        #[source]
        error: Box<RelayError>,
    },
}

impl RelayError {
    /// What kind of failure this is: the input of the relay's one error policy
    /// ([`crate::failure::decide`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            RelayError::Config(_) | RelayError::Route(_) => ErrorKind::Config,
            RelayError::Database { .. } => ErrorKind::Unavailable,
            RelayError::NotReady(_) => ErrorKind::Setup,
            RelayError::Sink(e) => e.kind(),
            RelayError::Source(e) => e.kind(),
            RelayError::Park(e) => e.kind(),
            RelayError::LeaseLost(_) => ErrorKind::LeaseLost,
            RelayError::Table { error, .. } => error.kind(),
        }
    }

    /// The process exit code for this error: 2 for configuration problems, 1 otherwise
    /// ([`ErrorKind::exit_code`]).
    pub fn exit_code(&self) -> i32 {
        self.kind().exit_code()
    }
}

/// `database_url` parsed into connection options, or a configuration error naming the key (the
/// URL redacted).
fn connect_options(config: &RelayConfig) -> Result<PgConnectOptions, ConfigError> {
    PgConnectOptions::from_str(config.database_url.expose()).map_err(|e| {
        ConfigError::new(
            "database_url",
            format!("`{}`: {e}", redact_url(config.database_url.expose())),
        )
    })
}

/// One connection to PostgreSQL, given up after `connect_timeout`; the errors name the (redacted)
/// URL.
async fn connect(
    config: &RelayConfig,
    options: &PgConnectOptions,
) -> Result<sqlx::PgConnection, RelayError> {
    let url = redact_url(config.database_url.expose());
    tokio::time::timeout(config.connect_timeout, options.connect())
        .await
        .map_err(|_| {
            RelayError::NotReady(format!(
                "cannot connect to PostgreSQL at {url}: no answer within {}",
                crate::config::duration::format(&config.connect_timeout)
            ))
        })?
        .map_err(|error| RelayError::Database {
            context: format!("cannot connect to PostgreSQL at {url}"),
            error,
        })
}

/// A configured relay. See the [module docs](self).
pub struct Relay {
    config: RelayConfig,
    table: OutboxTable,
    router: Router,
    options: PgConnectOptions,
    stats: Arc<RelayStats>,
    /// The sessions shared with the group's other tables; a single-table relay makes its own
    /// when it starts.
    shared: Option<SharedSessions>,
    /// The broker client shared with the group's other tables, if the sink can share one.
    shared_sink: SharedClient,
    /// A table of a multi-table logical group: its share of the group's slot.
    feed: Option<Arc<crate::source::logical::multi::Feed>>,
}

impl Relay {
    /// Validates the configuration; nothing is connected yet.
    pub fn new(config: RelayConfig) -> Result<Self, RelayError> {
        let table = config.validate()?;
        let router = config.router()?;
        let options = connect_options(&config)?;
        Ok(Self {
            config,
            table,
            router,
            options,
            stats: Arc::new(RelayStats::default()),
            shared: None,
            shared_sink: SharedClient::None,
            feed: None,
        })
    }

    /// A relay of one table of a group, acknowledging on the group's pool and woken by its
    /// listener ([`budget`]), producing through the group's client `sink` (when the sink can
    /// share one, see [`SharedClient`]).
    pub fn sharing(
        config: RelayConfig,
        shared: SharedSessions,
        sink: SharedClient,
    ) -> Result<Self, RelayError> {
        let mut relay = Self::new(config)?;
        relay.shared = Some(shared);
        relay.shared_sink = sink;
        Ok(relay)
    }

    /// Reads this table's events from `feed`, its share of a multi-table group's slot, instead
    /// of a slot of its own (`source = "logical"`).
    pub(crate) fn with_feed(mut self, feed: Arc<crate::source::logical::multi::Feed>) -> Self {
        self.feed = Some(feed);
        self
    }

    /// The relay's live counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Checks that PostgreSQL is reachable and the outbox is set up, and that the broker answers.
    ///
    /// A table of a group checks on a session of the group's pool (its tables start together,
    /// and would otherwise open one more session each); a single-table relay on a session of its
    /// own.
    async fn preflight(&self) -> Result<Box<dyn Sink>, RelayError> {
        match &self.shared {
            Some(shared) => {
                let url = redact_url(self.config.database_url.expose());
                let mut conn =
                    tokio::time::timeout(self.config.connect_timeout, shared.pool().acquire())
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
                self.check_table(&mut conn).await?;
            }
            None => {
                let mut conn = connect(&self.config, &self.options).await?;
                self.check_table(&mut conn).await?;
                let _ = conn.close().await;
            }
        }
        let sink = crate::sink::select::from_config_sharing(&self.config, &self.shared_sink)?;
        sink.check_connection().await?;
        Ok(sink)
    }

    /// That the outbox table exists and is migrated (unless events are logical messages).
    async fn check_table(&self, conn: &mut sqlx::PgConnection) -> Result<(), RelayError> {
        let url = redact_url(self.config.database_url.expose());
        if self.config.write_mode != WriteMode::LogicalMessage {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(self.table.qualified())
                .fetch_one(&mut *conn)
                .await
                .map_err(|error| RelayError::Database {
                    context: "cannot look up the outbox table".into(),
                    error,
                })?;
            let version = outbox_core::schema_version(&mut *conn, &self.table)
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
                    "the outbox table's schema is older than this relay's: run `outbox-relay migrate` (until then malformed rows may not be refused at write time, and an older table keeps its per-transaction NOTIFY trigger, which slows the writers)"
                );
            }
        }
        Ok(())
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
            let config = Arc::new(self.config.clone());
            let tables = crate::admin::AdminTables::single(crate::admin::AdminTable {
                table: self.table.clone(),
                config: config.clone(),
                stats: self.stats.clone(),
                stopped: None,
            });
            crate::admin::serve(addr, config, tables, &self.options, shutdown.clone())
                .await
                .map_err(|e| {
                    RelayError::Config(ConfigError::new(
                        "admin_addr",
                        format!("cannot listen on {addr}: {e}"),
                    ))
                })?;
        }
        let shared = match &self.shared {
            Some(shared) => shared.clone(),
            None => SharedSessions::single(&self.options, self.config.pool_size),
        };
        let mut sink = self.preflight().await?;
        self.stats.sink_connected.store(true, Ordering::Relaxed);
        tracing::info!(
            source = ?self.config.source,
            sink = sink.kind().name(),
            table = %self.table,
            topic = self.router_template(),
            "relay started"
        );
        let purger = self.spawn_purger(shared.pool().clone(), shutdown.clone());
        let broker_watch = sink.watch(self.stats.clone(), shutdown.clone())?;
        let mut backoff = Backoff::new();
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            let sharding = self.config.shards.map(|count| Sharding {
                count,
                owned: self.stats.shards_owned.clone(),
            });
            let leader = match Leadership::acquire_sharded(
                &self.options,
                &self.table,
                self.config.standby_interval,
                self.config.leader_lease,
                sharding,
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
            let outcome = match self.open_source(leader, &shared).await {
                Ok(mut source) => {
                    self.stats.source_running.store(true, Ordering::Relaxed);
                    source.limit_batch_bytes(self.batch_bytes());
                    let pump = Pump {
                        relay: &self,
                        source: source.as_mut(),
                        parked: &mut parked,
                        sink: sink.as_mut(),
                        shutdown: &shutdown,
                        backoff: &mut backoff,
                        lease: &lease,
                        rounds: Rounds::default(),
                    };
                    let outcome = pump.run().await;
                    if outcome.is_err() {
                        // The source (and with it the leader lock) is dropped at the end of this
                        // block: first make sure nothing of the abandoned window can still reach
                        // Kafka after another relay — or this one, after a rewind — resumes from
                        // the durable position.
                        self.fence_producer(sink.as_mut(), &lease).await?;
                    }
                    outcome
                }
                Err(e) => Err(RelayError::Source(e)),
            };
            self.stats.source_running.store(false, Ordering::Relaxed);
            self.stats.active.store(false, Ordering::Relaxed);
            let Err(e) = outcome else { break Ok(()) };
            match decide(e.kind(), lease.check().is_ok()) {
                Action::StepDown => self.step_down(sink.as_mut(), &lease, &e).await?,
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
        if let Some(w) = broker_watch {
            w.abort();
        }
        match &result {
            Ok(()) => tracing::info!(published = self.stats.published.get(), "relay stopped"),
            Err(e) => tracing::error!(error = %Report(e), "relay failed"),
        }
        result
    }

    /// After the lease was lost: drops every record still queued in the producer (purge, then a
    /// fresh producer) and goes back to standby; the next leader resumes from the first
    /// unacknowledged event.
    async fn step_down(
        &self,
        sink: &mut dyn Sink,
        lease: &Lease,
        cause: &RelayError,
    ) -> Result<(), RelayError> {
        // `run` fenced the producer before the source and its lock went; nothing is left.
        let purged = sink.purge();
        sink.recreate().await?;
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
    async fn fence_producer(&self, sink: &mut dyn Sink, lease: &Lease) -> Result<(), RelayError> {
        let wait = lease
            .remaining()
            .min(sink.delivery_timeout())
            .min(Duration::from_secs(5));
        let fenced = sink.fence(wait).await;
        sink.recreate().await?;
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

    async fn open_source(
        &self,
        leader: Leadership,
        shared: &SharedSessions,
    ) -> Result<Box<dyn Source>, SourceError> {
        match self.config.source {
            SourceKind::Polling => Ok(Box::new(
                PollingSource::sharing(
                    PollingSettings {
                        table: self.table.clone(),
                        acknowledgement: self.config.acknowledgement,
                        poll_interval: self.config.poll_interval,
                        listen: self.config.listen,
                    },
                    leader,
                    &self.options,
                    shared.marks(),
                    shared.wakeups(),
                )
                .await?,
            )),
            SourceKind::Logical if self.feed.is_some() => {
                use crate::source::logical::multi::{FeedMarks, FeedSource};
                let marks = (self.config.write_mode == WriteMode::Table).then(|| FeedMarks {
                    pool: shared.pool().clone(),
                    table: self.table.clone(),
                    how: self.config.acknowledgement,
                });
                let feed = self.feed.clone().expect("checked");
                Ok(Box::new(FeedSource::open(feed, Some(leader), marks)))
            }
            SourceKind::Logical => {
                use crate::source::logical::{LogicalConfig, LogicalSource};
                let cfg = LogicalConfig::from_relay(&self.config, self.table.clone())?;
                Ok(Box::new(
                    LogicalSource::open(cfg, Some(leader), self.stats.logical.clone()).await?,
                ))
            }
        }
    }

    /// Purges published rows past `retention` every minute, on a session of `pool`.
    fn spawn_purger(
        &self,
        pool: sqlx::PgPool,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.config.acknowledgement != RowAcknowledgement::Mark
            || self.config.retention.is_zero()
            || self.config.write_mode != WriteMode::Table
        {
            return None;
        }
        let table = self.table.clone();
        let retention = self.config.retention;
        Some(tokio::spawn(async move {
            let every = Duration::from_secs(60).min(retention);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match pool.acquire().await {
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
