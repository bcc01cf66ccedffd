//! One active relay per outbox table: a PostgreSQL advisory lock held by a dedicated session.
//!
//! Two relays reading the same outbox would interleave and reorder an aggregate's events, so only
//! the holder of the table's leader lock reads and acknowledges; other instances wait as standbys
//! and take over as soon as the holder's session ends (graceful stop, crash or `kill -9`: the
//! server releases a session's advisory locks when the session goes away).
//!
//! The polling source runs its claim and acknowledgement statements **on the lock-holding
//! session itself**, so a relay that lost its session cannot acknowledge anything afterwards.

use std::time::Duration;

use outbox_core::OutboxTable;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio_util::sync::CancellationToken;

/// The lock-holding session of the active relay.
#[derive(Debug)]
pub struct Leadership {
    conn: PgConnection,
    key: i64,
}

impl Leadership {
    /// Waits until this process holds the leader lock of `table`, checking every
    /// `standby_interval`. Returns `Ok(None)` when `shutdown` fires first.
    pub async fn acquire(
        options: &PgConnectOptions,
        table: &OutboxTable,
        standby_interval: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, sqlx::Error> {
        let key = table.lock_key("relay");
        let mut conn = options
            .clone()
            .application_name("outbox-relay")
            .connect()
            .await?;
        let mut announced = false;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut conn)
                .await?;
            if got {
                tracing::info!(table = %table, "acquired the leader lock: this relay is active");
                return Ok(Some(Self { conn, key }));
            }
            if !announced {
                tracing::info!(
                    table = %table,
                    "another relay holds the leader lock: standing by"
                );
                announced = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(standby_interval) => {}
            }
        }
    }

    /// Confirms that this session still holds the lock (fails when the session is gone).
    pub async fn check(&mut self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                 AND pid = pg_backend_pid()
                 AND ((classid::bigint << 32) | objid::bigint) = $1)",
        )
        .bind(self.key)
        .fetch_one(&mut self.conn)
        .await
    }

    /// The lock-holding session, for statements that must be fenced by leadership.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}
