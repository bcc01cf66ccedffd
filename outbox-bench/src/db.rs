//! Per-section databases, the outbox backlog and the logical-replication objects.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
pub use outbox_tests::database::unique;
use outbox_tests::database::{create_database, drop_database, migrate_outbox};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Acquire, AssertSqlSafe, ConnectOptions, PgConnection, PgPool};

/// Event types the backlog cycles through.
pub const EVENT_TYPES: &[&str] = &[
    "AccountOpened",
    "FundsDeposited",
    "FundsWithdrawn",
    "EmailChanged",
];

/// Number of distinct aggregates (and so record keys).
pub const AGGREGATES: u64 = 1000;

/// Target size of an event payload (the JSON text), bytes.
pub const PAYLOAD_BYTES: usize = 200;

/// Databases created by this run, dropped at the end even after a failure.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    names: Arc<Mutex<Vec<String>>>,
}

impl Registry {
    fn add(&self, name: &str) {
        self.names.lock().expect("registry").push(name.to_owned());
    }

    fn remove(&self, name: &str) {
        self.names.lock().expect("registry").retain(|n| n != name);
    }

    /// Drops every database still registered (and its replication slots).
    pub async fn drop_all(&self, admin_url: &str) {
        let names = std::mem::take(&mut *self.names.lock().expect("registry"));
        for name in names {
            if let Err(e) = drop_database(admin_url, &name).await {
                eprintln!("bench: warning: could not drop database {name}: {e:#}");
            }
        }
    }
}

/// A database created for one section.
pub struct BenchDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A small pool on it.
    pub pool: PgPool,
    admin_url: String,
    registry: Registry,
}

impl BenchDb {
    /// Creates `bench_<section>_<random>` with the outbox table migrated.
    pub async fn create(admin_url: &str, section: &str, registry: &Registry) -> Result<Self> {
        let name = unique(&format!("bench_{section}"));
        let url = create_database(admin_url, &name).await?;
        registry.add(&name);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(PgConnectOptions::from_str(&url)?)
            .await?;
        migrate_outbox(&pool).await?;
        Ok(Self {
            name,
            url,
            pool,
            admin_url: admin_url.to_owned(),
            registry: registry.clone(),
        })
    }

    /// A fresh connection (not from the pool).
    pub async fn connect(&self) -> Result<PgConnection> {
        Ok(PgConnectOptions::from_str(&self.url)?
            .application_name("outbox-bench")
            .connect()
            .await?)
    }

    /// Creates a publication for the outbox table and a pgoutput slot, as the relay would
    /// (it reuses both when configured with these names).
    pub async fn create_slot(&self, slot: &str, publication: &str) -> Result<()> {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE PUBLICATION \"{publication}\" FOR TABLE outbox WITH (publish = 'insert')"
        )))
        .execute(&self.pool)
        .await
        .context("creating the publication")?;
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(slot)
            .execute(&self.pool)
            .await
            .context("creating the replication slot")?;
        Ok(())
    }

    /// `pg_current_wal_lsn()` as text.
    pub async fn current_lsn(&self) -> Result<String> {
        Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Unpublished rows of the outbox table.
    pub async fn unpublished(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Inserts `n` events server-side in transactions of `per_tx` rows (deleting them again in
    /// the same transaction when `insert_delete`); returns the time taken.
    pub async fn fill_backlog(&self, n: u64, per_tx: u64, insert_delete: bool) -> Result<Duration> {
        self.fill_table("outbox", n, per_tx, insert_delete).await
    }

    /// [`BenchDb::fill_backlog`] into the outbox table `table` (an unquoted name of this
    /// benchmark's own).
    pub async fn fill_table(
        &self,
        table: &str,
        n: u64,
        per_tx: u64,
        insert_delete: bool,
    ) -> Result<Duration> {
        self.fill(table, n, per_tx, insert_delete, false).await
    }

    /// `n` events into `outbox` in one transaction that also runs `ANALYZE outbox`, so readers
    /// see the whole backlog, with its statistics, at one commit; returns the time taken.
    pub async fn fill_backlog_at_once(&self, n: u64) -> Result<Duration> {
        self.fill("outbox", n, n.max(1), false, true).await
    }

    async fn fill(
        &self,
        table: &str,
        n: u64,
        per_tx: u64,
        insert_delete: bool,
        analyze: bool,
    ) -> Result<Duration> {
        let pad = payload_padding(&self.pool).await?;
        let sql = format!(
            "INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload)
             SELECT gen_random_uuid(), 'account', 'acct-' || (g % {AGGREGATES}),
                    (ARRAY['{}'])[1 + (g % {})],
                    {}
             FROM generate_series($1::bigint, $2::bigint) AS g",
            EVENT_TYPES.join("','"),
            EVENT_TYPES.len(),
            payload_sql(pad),
        );
        let started = Instant::now();
        let mut conn = self.pool.acquire().await?;
        let mut next = 0u64;
        while next < n {
            let end = (next + per_tx).min(n) - 1;
            let mut tx = conn.begin().await?;
            sqlx::query(AssertSqlSafe(sql.as_str()))
                .bind(next as i64)
                .bind(end as i64)
                .execute(&mut *tx)
                .await
                .context("filling the backlog")?;
            if insert_delete {
                sqlx::query(AssertSqlSafe(format!("DELETE FROM {table}")))
                    .execute(&mut *tx)
                    .await?;
            }
            if analyze {
                sqlx::query(AssertSqlSafe(format!("ANALYZE {table}")))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            next = end + 1;
        }
        Ok(started.elapsed())
    }

    /// Closes the pool and drops the database (with its replication slots).
    pub async fn drop(self) -> Result<()> {
        self.pool.close().await;
        drop_database(&self.admin_url, &self.name).await?;
        self.registry.remove(&self.name);
        Ok(())
    }
}

/// The payload expression for row `g`, padded by `pad` characters.
fn payload_sql(pad: i64) -> String {
    format!(
        "jsonb_build_object('account_id', 'acct-' || (g % {AGGREGATES}), 'seq', g,
             'amount', ((g % 99991) * 1.25)::numeric(12,2), 'currency', 'EUR',
             'reference', md5(g::text), 'note', repeat('x', {pad}))"
    )
}

/// The padding that makes a typical payload [`PAYLOAD_BYTES`] long.
async fn payload_padding(pool: &PgPool) -> Result<i64> {
    let len: i32 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT length(({})::text) FROM (SELECT 100000::bigint AS g) s",
        payload_sql(0)
    )))
    .fetch_one(pool)
    .await?;
    Ok((PAYLOAD_BYTES as i64 - i64::from(len)).max(0))
}

/// A payload of about [`PAYLOAD_BYTES`] for event `seq` of `account`, as JSON.
pub fn payload_json(account: &str, seq: u64) -> serde_json::Value {
    let mut v = serde_json::json!({
        "account_id": account,
        "seq": seq,
        "amount": format!("{}.25", seq % 99991),
        "currency": "EUR",
        "reference": format!("{:032x}", u128::from(seq).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        "note": "",
    });
    let len = v.to_string().len();
    v["note"] = "x".repeat(PAYLOAD_BYTES.saturating_sub(len)).into();
    v
}
