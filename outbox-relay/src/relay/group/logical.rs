//! The multi-table group with `source = "logical"`: one replication slot and one publication
//! for every table, read by one [`Hub`] that hands each table's events to that table's pipeline
//! ([`crate::source::logical::multi`]).
//!
//! **Leadership: the slot is the unit.** The group first takes one leader lock for the slot
//! (an advisory lock on the name `outbox_relay_slot.<slot>`, with the same lease and fencing as a
//! table's); only the process holding it opens the slot and starts the tables' pipelines. Each
//! pipeline then takes its table's own lock as in a polling group — uncontended, since only the
//! slot's leader runs pipelines — which fences its row marks and parks. A standby relay with the
//! same configuration waits for the slot's lock and starts everything when it gets it.
//!
//! **A generation** is one opening of the slot with its pipelines. A failure of the slot's reader
//! that retrying can fix (PostgreSQL restarted, the replication session broke) or a lost slot
//! lease ends the generation: the pipelines are drained and stopped, and the next generation
//! streams again from the slot's confirmed position (duplicates bounded by the window). A table
//! whose pipeline fails for good, a table that is dropped, leaves the publication or no longer
//! matches the pattern stops the relay with [`RelayError::Table`] naming it.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{OutboxTable, WriteMode};
use tokio_util::sync::CancellationToken;

use super::{Group, RelayGroup, already_listed, flatten, matching, resolved_name, too_many};
use crate::config::RelayConfig;
use crate::failure::{ErrorKind, Report};
use crate::leader::Leadership;
use crate::relay::RelayError;
use crate::relay::backoff::Backoff;
use crate::source::SourceError;
use crate::source::logical::multi::{Hub, HubHandle, TableRegistry};
use crate::source::logical::{LogicalConfig, LogicalError, LogicalSource};
use crate::stats::LogicalMetrics;

/// How often the slot's lease is checked between the re-scans.
const LEASE_CHECK: Duration = Duration::from_secs(1);

/// A table of the group: its resolved key and configuration.
struct Entry {
    key: String,
    cfg: RelayConfig,
    from_pattern: bool,
}

impl Group<'_> {
    /// Runs generations of the slot and its pipelines until `shutdown` (then `Ok`) or an error
    /// retrying cannot fix.
    pub(super) async fn run_logical(
        &mut self,
        relay: &RelayGroup,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        self.serve_admin(relay).await?;
        let lock = slot_lock(self.config)?;
        let mut backoff = Backoff::new();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let leader = match Leadership::acquire(
                &relay.options,
                &lock,
                self.config.standby_interval,
                self.config.leader_lease,
                shutdown,
            )
            .await
            {
                Ok(Some(l)) => l,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach PostgreSQL for the slot's leader lock; retrying");
                    backoff.wait(shutdown).await;
                    continue;
                }
            };
            tracing::info!(slot = %self.config.logical.slot, "holding the slot's leader lock: opening the slot for every table");
            let outcome = self.generation(relay, &leader, shutdown).await;
            drop(leader);
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) if retryable(&e) => {
                    tracing::warn!(error = %Report(&e), "the slot's reader stopped; every table resumes from the slot's confirmed position");
                    backoff.wait(shutdown).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One opening of the slot: its hub and every table's pipeline, until `shutdown`, a failure
    /// or a lost lease; everything is drained and stopped before it returns.
    async fn generation(
        &mut self,
        relay: &RelayGroup,
        leader: &Leadership,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let entries = loop {
            let entries = self.resolve(relay).await?;
            if !entries.is_empty() {
                break entries;
            }
            tracing::info!(pattern = ?self.config.tables, "no table matches yet; matching again after tables_rescan_interval");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.config.tables_rescan_interval) => {}
            }
        };
        let metrics = self.tables.slot_metrics().unwrap_or_default();
        let source = open_slot(self.config, &entries, metrics).await?;
        let max_window = self.config.batch_size.max(1)
            * (self.config.max_in_flight_batches.max(1) + 1)
            * entries.len().min(16);
        let (hub, handle) = Hub::new(source, self.config.batch_size, max_window);
        let registry = hub.registry();
        let hub_stop = CancellationToken::new();
        let mut hub_task = tokio::spawn(hub.run(hub_stop.clone()));
        self.stop_all = shutdown.child_token();
        let mut started = Ok(());
        for (tag, e) in entries.into_iter().enumerate() {
            // Every generation backfills its `table`-mode tables (after the slot was opened):
            // rows committed before a table joined the stream, or re-published by a generation
            // that ended before they were acknowledged, are unpublished and only there.
            let backfill = backfill_of(&e.cfg, &e.key)?;
            let feed =
                |counts: Arc<LogicalMetrics>| handle.feed(tag as u16, backfill.clone(), counts);
            if let Err(err) = self.start(e.key, e.cfg, e.from_pattern, Some(&feed)) {
                started = Err(err);
                break;
            }
        }
        let result = match started {
            Ok(()) => {
                self.watch(relay, leader, &registry, &handle, &mut hub_task, shutdown)
                    .await
            }
            Err(e) => Err(e),
        };
        // Drain: the pipelines first (their last acknowledgements reach the hub), then the hub,
        // which makes the confirmed position durable.
        self.stop_all.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            let (key, outcome) = flatten(joined);
            let name = self.running.remove(&key).map_or(key, |r| r.name);
            match outcome {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(table = %name, error = %Report(&e), "pipeline failed while the slot's pipelines were stopping")
                }
            }
        }
        hub_stop.cancel();
        if !hub_task.is_finished() || result.is_ok() {
            match (&mut hub_task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %Report(&e), "closing the slot failed; the unconfirmed events are streamed again")
                }
                Err(e) => tracing::warn!(error = %e, "the slot's reader task failed"),
            }
        }
        result
    }

    /// Waits for the end of this generation: shutdown, a pipeline's end, the hub's end, a lost
    /// lease, or a table that vanished; starts the pipelines of newly matched tables.
    async fn watch(
        &mut self,
        relay: &RelayGroup,
        leader: &Leadership,
        registry: &TableRegistry,
        handle: &HubHandle,
        hub_task: &mut tokio::task::JoinHandle<Result<(), SourceError>>,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let lease = leader.lease();
        let mut rescan = tokio::time::interval(self.config.tables_rescan_interval);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        let mut lease_check = tokio::time::interval(LEASE_CHECK);
        lease_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                Some(joined) = self.tasks.join_next() => {
                    if shutdown.is_cancelled() {
                        // Stopped by the shutdown (its token is a child of it), not on its own.
                        return Ok(());
                    }
                    let (key, outcome) = flatten(joined);
                    let name = self.running.remove(&key).map_or(key, |r| r.name);
                    let error = match outcome {
                        Ok(()) => RelayError::NotReady("its pipeline stopped unexpectedly".into()),
                        Err(e) => e,
                    };
                    self.tables.set_stopped(&name, Report(&error).to_string());
                    tracing::error!(table = %name, error = %Report(&error), "a table's pipeline stopped on an error retrying cannot fix: draining the other tables' pipelines, then stopping the relay");
                    return Err(RelayError::Table { table: name, error: Box::new(error) });
                }
                joined = &mut *hub_task => {
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    return Err(match joined {
                        Ok(Ok(())) => RelayError::NotReady("the slot's reader stopped".into()),
                        Ok(Err(e)) => RelayError::Source(e),
                        Err(e) => RelayError::NotReady(format!("the slot's reader task failed: {e}")),
                    });
                }
                _ = lease_check.tick() => {
                    if let Err(e) = lease.check() {
                        return Err(RelayError::LeaseLost(e));
                    }
                }
                _ = rescan.tick() => self.rescan_logical(relay, registry, handle).await?,
            }
        }
    }

    /// Checks that every table is still in the publication and, with a pattern, adds the new
    /// matches to the slot and starts their pipelines; a table that stopped matching stops the
    /// relay, naming it.
    async fn rescan_logical(
        &mut self,
        relay: &RelayGroup,
        registry: &TableRegistry,
        handle: &HubHandle,
    ) -> Result<(), RelayError> {
        if let Err(e) = registry.check().await {
            return Err(self.table_error(e));
        }
        let Some(pattern) = &relay.pattern else {
            return Ok(());
        };
        let found = match relay.connect().await {
            Ok(mut conn) => {
                let found = matching(&mut conn, pattern).await;
                let _ = sqlx::Connection::close(conn).await;
                found
            }
            Err(e) => Err(e),
        };
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(pattern = %pattern, error = %Report(&e), "cannot match the table pattern again; keeping the current tables");
                return Ok(());
            }
        };
        for (key, running) in &self.running {
            if running.from_pattern && !found.contains(key) {
                return Err(RelayError::Table {
                    table: running.name.clone(),
                    error: Box::new(RelayError::NotReady(format!(
                        "the table no longer matches `{pattern}` (dropped, or its schema \
                         renamed): the slot's publication still names it and its events would \
                         silently stop; remove it from the publication (ALTER PUBLICATION … DROP \
                         TABLE) and restart the relay"
                    ))),
                });
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
            let cfg = self.matched_config(&key)?;
            check_mode(&cfg, "tables")?;
            let table = OutboxTable::parse(&key)
                .map_err(|e| crate::config::ConfigError::new("tables", e.to_string()))?;
            let tag = registry
                .add(&table)
                .await
                .map_err(|e| source_error(e, &key))?;
            tracing::info!(table = %key, "a new table matches the pattern: added to the slot's publication");
            if cfg.write_mode == WriteMode::InsertDelete {
                warn_inserts_before_join(registry, &table, &key).await;
            }
            // After the ALTER PUBLICATION committed: its backfill's snapshot sees every row
            // committed before the table joined the stream.
            let backfill = backfill_of(&cfg, &key)?;
            let feed = |counts: Arc<LogicalMetrics>| handle.feed(tag, backfill.clone(), counts);
            self.start(key, cfg, true, Some(&feed))?;
        }
        Ok(())
    }

    /// A table-naming error from the registry's check.
    fn table_error(&self, e: LogicalError) -> RelayError {
        let text = e.to_string();
        let table = self
            .running
            .iter()
            .find(|(key, _)| text.contains(key.as_str()))
            .map_or_else(|| "?".to_owned(), |(_, r)| r.name.clone());
        if let Some(r) = self.running.values().find(|r| r.name == table) {
            self.tables.set_stopped(&r.name, text);
        }
        RelayError::Table {
            table,
            error: Box::new(RelayError::Source(SourceError::new(
                "logical",
                ErrorKind::Setup,
                e,
            ))),
        }
    }

    /// Every table of the group now: the `[[outbox]]` entries, then the pattern's matches.
    async fn resolve(&self, relay: &RelayGroup) -> Result<Vec<Entry>, RelayError> {
        let mut conn = relay.connect().await?;
        let mut entries: Vec<Entry> = Vec::new();
        for (i, cfg) in relay.listed.iter().enumerate() {
            let key = resolved_name(&mut conn, &cfg.table).await?;
            if let Some(other) = entries.iter().find(|e| e.key == key) {
                return Err(already_listed(i, cfg, &key, &other.cfg.table).into());
            }
            check_mode(cfg, &format!("outbox[{i}].write_mode"))?;
            entries.push(Entry {
                key,
                cfg: cfg.clone(),
                from_pattern: false,
            });
        }
        if let Some(pattern) = &relay.pattern {
            for key in matching(&mut conn, pattern).await? {
                if entries.iter().any(|e| e.key == key) {
                    continue;
                }
                let cfg = self.matched_config(&key)?;
                check_mode(&cfg, "write_mode")?;
                entries.push(Entry {
                    key,
                    cfg,
                    from_pattern: true,
                });
            }
            if entries.len() > self.config.max_tables {
                return Err(too_many(self.config, entries.len(), pattern).into());
            }
        }
        let _ = sqlx::Connection::close(conn).await;
        Ok(entries)
    }
}

/// The advisory-lock name of the slot's leadership: `outbox_relay_slot.<slot>`.
fn slot_lock(config: &RelayConfig) -> Result<OutboxTable, RelayError> {
    OutboxTable::new(Some("outbox_relay_slot"), &config.logical.slot).map_err(|e| {
        crate::config::ConfigError::new("logical.slot", format!("cannot name its lock: {e}")).into()
    })
}

/// The table a feed re-publishes unpublished rows from when it joins the stream: only in
/// `table` mode (in `insert_delete` mode rows are deleted as they are written).
fn backfill_of(cfg: &RelayConfig, key: &str) -> Result<Option<OutboxTable>, RelayError> {
    if cfg.write_mode != WriteMode::Table {
        return Ok(None);
    }
    OutboxTable::parse(key)
        .map(Some)
        .map_err(|e| crate::config::ConfigError::new("tables", e.to_string()).into())
}

/// In `insert_delete` mode events written into a table before it joined the publication were
/// never decoded and are gone: says so loudly when PostgreSQL counted inserts into it already.
async fn warn_inserts_before_join(registry: &TableRegistry, table: &OutboxTable, key: &str) {
    match registry.inserts_counted(table).await {
        Ok(n) if n > 0 => tracing::error!(
            table = %key,
            inserts = n,
            "write_mode = \"insert_delete\": the table saw inserts before it joined the slot's \
             publication; those events were not relayed and cannot be (see docs/operations.md, \
             \"Many tables per relay\")"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(table = %key, error = %Report(&e), "cannot count the inserts into a new table")
        }
    }
}

/// Events written as logical messages cannot be attributed to a table.
fn check_mode(cfg: &RelayConfig, key: &str) -> Result<(), RelayError> {
    if cfg.write_mode == WriteMode::LogicalMessage {
        return Err(crate::config::ConfigError::new(
            key,
            "write_mode = \"logical_message\" cannot share a slot with other tables (a message \
             names no table): use table or insert_delete, or run that table in a relay of its own",
        )
        .into());
    }
    Ok(())
}

/// Opens the slot for every table of `entries` (a multi-table [`LogicalSource`]), counting
/// into `metrics` (the slot's figures, kept across its openings).
async fn open_slot(
    config: &RelayConfig,
    entries: &[Entry],
    metrics: Arc<LogicalMetrics>,
) -> Result<LogicalSource, RelayError> {
    let tables = entries
        .iter()
        .map(|e| {
            OutboxTable::parse(&e.key)
                .map_err(|err| crate::config::ConfigError::new("tables", err.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let first = tables[0].clone();
    let mut cfg = LogicalConfig::from_relay(config, first).map_err(|e| source_error(e, ""))?;
    cfg.write_mode = WriteMode::InsertDelete;
    cfg.recover_lost_slot = false;
    cfg.tables = tables;
    LogicalSource::open(cfg, None, metrics)
        .await
        .map_err(|e| source_error(e, ""))
}

fn source_error(e: LogicalError, table: &str) -> RelayError {
    let kind = e.kind();
    let error = RelayError::Source(SourceError::new("logical", kind, e));
    if table.is_empty() || kind == ErrorKind::Unavailable {
        error
    } else {
        RelayError::Table {
            table: table.to_owned(),
            error: Box::new(error),
        }
    }
}

/// Whether a new generation may get past `e`.
fn retryable(e: &RelayError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Unavailable | ErrorKind::LeaseLost | ErrorKind::Contended
    )
}
