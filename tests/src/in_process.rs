//! A relay running inside the test process, configured for one test database.

use std::time::Duration;

use anyhow::Result;
use outbox_relay::{Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

use crate::database::TestDb;
use crate::services::services;

/// A relay running inside the test process.
pub struct InProcessRelay {
    /// Cancel to stop it gracefully.
    pub shutdown: CancellationToken,
    /// Its task.
    pub task: tokio::task::JoinHandle<Result<(), outbox_relay::RelayError>>,
    /// Its live figures ([`Relay::stats`]).
    pub stats: std::sync::Arc<outbox_relay::RelayStats>,
}

impl InProcessRelay {
    /// Starts a relay with `config`.
    pub fn start(config: RelayConfig) -> Result<Self> {
        let shutdown = CancellationToken::new();
        let relay = Relay::new(config)?;
        let stats = relay.stats();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Ok(Self {
            shutdown,
            task,
            stats,
        })
    }

    /// Stops it gracefully and returns its result.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

/// A relay configuration for `db`, polling, fast wake-ups, against the test broker.
pub fn relay_config(db: &TestDb) -> RelayConfig {
    let mut c = RelayConfig::default();
    c.database_url = outbox_relay::config::Secret::new(db.url.clone());
    c.kafka.bootstrap_servers = services().bootstrap;
    c.poll_interval = Duration::from_millis(200);
    c.standby_interval = Duration::from_millis(200);
    c.kafka.delivery_timeout = Duration::from_secs(10);
    c
}
