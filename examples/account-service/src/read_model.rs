//! The query side (CQRS): a read model of accounts in its own database (schema `query`), built only
//! from the account events, through the inbox.

use outbox_core::{EventHandler, EventMetadata, HandlerError};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::domain::AccountEvent;

/// The read model's schema.
pub const SCHEMA: &str = "query";
/// The read model's inbox (`query.inbox`).
pub const INBOX: &str = "query.inbox";

/// Creates the read model's tables (idempotent).
pub async fn migrate(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    crate::create_schema(
        conn,
        "query",
        &["CREATE TABLE IF NOT EXISTS query.accounts (
            id              uuid        PRIMARY KEY,
            owner           text        NOT NULL,
            email           text        NOT NULL,
            status          text        NOT NULL,
            version         bigint      NOT NULL,
            events_applied  bigint      NOT NULL,
            email_changes   integer     NOT NULL DEFAULT 0,
            last_event_id   uuid        NOT NULL,
            updated_at      timestamptz NOT NULL DEFAULT now()
        )"],
    )
    .await
}

/// One row of the read model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountView {
    /// Account id.
    pub id: Uuid,
    /// Owner.
    pub owner: String,
    /// Current email.
    pub email: String,
    /// `pending`, `active`, `inactive` or `closed`.
    pub status: String,
    /// Version of the last applied event.
    pub version: i64,
    /// How many events were applied to this row: equals `version` unless an event was applied
    /// twice (or lost).
    pub events_applied: i64,
    /// How many times the email changed.
    pub email_changes: i32,
}

/// The whole read model, by id.
pub async fn load(pool: &PgPool) -> Result<Vec<AccountView>, sqlx::Error> {
    sqlx::query(
        "SELECT id, owner, email, status, version, events_applied, email_changes
         FROM query.accounts ORDER BY id",
    )
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| {
        Ok(AccountView {
            id: r.try_get("id")?,
            owner: r.try_get("owner")?,
            email: r.try_get("email")?,
            status: r.try_get("status")?,
            version: r.try_get("version")?,
            events_applied: r.try_get("events_applied")?,
            email_changes: r.try_get("email_changes")?,
        })
    })
    .collect()
}

/// Sets `set` (whose value is `$2`, bound to `value`) on the row of account `id`, with the event's
/// `version` and id, and counts the event as applied; returns the rows changed (0 when the
/// account is not in the read model).
async fn apply_change(
    conn: &mut PgConnection,
    set: &str,
    id: Uuid,
    value: &str,
    version: i64,
    event_id: Uuid,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE query.accounts
         SET {set}, version = $3, events_applied = events_applied + 1,
             last_event_id = $4, updated_at = now()
         WHERE id = $1"
    )))
    .bind(id)
    .bind(value)
    .bind(version)
    .bind(event_id)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Applies account events to `query.accounts`. Deliberately not idempotent on its own
/// (`events_applied = events_applied + 1`): the inbox is what keeps redeliveries out.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadModelProjection;

impl EventHandler<AccountEvent> for ReadModelProjection {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: AccountEvent,
        meta: &EventMetadata,
    ) -> Result<(), HandlerError> {
        let id = event.account_id();
        let version = event.version();
        let event_id = meta.event_id;
        let changed = match &event {
            AccountEvent::AccountOpened { owner, email, .. } => sqlx::query(
                "INSERT INTO query.accounts
                    (id, owner, email, status, version, events_applied, last_event_id)
                 VALUES ($1, $2, $3, 'pending', $4, 1, $5)",
            )
            .bind(id)
            .bind(owner)
            .bind(email)
            .bind(version)
            .bind(event_id)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
            AccountEvent::AccountEmailChanged { email, .. } => {
                let set = "email = $2, email_changes = email_changes + 1";
                apply_change(conn, set, id, email, version, event_id).await?
            }
            AccountEvent::AccountActivated { .. }
            | AccountEvent::AccountDeactivated { .. }
            | AccountEvent::AccountClosed { .. } => {
                let status = match event {
                    AccountEvent::AccountActivated { .. } => "active",
                    AccountEvent::AccountDeactivated { .. } => "inactive",
                    _ => "closed",
                };
                apply_change(conn, "status = $2", id, status, version, event_id).await?
            }
        };
        if changed == 0 {
            return Err(format!(
                "account {id} is not in the read model (its AccountOpened is missing)"
            )
            .into());
        }
        Ok(())
    }
}
