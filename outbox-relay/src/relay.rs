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
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use outbox_core::{OutboxTable, WriteMode};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use crate::ack::delivered_prefix;
use crate::config::{ConfigError, RelayConfig, SourceKind, redact_url};
use crate::leader::Leadership;
use crate::route::{RouteError, Router};
use crate::sink::kafka::{KafkaSink, SinkError};
use crate::source::polling::{PollingSettings, PollingSource, RowAcknowledgement, purge_published};
use crate::source::{Source, SourceError};

/// Why the relay stopped (other than a requested shutdown).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// PostgreSQL could not be reached at start-up, or the outbox is not set up.
    #[error("{context}: {error}")]
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
    /// An event cannot be routed (illegal topic name).
    #[error(transparent)]
    Route(#[from] RouteError),
}

impl RelayError {
    /// The process exit code for this error: 2 for configuration problems, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RelayError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Counters the relay keeps while it runs (read by status and metrics).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events Kafka acknowledged and the source recorded.
    pub published: AtomicU64,
    /// Records that failed to be delivered (and were retried).
    pub failed: AtomicU64,
    /// Completed rounds.
    pub batches: AtomicU64,
    /// Unix time in milliseconds of the last acknowledged event, 0 before the first.
    pub last_published_ms: AtomicI64,
    /// Whether this instance holds the leader lock.
    pub active: AtomicBool,
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
        }
        let _ = conn.close().await;
        let sink = KafkaSink::new(self.config.kafka.clone())?;
        sink.check_connection().await?;
        Ok(sink)
    }

    /// Runs until `shutdown` is cancelled (then drains the batch in flight, acknowledges it and
    /// returns `Ok`) or until a failure that retrying cannot fix.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let mut sink = self.preflight().await?;
        tracing::info!(
            source = ?self.config.source,
            table = %self.table,
            topic = self.router_template(),
            "relay started"
        );
        let purger = self.spawn_purger(shutdown.clone());
        let mut backoff = Backoff::new();
        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            let leader = match Leadership::acquire(
                &self.options,
                &self.table,
                self.config.standby_interval,
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
            let outcome = match self.open_source(leader).await {
                Ok(mut source) => {
                    self.pump(source.as_mut(), &mut sink, &shutdown, &mut backoff)
                        .await
                }
                Err(e) => Err(RelayError::Source(e)),
            };
            self.stats.active.store(false, Ordering::Relaxed);
            match outcome {
                Ok(()) => break Ok(()),
                Err(RelayError::Source(e)) if e.is_retryable() => {
                    tracing::warn!(error = %e, "source interrupted; resuming from the last acknowledged position");
                    backoff.wait(&shutdown).await;
                }
                Err(e) => break Err(e),
            }
        };
        if let Some(p) = purger {
            p.abort();
        }
        match &result {
            Ok(()) => tracing::info!(
                published = self.stats.published.load(Ordering::Relaxed),
                "relay stopped"
            ),
            Err(e) => tracing::error!(error = %e, "relay failed"),
        }
        result
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
                Ok(Box::new(LogicalSource::open(cfg, Some(leader)).await?))
            }
        }
    }

    /// Rounds of claim → produce → acknowledge until shutdown or an error.
    async fn pump(
        &self,
        source: &mut dyn Source,
        sink: &mut KafkaSink,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), RelayError> {
        loop {
            let batch = source.next_batch(self.config.batch_size, shutdown).await?;
            if batch.is_empty() {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            let records = batch
                .iter()
                .map(|e| self.router.route(&e.event))
                .collect::<Result<Vec<_>, _>>()?;
            let outcomes = sink.send_batch(&records).await;
            let delivered = delivered_prefix(&outcomes);
            if delivered > 0 {
                source.acknowledge(&batch[..delivered]).await?;
                self.stats
                    .published
                    .fetch_add(delivered as u64, Ordering::Relaxed);
                self.stats
                    .last_published_ms
                    .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
            }
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            if tracing::enabled!(tracing::Level::DEBUG) {
                for (e, o) in batch.iter().zip(&outcomes).take(delivered) {
                    if let Ok(d) = o {
                        tracing::debug!(event_id = %e.event.id, event_type = %e.event.event_type,
                            partition = d.partition, offset = d.offset, "published");
                    }
                }
            }
            if delivered < batch.len() {
                let failed = &batch[delivered];
                let error = outcomes[delivered]
                    .as_ref()
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                self.stats
                    .failed
                    .fetch_add((batch.len() - delivered) as u64, Ordering::Relaxed);
                tracing::warn!(
                    event_id = %failed.event.id,
                    event_type = %failed.event.event_type,
                    %error,
                    acknowledged = delivered,
                    dropped = batch.len() - delivered,
                    "delivery failed: recreating the producer and resuming from the first unacknowledged event"
                );
                source.rewind().await?;
                sink.recreate()?;
                backoff.wait(shutdown).await;
            } else {
                backoff.reset();
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

/// Exponential backoff between retries, 200 ms doubling to 30 s, cut short by shutdown.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: Duration::from_millis(200),
        }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(200);
    }

    async fn wait(&mut self, shutdown: &CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(self.next) => {}
        }
        self.next = (self.next * 2).min(Duration::from_secs(30));
    }
}
