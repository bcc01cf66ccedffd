//! The write model: the `accounts` table, and commands that change a row and write its event to
//! the outbox in one transaction.

use outbox_core::{Outbox, OutboxEvent, OutboxTable};
use sqlx::{Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::domain::{self, Account, AccountEvent, Command, Rejection, Status};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The business rules rejected it; nothing was written.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The database or the outbox failed; the transaction was rolled back.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for CommandError {
    fn from(e: sqlx::Error) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<outbox_core::Error> for CommandError {
    fn from(e: outbox_core::Error) -> Self {
        Self::Internal(e.to_string())
    }
}

const ACCOUNTS_LOCK: i64 = 0x0061_6363_6f75_6e74; // "account"

/// Creates the outbox table and the `accounts` table (idempotent, safe to run concurrently).
pub async fn migrate(conn: &mut PgConnection) -> Result<(), CommandError> {
    outbox_core::migrate(conn, &OutboxTable::default()).await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ACCOUNTS_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS accounts (
            id         uuid        PRIMARY KEY,
            owner      text        NOT NULL,
            email      text        NOT NULL,
            status     text        NOT NULL CHECK (status IN ('pending', 'active', 'inactive', 'closed')),
            version    bigint      NOT NULL,
            opened_at  timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .execute(&mut *tx)
    .await?;
    // Email is unique among accounts that are not closed: the race-proof half of the rule.
    sqlx::query(
        "CREATE UNIQUE INDEX IF NOT EXISTS accounts_open_email_key
         ON accounts (lower(email)) WHERE status <> 'closed'",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

fn account_from_row(row: &sqlx::postgres::PgRow) -> Result<Account, CommandError> {
    let status: String = row.try_get("status")?;
    Ok(Account {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        email: row.try_get("email")?,
        status: Status::parse(&status)
            .ok_or_else(|| CommandError::Internal(format!("unknown status `{status}`")))?,
        version: row.try_get("version")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "23505")
}

/// The account service's write side.
#[derive(Debug, Clone)]
pub struct Accounts {
    pool: PgPool,
    outbox: Outbox,
}

impl Accounts {
    /// Accounts stored through `pool`, events written to the default outbox table.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            outbox: Outbox::default(),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Opens an account (pending validation) and emits `AccountOpened`, in one transaction.
    pub async fn open(&self, owner: &str, email: &str) -> Result<Account, CommandError> {
        let id = Uuid::now_v7();
        let event = domain::open(id, owner, email)?;
        let mut tx = self.pool.begin().await?;
        ensure_email_free(&mut tx, email, None).await?;
        let account = Account {
            id,
            owner: owner.trim().to_owned(),
            email: email.to_owned(),
            status: Status::Pending,
            version: event.version(),
        };
        let inserted = sqlx::query(
            "INSERT INTO accounts (id, owner, email, status, version) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(account.id)
        .bind(&account.owner)
        .bind(&account.email)
        .bind(account.status.as_str())
        .bind(account.version)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                return Err(Rejection::EmailTaken(email.to_owned()).into());
            }
            other => {
                other?;
            }
        }
        self.outbox.publish(&mut tx, &event).await?;
        tx.commit().await?;
        tracing::info!(account_id = %id, "account opened");
        Ok(account)
    }

    /// Runs `command` on account `id`: checks the rules, updates the row, bumps its version and
    /// writes the event to the outbox — all in one transaction, or nothing at all.
    pub async fn execute(&self, id: Uuid, command: &Command) -> Result<Account, CommandError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT id, owner, email, status, version FROM accounts WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Rejection::NotFound(id))?;
        let account = account_from_row(&row)?;
        let event = domain::decide(&account, command)?;
        if let AccountEvent::AccountEmailChanged { email, .. } = &event {
            ensure_email_free(&mut tx, email, Some(id)).await?;
        }
        let after = domain::apply(account, &event);
        let updated = sqlx::query(
            "UPDATE accounts SET email = $2, status = $3, version = $4, updated_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .bind(&after.email)
        .bind(after.status.as_str())
        .bind(after.version)
        .execute(&mut *tx)
        .await;
        match updated {
            Err(e) if is_unique_violation(&e) => {
                return Err(Rejection::EmailTaken(after.email).into());
            }
            other => {
                other?;
            }
        }
        self.outbox.publish(&mut tx, &event).await?;
        tx.commit().await?;
        tracing::info!(account_id = %id, version = after.version, event = event.event_type(), "command accepted");
        Ok(after)
    }

    /// One account.
    pub async fn get(&self, id: Uuid) -> Result<Account, CommandError> {
        let row =
            sqlx::query("SELECT id, owner, email, status, version FROM accounts WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(Rejection::NotFound(id))?;
        account_from_row(&row)
    }

    /// Every account, by id.
    pub async fn list(&self) -> Result<Vec<Account>, CommandError> {
        list(&self.pool).await
    }
}

/// Every account of the write model behind `pool`, by id.
pub async fn list(pool: &PgPool) -> Result<Vec<Account>, CommandError> {
    sqlx::query("SELECT id, owner, email, status, version FROM accounts ORDER BY id")
        .fetch_all(pool)
        .await?
        .iter()
        .map(account_from_row)
        .collect()
}

async fn ensure_email_free(
    conn: &mut PgConnection,
    email: &str,
    except: Option<Uuid>,
) -> Result<(), CommandError> {
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM accounts
                        WHERE lower(email) = lower($1) AND status <> 'closed'
                          AND id IS DISTINCT FROM $2)",
    )
    .bind(email)
    .bind(except)
    .fetch_one(&mut *conn)
    .await?;
    if taken {
        return Err(Rejection::EmailTaken(email.to_owned()).into());
    }
    Ok(())
}
