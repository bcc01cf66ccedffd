//! Databases for one test or one harness run: created on the shared server under a unique name,
//! migrated with the default outbox table, dropped again (with their replication slots).

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::services::services;

/// The `application_name` of the test's own sessions on a [`TestDb`].
pub const TEST_SESSIONS: &str = "outbox-tests";

/// A short unique suffix for database and topic names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Creates the empty database `name` on the server behind `admin_url` and returns its URL.
pub async fn create_database(admin_url: &str, name: &str) -> Result<String> {
    let mut admin = PgConnection::connect(admin_url)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    let _ = admin.close().await;
    Ok(replace_database(admin_url, name))
}

/// Creates the default outbox table through `pool`.
pub async fn migrate_outbox(pool: &PgPool) -> Result<()> {
    let mut conn = pool.acquire().await?;
    outbox_core::migrate(&mut conn, &outbox_core::OutboxTable::default())
        .await
        .context("migrating the outbox table")?;
    Ok(())
}

/// Drops the database `name` with its replication slots (waiting up to five seconds for the
/// slots' sessions to end) and every session still connected to it.
pub async fn drop_database(admin_url: &str, name: &str) -> Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    for _ in 0..50 {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_replication_slots WHERE database = $1 AND active",
        )
        .bind(name)
        .fetch_one(&mut admin)
        .await?;
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
         WHERE database = $1 AND NOT active",
    )
    .bind(name)
    .execute(&mut admin)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    let _ = admin.close().await;
    Ok(())
}

/// A database created for one test.
pub struct TestDb {
    /// Its URL.
    pub url: String,
    /// Its name.
    pub name: String,
    /// A pool on it.
    pub pool: PgPool,
}

impl TestDb {
    /// Creates a fresh database named after `prefix`.
    pub async fn create(prefix: &str) -> Result<Self> {
        let services = services();
        let name = unique(prefix);
        let url = create_database(&services.admin_url, &name)
            .await
            .context("creating a test database")?;
        let opts = PgConnectOptions::from_str(&services.admin_url)?
            .database(&name)
            .application_name(TEST_SESSIONS);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(opts)
            .await?;
        Ok(Self { url, name, pool })
    }

    /// [`TestDb::create`], then the default outbox table in it.
    pub async fn migrated(prefix: &str) -> Result<Self> {
        let db = Self::create(prefix).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Creates the default outbox table in it.
    pub async fn migrate(&self) -> Result<()> {
        migrate_outbox(&self.pool).await
    }

    /// A fresh connection (not from the pool).
    pub async fn connect(&self) -> Result<PgConnection> {
        Ok(PgConnectOptions::from_str(&self.url)?
            .application_name(TEST_SESSIONS)
            .connect()
            .await?)
    }

    /// Waits until no session but the test's own is connected to this database: after a relay
    /// was killed, its server-side sessions may still be finishing a statement (a `COMMIT` sent
    /// just before the kill still commits), so what the table holds is only final once they
    /// are gone.
    pub async fn wait_foreign_sessions_gone(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND application_name IS DISTINCT FROM $1",
            )
            .bind(TEST_SESSIONS)
            .fetch_one(&self.pool)
            .await?;
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{left} other sessions still connected to {} after {timeout:?}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Set to keep every test's database (and its replication slots) after the test, for inspection.
pub const KEEP_DATABASES_VAR: &str = "OUTBOX_TESTS_KEEP_DATABASES";

impl Drop for TestDb {
    /// A finished test leaves nothing on the shared server: its database goes, with its
    /// replication slots (an inactive slot holds WAL back for good, and over many runs the
    /// server's disk fills). A test that panicked keeps its database for inspection and says so;
    /// [`KEEP_DATABASES_VAR`] keeps every one.
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os(KEEP_DATABASES_VAR).is_some() {
            eprintln!("test database {} kept for inspection", self.name);
            return;
        }
        let admin_url = services().admin_url.clone();
        let name = self.name.clone();
        // The test's own runtime may be the current thread: drop on a thread and runtime of its
        // own (the pool's sessions are ended by the forced drop).
        let dropped = std::thread::spawn(move || -> Result<()> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(drop_database(&admin_url, &name))
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e:#}", self.name),
            Err(_) => eprintln!("dropping test database {} panicked", self.name),
        }
    }
}

/// `url` with its database replaced by `name`.
pub fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > base.find("://").map(|s| s + 2).unwrap_or(0) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Counts unpublished rows of the default outbox table.
pub async fn unpublished(pool: &PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(pool)
            .await?,
    )
}

/// Waits until the default outbox table has no unpublished rows.
pub async fn wait_drained(pool: &PgPool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = unpublished(pool).await?;
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{n} events still unpublished after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
