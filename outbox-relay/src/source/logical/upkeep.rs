//! Upkeep while streaming: idle heartbeats and the periodic slot check
//! ([`LogicalSource::heartbeat_or_check`]).
//!
//! Guarantees enforced here:
//! - **Idle heartbeats.** When nothing is in flight for `heartbeat_interval`, a
//!   non-transactional `<prefix>-heartbeat` message is written so the slot keeps advancing on an
//!   idle database and does not pin WAL.
//! - **Loud slot failures.** Every `slot_check_interval` the slot's `wal_status` and lag are
//!   recorded; an `unreserved` slot is a warning, a `lost` or missing one a
//!   [`LogicalError::SlotLost`].

use tokio::time::Instant;

use super::{LogicalError, LogicalSource, slot, state};

impl LogicalSource {
    /// Writes a heartbeat when one is due and nothing is in flight, and checks the slot when its
    /// check is due (recording the confirmed position in the relay state table).
    pub(super) async fn heartbeat_or_check(&mut self) -> Result<(), LogicalError> {
        self.release_marks(false).await?;
        let now = Instant::now();
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.cfg.heartbeat_interval;
            if self.idle() {
                slot::emit_heartbeat(&self.pool, &self.cfg.message_prefix).await?;
                self.metrics.heartbeats.inc_by(1);
            }
        }
        if now >= self.next_slot_check {
            self.next_slot_check = now + self.cfg.slot_check_interval;
            match slot::slot_status(&self.pool, &self.cfg.slot).await? {
                Some(s) if !s.is_lost() => {
                    s.record_in(&self.metrics);
                    if self.confirmed > self.state_recorded {
                        state::update_confirmed(
                            &self.pool,
                            &self.cfg.table,
                            &self.cfg.slot,
                            self.confirmed,
                        )
                        .await?;
                        self.state_recorded = self.confirmed;
                    }
                    tracing::debug!(lag_bytes = ?s.lag_bytes, retained_bytes = ?s.retained_bytes,
                        wal_status = ?s.wal_status, safe_wal_size = ?s.safe_wal_size, "replication slot status");
                    if s.wal_status.as_deref() == Some("unreserved") {
                        tracing::warn!(lag_bytes = ?s.lag_bytes, safe_wal_size = ?s.safe_wal_size, "replication slot is about to be invalidated (wal_status = unreserved)");
                    }
                }
                Some(s) => {
                    s.record_in(&self.metrics);
                    return Err(LogicalError::SlotLost {
                        slot: self.cfg.slot.to_string(),
                        detail: "wal_status = 'lost'".into(),
                    });
                }
                None => {
                    return Err(LogicalError::SlotLost {
                        slot: self.cfg.slot.to_string(),
                        detail: "the slot no longer exists".into(),
                    });
                }
            }
        }
        Ok(())
    }
}
