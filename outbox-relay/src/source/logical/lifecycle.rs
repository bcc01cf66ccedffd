//! Slot lifecycle and recovery: making sure a usable slot exists at start and after a rewind
//! ([`LogicalSource::prepare_slot`]), creating it with an exported snapshot, recording it in the
//! relay state table, (re)starting the replication session, and the marker slot `<slot>_bf`
//! that keeps a re-publication from the table pending.
//!
//! Guarantees enforced here:
//! - **A lost slot is never mistaken for a first start.** A missing slot with a record in the
//!   relay state table ([`super::state`]) was lost: recovered from the table in `table` mode, a
//!   fatal [`LogicalError::SlotLost`] naming the position and the operator's options otherwise.
//! - **Loud slot failures.** A lost or vanished slot is an error-level event, explained in full
//!   ([`LogicalSource::explain_loss`]).
//! - **Resume only on the same WAL history.** The relay's own confirmed position is kept over
//!   the slot's only on the same PostgreSQL instance ([`slot::instance`]).

use crate::failure::{ErrorKind, Report};
use std::time::Duration;

use outbox_core::WriteMode;
use sqlx::PgPool;
use tokio::time::Instant;

use super::stream::{self, Session};
use super::{LogicalError, LogicalSource, Lsn, SlotName, SlotStatus, slot, state};

/// How long a start waits for a slot that another session is still creating.
const SLOT_CREATION_WAIT: Duration = Duration::from_secs(120);

pub(super) fn marker_slot(slot: &SlotName) -> SlotName {
    let base: String = slot.as_str().chars().take(60).collect();
    SlotName::parse(&format!("{base}_bf")).unwrap_or_else(|_| slot.clone())
}

impl LogicalSource {
    /// Make sure a usable slot exists; recover (table mode) or fail when it is missing or lost.
    /// Sets `confirmed` to the slot's position.
    ///
    /// A missing slot is a first start only when the relay state table has no record of it
    /// ([`state`]); otherwise it was lost, whether the relay saw it go or not.
    pub(super) async fn prepare_slot(&mut self, at_start: bool) -> Result<(), LogicalError> {
        let slot = self.cfg.slot.clone();
        let marker = marker_slot(&slot);
        let status = self.settled_slot_status(&slot).await?;
        let table_mode = self.cfg.write_mode == WriteMode::Table;
        let marker_exists = table_mode && slot::slot_status(&self.pool, &marker).await?.is_some();
        match status {
            // A re-publication from the table is pending: the table holds every event the slot
            // would carry, so the slot is created again with a fresh exported snapshot and the
            // unpublished rows are read in it. Resuming the old slot instead would stream the
            // rows committed since its position on top of re-publishing them.
            Some(s) if !s.is_lost() && marker_exists => {
                tracing::warn!(
                    "a previous re-publication from the table was interrupted: \
                    creating the slot again with a fresh snapshot and re-publishing the unpublished rows in it"
                );
                slot::drop_slot(&self.pool, &slot).await?;
                self.create_slot(at_start, marker_exists).await
            }
            Some(s) if !s.is_lost() => {
                slot::verify_slot(&self.pool, &slot, &s).await?;
                s.record_in(&self.metrics);
                let at_slot = s.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
                // Our own position saves re-streaming what was acknowledged since the last status
                // update, but an LSN names a transaction only within one WAL history: after a
                // restart or failover of PostgreSQL (a promoted standby can reuse LSNs the old
                // primary had used for other transactions) only the slot's position is safe.
                let instance = slot::instance(&self.pool).await?;
                let same_instance = self.instance.as_ref() == Some(&instance);
                if !same_instance && self.confirmed > at_slot {
                    tracing::warn!(acknowledged = %self.confirmed, slot_position = %at_slot,
                        "PostgreSQL restarted or failed over since the relay acknowledged its position: resuming from the slot's position (events acknowledged after it are published again)");
                }
                self.confirmed = if same_instance {
                    at_slot.max(self.confirmed)
                } else {
                    at_slot
                };
                if !same_instance && let Some(settle) = self.settle.as_mut() {
                    // Rows delivered but not marked by an earlier run (a crash) or on the
                    // previous instance: marked once the slot is confirmed past them.
                    settle.schedule_recovery(&instance);
                }
                self.instance = Some(instance);
                // Also records a slot made by a relay that did not keep a state table yet.
                self.record_state().await?;
                Ok(())
            }
            other => {
                let lost_at = other.as_ref().map(|s| s.confirmed_flush_lsn);
                let record = state::read(&self.pool, &self.cfg.table, &slot).await?;
                if marker_exists {
                    // Nothing streamed is lost: the pending re-publication reads every
                    // unpublished row of the table in the new slot's snapshot.
                    tracing::warn!(
                        "a previous re-publication from the table was interrupted and the slot is gone too: \
                        creating it and re-publishing every unpublished row"
                    );
                    if lost_at.is_some() {
                        slot::drop_slot(&self.pool, &slot).await?;
                    }
                } else if lost_at.is_some() || !at_start || record.is_some() {
                    let state_table = state::state_table(&self.cfg.table);
                    let (detail, since) = match (lost_at, &record) {
                        (Some(at), _) => (
                            "wal_status = 'lost': the WAL it needed was removed (max_slot_wal_keep_size exceeded?)".to_owned(),
                            at.or(record.as_ref().map(|r| r.confirmed_lsn)),
                        ),
                        (None, _) if !at_start => (
                            "the slot disappeared while the relay was using it (dropped?)".to_owned(),
                            Some(self.confirmed),
                        ),
                        (None, Some(r)) => (
                            format!(
                                "the slot does not exist, but {state_table} records that a relay \
                                 streamed from it, {}: it was dropped, invalidated and removed, or \
                                 PostgreSQL failed over to a standby that does not have it",
                                r.describe()
                            ),
                            Some(r.confirmed_lsn),
                        ),
                        (None, None) => unreachable!("guarded above"),
                    };
                    tracing::error!("REPLICATION SLOT LOST: {detail}");
                    if !(table_mode && self.cfg.recover_lost_slot) {
                        let since = since
                            .filter(|l| *l != Lsn::ZERO)
                            .map(|l| format!("LSN {l}"))
                            .unwrap_or_else(|| "the slot's last confirmed position".into());
                        return Err(LogicalError::SlotLost {
                            slot: slot.to_string(),
                            detail: format!(
                                "{detail}; write mode {} has no table to recover from — events \
                                 committed after {since} that were not published yet are lost. \
                                 The relay refuses to start until an operator decides: to accept the \
                                 loss and continue from now, run `outbox-relay slot drop {slot}` \
                                 (forgets the slot in {state_table}) and start the relay again; \
                                 to avoid it, point the relay at the server that still has the slot",
                                self.cfg.write_mode
                            ),
                        });
                    }
                    self.metrics.slot_recoveries.inc_by(1);
                    if lost_at.is_some() {
                        slot::drop_slot(&self.pool, &slot).await?;
                    }
                    tracing::warn!(
                        "recovering the lost slot: creating it and re-publishing every unpublished row from the outbox table"
                    );
                } else if table_mode && self.table_has_published_rows().await? {
                    tracing::warn!(
                        "replication slot does not exist although rows were published before: \
                        it was dropped or lost while no relay ran (or the polling source was used); creating it and \
                        re-publishing every unpublished row"
                    );
                } else {
                    tracing::info!(
                        "replication slot does not exist and no relay streamed from it before; creating it"
                    );
                }
                self.create_slot(at_start, marker_exists).await
            }
        }
    }

    /// Creates the slot over the replication protocol with an exported snapshot and, in `table`
    /// mode, starts re-publishing the unpublished rows in that snapshot (the marker slot, created
    /// first, keeps the re-publication pending until every row is acknowledged).
    async fn create_slot(
        &mut self,
        at_start: bool,
        marker_exists: bool,
    ) -> Result<(), LogicalError> {
        let slot = self.cfg.slot.clone();
        let marker = marker_slot(&slot);
        let table_mode = self.cfg.write_mode == WriteMode::Table;
        if let Some(settle) = self.settle.as_mut() {
            // Delivered rows are marked before the new snapshot, so the re-publication does not
            // publish them again; the rows it reads are marked as it goes.
            if let Err(e) = settle.flush().await {
                tracing::warn!(error = %Report(&e), "marking delivered rows failed before a re-publication; they will be published again");
            }
            settle.forget_recovery();
        }
        if table_mode && !marker_exists {
            // Durable "re-publication pending" marker: created before the new slot, dropped
            // once every re-published row is acknowledged.
            create_marker(&self.pool, &marker).await?;
        }
        // Created over the replication protocol with an exported snapshot, so the rows
        // re-published are exactly those committed before the slot's consistent point:
        // everything later is streamed, nothing is published twice.
        let created = stream::create_slot_exporting(
            &self.target,
            &slot,
            &self.cfg.publication,
            "outbox-relay",
        )
        .await?;
        let Some(exported) = created else {
            // Created concurrently by another instance: use it as found.
            return Box::pin(self.prepare_slot(at_start)).await;
        };
        self.confirmed = exported.consistent_point;
        self.instance = Some(slot::instance(&self.pool).await?);
        // Durable before anything is streamed: from now on a missing slot is a loss.
        self.record_state().await?;
        if table_mode {
            self.backfill(Some(&exported.snapshot)).await?;
        }
        drop(exported);
        Ok(())
    }

    /// Writes the slot and the confirmed position to the relay state table.
    pub(super) async fn record_state(&mut self) -> Result<(), LogicalError> {
        state::record(
            &self.pool,
            &self.cfg.table,
            &self.cfg.slot,
            self.cfg.write_mode.as_str(),
            self.confirmed,
        )
        .await?;
        self.state_recorded = self.confirmed;
        Ok(())
    }

    /// The slot's status once it is not being created any more. A logical slot without a
    /// confirmed position is still being created by some session — possibly by a relay that was
    /// killed meanwhile, whose walsender drops the half-made slot once it notices. Such a slot
    /// was never streamed from, so waiting for it to either appear for real or vanish (and then
    /// creating it) loses nothing; calling it lost would fail the start for no reason.
    async fn settled_slot_status(
        &self,
        slot: &SlotName,
    ) -> Result<Option<SlotStatus>, LogicalError> {
        let deadline = Instant::now() + SLOT_CREATION_WAIT;
        let mut logged = false;
        loop {
            let status = slot::slot_status(&self.pool, slot).await?;
            match &status {
                Some(s) if s.slot_type == "logical" && s.confirmed_flush_lsn.is_none() => {
                    if Instant::now() >= deadline {
                        return Err(LogicalError::Slot(format!(
                            "replication slot {slot} has been in creation for {SLOT_CREATION_WAIT:?} \
                             (by backend pid {:?}; creation waits for transactions open at that \
                             moment to finish): end that session or those transactions",
                            s.active_pid
                        )));
                    }
                    if !logged {
                        logged = true;
                        tracing::info!(creator_pid = ?s.active_pid,
                            "replication slot is still being created by another session (a relay killed while creating it?); waiting until it is complete or gone");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => return Ok(status),
            }
        }
    }

    pub(super) async fn start_session(&mut self) -> Result<(), LogicalError> {
        let mut attempt = 0;
        let session = loop {
            match Session::start(
                &self.target,
                &self.cfg.slot,
                &self.cfg.publication,
                self.confirmed,
                self.cfg.status_interval,
                "outbox-relay",
            )
            .await
            {
                Ok(s) => break s,
                // The walsender of a session we just closed may hold the slot for a moment.
                Err(LogicalError::SlotInUse(_)) if attempt < 30 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.metrics.sessions.inc_by(1);
        if let Ok(Some(status)) = slot::slot_status(&self.pool, &self.cfg.slot).await {
            status.record_in(&self.metrics);
        }
        self.metrics.confirmed_lsn.set(self.confirmed.0);
        self.session = Some(session);
        Ok(())
    }

    /// Drop everything not acknowledged and stream again from the confirmed position; recover or
    /// fail loudly when the slot is gone.
    pub(super) async fn restart(&mut self) -> Result<(), LogicalError> {
        if let Some(s) = self.session.take() {
            s.stop().await;
        }
        // Acknowledgements still running concern delivered rows: let them finish (and confirm
        // their LSNs), so the new session does not stream those rows again.
        if let Err(e) = self.release_marks(true).await {
            tracing::warn!(error = %Report(&e), "acknowledgement failed during a restart; those events will be published again");
        }
        self.relations.clear();
        self.open = None;
        self.ready.clear();
        self.ready_tags.clear();
        self.inflight.clear();
        self.republication = None;
        self.stream_deferred = false;
        let mut attempts = 0;
        loop {
            self.prepare_slot(false).await?;
            // A re-publication interrupted by the rewind starts again in a fresh snapshot of a
            // slot created again (`prepare_slot`, the marker slot still exists).
            if self.republishing() {
                // Streaming starts once the table was read to the end.
                self.stream_deferred = true;
                return Ok(());
            }
            match self.start_session().await {
                // The slot vanished between the check and START_REPLICATION: check again
                // (recovers in table mode, fails loudly otherwise).
                Err(LogicalError::SlotLost { .. }) if attempts < 3 => {
                    attempts += 1;
                    self.ready.clear();
                    self.ready_tags.clear();
                    self.republication = None;
                }
                other => return other,
            }
        }
    }

    /// The full account of a lost slot the stream or a health check reported in a mode that
    /// cannot recover from it (what may be lost since which position, the operator's options),
    /// or `e` itself when the slot turns out to be usable.
    pub(super) async fn explain_loss(&mut self, e: LogicalError) -> LogicalError {
        if self.restartable(&e) {
            return e;
        }
        if let Some(s) = self.session.take() {
            s.stop().await;
        }
        match self.prepare_slot(false).await {
            Err(full @ LogicalError::SlotLost { .. }) => full,
            _ => e,
        }
    }

    /// The kind of `e` as this source sees it ([`crate::failure`]): a lost slot is recoverable
    /// in `table` mode with `recover_lost_slot` (the source re-publishes from the table).
    pub(super) fn kind_of(&self, e: &LogicalError) -> ErrorKind {
        match e {
            LogicalError::SlotLost { .. } => ErrorKind::SlotLost {
                recoverable: self.cfg.write_mode == WriteMode::Table && self.cfg.recover_lost_slot,
            },
            e => e.kind(),
        }
    }

    /// Whether restarting the replication session (or reopening the source) gets past `e`.
    pub(super) fn restartable(&self, e: &LogicalError) -> bool {
        self.kind_of(e).restarts_source()
    }
}

async fn create_marker(pool: &PgPool, marker: &SlotName) -> Result<(), LogicalError> {
    // A physical slot that reserves no WAL: a durable, free flag.
    let res = sqlx::query("SELECT pg_create_physical_replication_slot($1, false)")
        .bind(marker.as_str())
        .execute(pool)
        .await;
    match res {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(()),
        Err(source) => Err(LogicalError::Database {
            context: "creating the re-publication marker slot",
            source,
        }),
    }
}
