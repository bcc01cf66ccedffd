//! The "legacy application": it only needs to know which accounts exist and which are enabled. It
//! keeps its own list in its own database (schema `legacy`), fed by the account events through its
//! own inbox, and never calls the account service.
//!
//! It decodes only the event types it cares about: [`LegacyAccountEvent`] is its own contract, a
//! subset of the account events (email changes do not concern it and are ignored).

use outbox_core::{EventHandler, EventMetadata, HandlerError};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

/// The legacy list's inbox (`legacy.inbox`).
pub const INBOX: &str = "legacy.inbox";

/// The account events the legacy application consumes (event type = variant name, payload fields
/// it does not need are ignored on decoding).
#[derive(Debug, Clone, PartialEq, Eq, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
pub enum LegacyAccountEvent {
    /// A new account: known, not enabled.
    AccountOpened {
        /// The account.
        account_id: Uuid,
    },
    /// Enabled.
    AccountActivated {
        /// The account.
        account_id: Uuid,
    },
    /// Disabled.
    AccountDeactivated {
        /// The account.
        account_id: Uuid,
    },
    /// Gone from the legacy list.
    AccountClosed {
        /// The account.
        account_id: Uuid,
    },
}

/// Creates the legacy tables (idempotent).
pub async fn migrate(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    crate::create_schema(
        conn,
        "legacy",
        &["CREATE TABLE IF NOT EXISTS legacy.account_flags (
            account_id uuid        PRIMARY KEY,
            enabled    boolean     NOT NULL,
            changed_at timestamptz NOT NULL DEFAULT now()
        )"],
    )
    .await
}

/// The legacy list: every account that is not closed, and whether it is enabled.
pub async fn load(pool: &PgPool) -> Result<Vec<(Uuid, bool)>, sqlx::Error> {
    sqlx::query("SELECT account_id, enabled FROM legacy.account_flags ORDER BY account_id")
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("account_id")?, r.try_get("enabled")?)))
        .collect()
}

/// Keeps `legacy.account_flags` in step with the events.
#[derive(Debug, Clone, Copy, Default)]
pub struct LegacyList;

impl EventHandler<LegacyAccountEvent> for LegacyList {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: LegacyAccountEvent,
        _meta: &EventMetadata,
    ) -> Result<(), HandlerError> {
        let (sql, id) = match event {
            LegacyAccountEvent::AccountOpened { account_id } => (
                "INSERT INTO legacy.account_flags (account_id, enabled) VALUES ($1, false)",
                account_id,
            ),
            LegacyAccountEvent::AccountActivated { account_id } => (
                "UPDATE legacy.account_flags SET enabled = true, changed_at = now() WHERE account_id = $1",
                account_id,
            ),
            LegacyAccountEvent::AccountDeactivated { account_id } => (
                "UPDATE legacy.account_flags SET enabled = false, changed_at = now() WHERE account_id = $1",
                account_id,
            ),
            LegacyAccountEvent::AccountClosed { account_id } => (
                "DELETE FROM legacy.account_flags WHERE account_id = $1",
                account_id,
            ),
        };
        let changed = sqlx::query(sql)
            .bind(id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if changed == 0 {
            return Err(format!("account {id} is not in the legacy list").into());
        }
        Ok(())
    }
}
