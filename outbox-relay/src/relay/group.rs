//! Many outbox tables in one relay process: one pipeline per table, under one shutdown and one
//! admin endpoint.
//!
//! Each table's pipeline is a whole [`Relay`] — its own leader lock (the per-table advisory
//! lock, on a session of its own that also runs the table's claims), source, routing, write
//! mode and purger — running as its own tokio task. What the pipelines share
//! ([`super::budget`]): one pool of `pool_size` sessions for every table's row acknowledgements
//! and purges, one `LISTEN` session, and, for Kafka, one producer
//! ([`crate::sink::kafka::SharedProducer`]). A table with a large backlog cannot starve another:
//! its claims run on its own lock session, it holds at most half of the pool at a time and the
//! pool serves the waiting tables in turn, and its records wait in the producer's queue beside
//! the others' rather than ahead of them.
//!
//! Tables come from `[[outbox]]` sections and from the `tables` pattern, which is matched again
//! every `tables_rescan_interval`: a new migrated table (one with an outbox schema version)
//! starts relaying without a restart; a table that no longer matches (dropped, or its schema
//! renamed) has its pipeline stopped gracefully — drained like at shutdown — and logged. A table
//! both listed and matched is relayed once, with its `[[outbox]]` settings.
//!
//! Failure policy: a pipeline that stops on an error retrying cannot fix (the same errors that
//! stop a single-table relay, see [`crate::failure`]) stops the process: the other pipelines are
//! drained (their in-flight windows acknowledged, as at SIGTERM), then [`RelayGroup::run`]
//! returns [`RelayError::Table`] naming the table, and the process exits with that error's code.
//! Until then `/readyz` names the table. Exception: a pattern table whose pipeline failed because
//! the table is gone is only logged. Transient failures (PostgreSQL or the broker unreachable)
//! are retried inside the pipeline, as for a single table, and stop nothing.
//!
//! Failures stay per table with one producer: a pipeline that fails waits until its own records
//! are answered (rather than replacing the producer) before it re-sends or releases its leader
//! lock; only when they stay unanswered (a broker out of reach) does it drop the producer's
//! queue, and the other tables then re-send their queued records in order too (see
//! [`crate::sink::kafka`]). NATS and Redis share one connection the same way (one failure
//! replaces it once; [`crate::sink::shared`]); RabbitMQ shares one connection with a confirm
//! channel per table, replaced only when it is dead ([`crate::sink::rabbitmq`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use outbox_core::OutboxTable;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::budget::SharedSessions;
use super::{Relay, RelayError};
use crate::admin::{AdminTable, AdminTables};
use crate::config::{ConfigError, RelayConfig, SourceKind, TablePattern};
use crate::failure::Report;
use crate::sink::select::SharedClient;
use crate::source::logical::multi::Feed;
use crate::stats::LogicalMetrics;
use crate::table::matching_tables;

mod logical;

/// A configured relay of one or many tables. See the [module docs](self).
///
/// With neither `[[outbox]]` nor `tables` it is exactly a single-table [`Relay`].
pub struct RelayGroup {
    config: RelayConfig,
    listed: Vec<RelayConfig>,
    pattern: Option<TablePattern>,
    options: PgConnectOptions,
}

/// A pipeline this group started and has not seen end.
struct Running {
    /// The table's name as configured (the key of the admin endpoint and the metrics label).
    name: String,
    /// Cancelled to stop this pipeline alone.
    stop: CancellationToken,
    /// Whether the pattern found it (it may disappear) rather than an `[[outbox]]` section.
    from_pattern: bool,
}

/// Makes a table's [`Feed`] of the group's slot, counting into the given figures (its
/// pipeline's [`crate::stats::RelayStats::logical`]).
type MakeFeed<'a> = &'a dyn Fn(Arc<LogicalMetrics>) -> Arc<Feed>;

/// What a pipeline task returns: its resolved table and how it ended.
type Ended = (String, Result<(), RelayError>);

impl RelayGroup {
    /// Validates the configuration (every table's too); nothing is connected yet.
    pub fn new(config: RelayConfig) -> Result<Self, RelayError> {
        config.validate()?;
        let listed = if config.is_multi_table() {
            config.listed_tables()?
        } else {
            Vec::new()
        };
        let pattern = config.table_pattern()?;
        let options = super::connect_options(&config)?;
        Ok(Self {
            config,
            listed,
            pattern,
            options,
        })
    }

    /// Runs every table's pipeline until `shutdown` is cancelled (then drains them all and
    /// returns `Ok`) or until one stops on an unrecoverable error (then drains the others and
    /// returns it as [`RelayError::Table`]). A single-table configuration runs [`Relay::run`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        if !self.config.is_multi_table() {
            return Relay::new(self.config)?.run(shutdown).await;
        }
        let mut group = Group {
            config: &self.config,
            tables: match self.config.source {
                // The slot's figures outlive its openings: one set for the relay's life.
                SourceKind::Logical => AdminTables::multi_logical(Arc::default()),
                SourceKind::Polling => AdminTables::multi(),
            },
            running: BTreeMap::new(),
            tasks: JoinSet::new(),
            stop_all: shutdown.child_token(),
            admin_stop: CancellationToken::new(),
            shared: SharedSessions::group(&self.options, self.config.pool_size),
            sink: SharedClient::for_config(&self.config)?,
        };
        let result = match self.config.source {
            SourceKind::Logical => group.run_logical(&self, &shutdown).await,
            SourceKind::Polling => group.run(&self, &shutdown).await,
        };
        group.stop_all.cancel();
        while let Some(joined) = group.tasks.join_next().await {
            let (key, outcome) = flatten(joined);
            let name = group.running.remove(&key).map_or(key, |r| r.name);
            if let Err(e) = outcome {
                tracing::error!(table = %name, error = %Report(&e), "pipeline failed while the relay was stopping");
            }
        }
        group.admin_stop.cancel();
        match &result {
            Ok(()) => tracing::info!("every table's pipeline stopped"),
            Err(e) => {
                tracing::error!(error = %Report(e), "relay stopped: a table's pipeline failed")
            }
        }
        result
    }

    async fn connect(&self) -> Result<PgConnection, RelayError> {
        super::connect(&self.config, &self.options).await
    }
}

/// The running state of a multi-table relay.
struct Group<'a> {
    config: &'a RelayConfig,
    tables: Arc<AdminTables>,
    /// By resolved `schema.table`.
    running: BTreeMap<String, Running>,
    tasks: JoinSet<Ended>,
    /// Parent of every pipeline's token: cancelled to drain them all.
    stop_all: CancellationToken,
    /// Stops the admin endpoint once every pipeline ended (so `/readyz` names a failed table
    /// while the others drain).
    admin_stop: CancellationToken,
    /// The sessions every table's pipeline shares ([`super::budget`]).
    shared: SharedSessions,
    /// The broker client every table's pipeline shares (Kafka: one producer).
    sink: SharedClient,
}

impl Group<'_> {
    async fn run(
        &mut self,
        relay: &RelayGroup,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        self.serve_admin(relay).await?;
        let mut conn = relay.connect().await?;
        for (i, cfg) in relay.listed.iter().enumerate() {
            let key = resolved_name(&mut conn, &cfg.table).await?;
            if let Some(other) = self.running.get(&key) {
                return Err(already_listed(i, cfg, &key, &other.name).into());
            }
            self.start(key, cfg.clone(), false, None)?;
        }
        if let Some(pattern) = &relay.pattern {
            let found = matching(&mut conn, pattern).await?;
            let new: Vec<_> = found
                .into_iter()
                .filter(|t| !self.running.contains_key(t))
                .collect();
            if self.running.len() + new.len() > self.config.max_tables {
                return Err(too_many(self.config, self.running.len() + new.len(), pattern).into());
            }
            for key in new {
                self.start_matched(key, None)?;
            }
            tracing::info!(
                pattern = %pattern,
                tables = self.running.len(),
                every = %crate::config::duration::format(&self.config.tables_rescan_interval),
                "relaying the tables matching the pattern; matching it again periodically"
            );
        }
        let _ = conn.close().await;
        let mut rescan = tokio::time::interval(self.config.tables_rescan_interval);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                Some(joined) = self.tasks.join_next() => {
                    let (key, outcome) = flatten(joined);
                    self.ended(relay, key, outcome).await?;
                }
                _ = rescan.tick(), if relay.pattern.is_some() => {
                    if let Some(pattern) = &relay.pattern {
                        self.rescan(relay, pattern).await;
                    }
                }
            }
        }
    }

    /// Serves the admin endpoint, if configured, until `admin_stop`.
    async fn serve_admin(&self, relay: &RelayGroup) -> Result<(), RelayError> {
        if let Some(addr) = self.config.admin_addr {
            crate::admin::serve(
                addr,
                Arc::new(self.config.clone()),
                self.tables.clone(),
                &relay.options,
                self.admin_stop.clone(),
            )
            .await
            .map_err(|e| {
                RelayError::Config(ConfigError::new(
                    "admin_addr",
                    format!("cannot listen on {addr}: {e}"),
                ))
            })?;
        }
        Ok(())
    }

    /// Starts the pipeline of a table the pattern found.
    fn start_matched(&mut self, key: String, feed: Option<MakeFeed<'_>>) -> Result<(), RelayError> {
        let cfg = self.matched_config(&key)?;
        self.start(key, cfg, true, feed)
    }

    /// The configuration of a table the pattern found.
    fn matched_config(&self, key: &str) -> Result<RelayConfig, RelayError> {
        let table =
            OutboxTable::parse(key).map_err(|e| ConfigError::new("tables", e.to_string()))?;
        Ok(self.config.pattern_table_config(&table)?)
    }

    /// Starts a table's pipeline; with `feed`, it reads its share of the group's slot (the feed
    /// made for it counts into the pipeline's figures).
    fn start(
        &mut self,
        key: String,
        cfg: RelayConfig,
        from_pattern: bool,
        feed: Option<MakeFeed<'_>>,
    ) -> Result<(), RelayError> {
        let table =
            OutboxTable::parse(&cfg.table).map_err(|e| ConfigError::new("table", e.to_string()))?;
        let name = cfg.table.clone();
        let mut relay = Relay::sharing(cfg.clone(), self.shared.clone(), self.sink.clone())?;
        if let Some(make) = feed {
            let feed = make(relay.stats().logical.clone());
            relay = relay.with_feed(feed);
        }
        self.tables.insert(AdminTable {
            table,
            config: Arc::new(cfg),
            stats: relay.stats(),
            stopped: None,
        });
        let stop = self.stop_all.child_token();
        let token = stop.clone();
        let task_key = key.clone();
        self.tasks.spawn(async move {
            use futures::FutureExt;
            // A panic ends this table's pipeline like an error that stops it.
            let outcome = std::panic::AssertUnwindSafe(relay.run(token))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    Err(RelayError::NotReady(
                        "the pipeline task panicked (see the log above)".into(),
                    ))
                });
            (task_key, outcome)
        });
        tracing::info!(table = %name, "pipeline started");
        self.running.insert(
            key,
            Running {
                name,
                stop,
                from_pattern,
            },
        );
        Ok(())
    }

    /// A pipeline ended: forget it if it was stopped on purpose or its pattern table is gone;
    /// otherwise its error stops the relay.
    async fn ended(
        &mut self,
        relay: &RelayGroup,
        key: String,
        outcome: Result<(), RelayError>,
    ) -> Result<(), RelayError> {
        let Some(running) = self.running.remove(&key) else {
            return outcome;
        };
        let error = match outcome {
            Ok(()) => {
                self.tables.remove(&running.name);
                tracing::info!(table = %running.name, "pipeline stopped");
                return Ok(());
            }
            Err(e) => e,
        };
        if running.from_pattern
            && let Some(pattern) = &relay.pattern
            && let Ok(mut conn) = relay.connect().await
            && let Ok(found) = matching_tables(&mut conn, pattern).await
            && !found.contains(&key)
        {
            self.tables.remove(&running.name);
            tracing::info!(table = %running.name, error = %Report(&error), "the table no longer matches the pattern (dropped?); its pipeline stopped");
            return Ok(());
        }
        self.tables
            .set_stopped(&running.name, Report(&error).to_string());
        tracing::error!(
            table = %running.name,
            error = %Report(&error),
            "a table's pipeline stopped on an error retrying cannot fix: draining the other tables' pipelines, then stopping the relay"
        );
        Err(RelayError::Table {
            table: running.name,
            error: Box::new(error),
        })
    }

    /// Matches the pattern again: starts the new tables, stops the pipelines of the vanished ones.
    async fn rescan(&mut self, relay: &RelayGroup, pattern: &TablePattern) {
        let found = match relay.connect().await {
            Ok(mut conn) => {
                let found = matching_tables(&mut conn, pattern).await;
                let _ = conn.close().await;
                found
            }
            Err(e) => {
                tracing::warn!(pattern = %pattern, error = %Report(&e), "cannot match the table pattern again; keeping the current tables");
                return;
            }
        };
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(pattern = %pattern, error = %e, "cannot match the table pattern again; keeping the current tables");
                return;
            }
        };
        for (key, running) in &self.running {
            if running.from_pattern && !found.contains(key) && !running.stop.is_cancelled() {
                tracing::info!(table = %running.name, "the table no longer matches the pattern (dropped?): stopping its pipeline");
                running.stop.cancel();
            }
        }
        let new: Vec<String> = found
            .into_iter()
            .filter(|t| !self.running.contains_key(t))
            .collect();
        let room = self.config.max_tables.saturating_sub(self.running.len());
        if new.len() > room {
            let e = too_many(self.config, self.running.len() + new.len(), pattern);
            tracing::error!(error = %e, skipped = new.len() - room, "not relaying the tables beyond max_tables");
        }
        for key in new.into_iter().take(room) {
            if let Err(e) = self.start_matched(key.clone(), None) {
                tracing::error!(table = %key, error = %Report(&e), "cannot start the pipeline of a new table");
            }
        }
    }
}

/// The error of an `[[outbox]]` entry naming a table listed already.
fn already_listed(i: usize, cfg: &RelayConfig, key: &str, other: &str) -> ConfigError {
    ConfigError::new(
        format!("outbox[{i}].table"),
        format!(
            "`{}` is the table `{key}`, already listed as `{other}`",
            cfg.table
        ),
    )
}

/// The tables matching `pattern` now.
async fn matching(
    conn: &mut PgConnection,
    pattern: &TablePattern,
) -> Result<Vec<String>, RelayError> {
    matching_tables(conn, pattern)
        .await
        .map_err(|error| RelayError::Database {
            context: format!("cannot look up the tables matching `{pattern}`"),
            error,
        })
}

fn too_many(config: &RelayConfig, count: usize, pattern: &TablePattern) -> ConfigError {
    ConfigError::new(
        "max_tables",
        format!(
            "{count} tables ([[outbox]] sections and matches of `{pattern}`) exceed max_tables = {} \
             (it bounds the `table` label of every metric and the database sessions the relay \
             holds): raise max_tables, narrow `tables`, or split the tables over several relays",
            config.max_tables
        ),
    )
}

fn flatten(joined: Result<Ended, tokio::task::JoinError>) -> Ended {
    match joined {
        Ok(ended) => ended,
        // Every task returns its key; a panicked one lost it, and the panic is the error.
        Err(e) => (
            String::new(),
            Err(RelayError::NotReady(format!("a pipeline task failed: {e}"))),
        ),
    }
}

/// `schema.table` as PostgreSQL resolves the configured name.
async fn resolved_name(conn: &mut PgConnection, configured: &str) -> Result<String, RelayError> {
    let table =
        OutboxTable::parse(configured).map_err(|e| ConfigError::new("table", e.to_string()))?;
    let resolved = table
        .resolve(conn)
        .await
        .map_err(|error| RelayError::Database {
            context: format!("cannot resolve the outbox table {configured}"),
            error,
        })?;
    Ok(crate::table::display_name(&resolved))
}
