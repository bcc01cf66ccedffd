//! The logical source's settings: [`LogicalConfig`], its defaults (the configuration file's) and
//! its reading from the relay configuration ([`LogicalConfig::from_relay`]).
//!
//! Guarantee: slot and publication names are validated here ([`SlotName`], [`PublicationName`]),
//! so an invalid name fails the start as a configuration error before anything is created.

use std::time::Duration;

use outbox_core::{OutboxTable, WriteMode};

use super::{LogicalError, PublicationName, SlotName};
use crate::config::{RelayConfig, RowAcknowledgement};

/// Settings of the logical source.
#[derive(Debug, Clone)]
pub struct LogicalConfig {
    /// PostgreSQL URL (used for the SQL pool and the replication connection). Secret.
    pub database_url: crate::config::Secret,
    /// The outbox table (ignored in `logical_message` mode).
    pub table: OutboxTable,
    /// How services write events.
    pub write_mode: WriteMode,
    /// Replication slot name.
    pub slot: SlotName,
    /// Publication name.
    pub publication: PublicationName,
    /// Prefix of logical-message events; heartbeats use `<prefix>-heartbeat`.
    pub message_prefix: String,
    /// Heartbeat after this much idle time (default 10 s).
    pub heartbeat_interval: Duration,
    /// Standby status update cadence (default 1 s).
    pub status_interval: Duration,
    /// How often the slot's health is checked (default 30 s).
    pub slot_check_interval: Duration,
    /// Recreate a lost slot and re-publish from the table (`table` mode only; default true).
    pub recover_lost_slot: bool,
    /// What acknowledging does to a row in `table` mode (mark `published_at`, or delete).
    pub acknowledgement: RowAcknowledgement,
    /// Multi-table mode (the slot of a multi-table relay, see `multi`): every table the slot
    /// decodes, in the order of their tags ([`super::LogicalSource::take_tables`]). Empty for a
    /// single-table source. When set, `write_mode` must be `insert_delete` (the source decodes
    /// inserts and marks no rows: each table's feed does) and `table` is the first of them.
    pub tables: Vec<OutboxTable>,
}

impl LogicalConfig {
    /// Defaults, the configuration file's: slot `outbox_relay`, publication `outbox_relay`, prefix
    /// `outbox`, heartbeat 10 s, status 1 s, slot check 30 s, lost-slot recovery on.
    pub fn new(database_url: impl Into<String>, table: OutboxTable, write_mode: WriteMode) -> Self {
        Self {
            database_url: crate::config::Secret::new(database_url),
            table,
            write_mode,
            slot: SlotName::default(),
            publication: PublicationName::default(),
            message_prefix: outbox_core::DEFAULT_MESSAGE_PREFIX.to_owned(),
            heartbeat_interval: Duration::from_secs(10),
            status_interval: Duration::from_secs(1),
            slot_check_interval: Duration::from_secs(30),
            recover_lost_slot: true,
            acknowledgement: RowAcknowledgement::Mark,
            tables: Vec::new(),
        }
    }

    /// The logical source's settings from the relay configuration (`logical.*` keys).
    pub fn from_relay(config: &RelayConfig, table: OutboxTable) -> Result<Self, LogicalError> {
        let mut cfg = Self::new(config.database_url.expose(), table, config.write_mode);
        cfg.slot = SlotName::parse(&config.logical.slot)
            .map_err(|e| LogicalError::Config(format!("logical.slot: {e}")))?;
        cfg.publication = PublicationName::parse(&config.logical.publication)
            .map_err(|e| LogicalError::Config(format!("logical.publication: {e}")))?;
        cfg.message_prefix = config.logical.message_prefix.clone();
        cfg.heartbeat_interval = config.logical.heartbeat_interval;
        cfg.status_interval = config.logical.status_interval;
        cfg.acknowledgement = config.acknowledgement;
        Ok(cfg)
    }
}
