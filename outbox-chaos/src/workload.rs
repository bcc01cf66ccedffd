//! The workload: a database per run, writers that keep a ledger in the same transactions as
//! their events, probes for recovery time, huge transactions, hostile rows and poison events.
//!
//! A writer locks its aggregate's row (`SELECT … FOR UPDATE`), takes the next per-aggregate
//! sequence numbers from it, writes its events and the new version, may linger (so transactions
//! commit out of `seq` order), then commits or rolls back. Ids go to the ledger only once the
//! outcome is known: committed, rolled back, or — when the commit call itself failed (the
//! server went away) — *in doubt*, resolved after the run by looking the ids up in the table.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outbox_core::{NewEvent, Outbox, WriteMode};
use outbox_tests::Ledger;
use outbox_tests::database::{create_database, migrate_outbox};
use outbox_tests::writers::{balance_changed, create_accounts, write_account_events};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use uuid::Uuid;

/// What the writers know, shared between them.
#[derive(Debug, Default)]
pub struct Book {
    /// Committed and rolled-back ids.
    pub ledger: Ledger,
    /// Ids whose commit call failed: resolved by [`Book::resolve`].
    pub in_doubt: Vec<Uuid>,
    /// Poison events and the events held behind them: committed, but expected in the parked
    /// table, never on the topic.
    pub expected_parked: HashSet<Uuid>,
    /// Transactions attempted, and how many failed with an error (server down, session cut).
    pub tx_errors: usize,
}

/// The shared book.
pub type SharedBook = Arc<Mutex<Book>>;

impl Book {
    /// Looks the in-doubt ids up in the outbox table: present means committed.
    pub async fn resolve(book: &SharedBook, pool: &PgPool) -> Result<()> {
        let doubt = std::mem::take(&mut book.lock().unwrap().in_doubt);
        if doubt.is_empty() {
            return Ok(());
        }
        let present: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox WHERE id = ANY($1)")
            .bind(&doubt)
            .fetch_all(pool)
            .await?;
        let present: HashSet<Uuid> = present.into_iter().collect();
        let mut b = book.lock().unwrap();
        for id in doubt {
            if present.contains(&id) {
                b.ledger.committed.insert(id);
            } else {
                b.ledger.rolled_back.insert(id);
            }
        }
        Ok(())
    }
}

/// A database created for one run.
pub struct RunDb {
    /// Database name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A pool on it.
    pub pool: PgPool,
}

impl RunDb {
    /// Creates the database, the outbox table and the aggregates table.
    pub async fn create(admin_url: &str, name: &str, accounts: usize) -> Result<Self> {
        let url = create_database(admin_url, name).await?;
        let pool = PgPoolOptions::new()
            .max_connections(24)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(PgConnectOptions::from_str(&url)?.application_name("chaos-writer"))
            .await?;
        migrate_outbox(&pool).await?;
        create_accounts(&pool, accounts).await?;
        Ok(Self {
            name: name.to_owned(),
            url,
            pool,
        })
    }

    /// Adds an aggregate row (for dedicated aggregates: long-open, huge, hostile).
    pub async fn add_account(&self, id: &str) -> Result<()> {
        sqlx::query("INSERT INTO accounts (id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Rows not yet acknowledged by a relay.
    pub async fn unpublished(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Ids in the parked table.
    pub async fn parked(&self) -> Result<HashSet<Uuid>> {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox_parked")
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
        Ok(ids.into_iter().collect())
    }

    /// Terminates every session of the database, drops its replication slots and the database.
    pub async fn destroy(self, admin_url: &str) -> Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(admin_url).await?;
        for _ in 0..20 {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&self.name)
            .execute(&mut admin)
            .await?;
            let _ = sqlx::query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                 WHERE database = $1 AND NOT active",
            )
            .bind(&self.name)
            .execute(&mut admin)
            .await;
            let dropped = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\"",
                self.name
            )))
            .execute(&mut admin)
            .await;
            if dropped.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::bail!("could not drop database {}", self.name)
    }
}

/// The shape of a run's write load.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Concurrent writers.
    pub writers: usize,
    /// Transactions per writer.
    pub txs: usize,
    /// Shared aggregates the writers pick from.
    pub accounts: usize,
    /// Most events per transaction.
    pub max_events: usize,
    /// Percentage of transactions rolled back.
    pub rollback_pct: u32,
    /// Percentage of transactions that linger before committing.
    pub linger_pct: u32,
    /// Longest linger.
    pub linger_max_ms: u64,
    /// Pause between a writer's transactions (spreads the load over the fault window).
    pub pace_ms: u64,
    /// Long-open transactions: each takes its `seq` at the start and commits after this long.
    pub long_open_ms: Vec<u64>,
    /// Huge transactions: (events, commit?).
    pub huge: Vec<(usize, bool)>,
    /// Hostile aggregate ids, event types, headers and payloads.
    pub hostile: bool,
    /// How events are written (`table` or `insert_delete`).
    pub write_mode: WriteMode,
}

const HOSTILE_IDS: &[&str] = &[
    "acct'\"; DROP TABLE accounts; --",
    "ünïcødé-🚀-名前",
    "new\nline\ttab",
    "back\\slash\\\\",
    "{aggregatetype}.{type}",
    "%s%n%x",
    " leading and trailing ",
    "$1 $$ $tag$",
];
const HOSTILE_TYPES: &[&str] = &[
    "Evt'; DELETE FROM outbox; --",
    "Ünïcødé Event",
    "type\"with\"quotes",
];

/// One business transaction. Records its ids in the book once the outcome is known.
#[allow(clippy::too_many_arguments)] // every knob of one business transaction
pub async fn business_tx(
    pool: &PgPool,
    mode: WriteMode,
    aggregate_type: &str,
    account: &str,
    events: usize,
    linger: Duration,
    commit: bool,
    hostile: Option<&mut StdRng>,
    book: &SharedBook,
) -> Result<()> {
    let outbox = Outbox::default().with_write_mode(mode);
    let mut tx = pool.begin().await?;
    let mut hostile = hostile;
    let ids = write_account_events(&mut tx, &outbox, account, events, |seq| {
        match hostile.as_deref_mut() {
            None => balance_changed(aggregate_type, account, seq),
            Some(rng) => {
                let t = HOSTILE_TYPES[rng.random_range(0..HOSTILE_TYPES.len())];
                let payload = match rng.random_range(0..4) {
                    0 => None,
                    1 => Some(serde_json::json!({"sql": "'); DROP TABLE outbox; --", "u": "ü🚀\u{202e}", "v": seq})),
                    2 => {
                        let mut v = serde_json::json!(seq);
                        for _ in 0..40 {
                            v = serde_json::json!([v]);
                        }
                        Some(v)
                    }
                    _ => Some(serde_json::json!({"big": "y".repeat(60_000), "v": seq})),
                };
                NewEvent::new(aggregate_type, account, t, payload)
                    .with_header("x-hostile", "a\r\nInjected: 1")
                    .with_header("x-unicode", "ü🚀")
            }
        }
    })
    .await?;
    if !linger.is_zero() {
        tokio::time::sleep(linger).await;
    }
    if commit {
        match tx.commit().await {
            Ok(()) => book.lock().unwrap().ledger.committed.extend(ids),
            Err(e) => {
                book.lock().unwrap().in_doubt.extend(ids);
                return Err(e.into());
            }
        }
    } else {
        // A failed rollback leaves nothing committed either.
        let _ = tx.rollback().await;
        book.lock().unwrap().ledger.rolled_back.extend(ids);
    }
    Ok(())
}

/// Writes a huge transaction of `events` events on a dedicated aggregate.
pub async fn huge_tx(
    db: &RunDb,
    mode: WriteMode,
    aggregate_type: &str,
    account: &str,
    events: usize,
    commit: bool,
    book: &SharedBook,
) -> Result<()> {
    db.add_account(account).await?;
    let outbox = Outbox::default().with_write_mode(mode);
    let mut tx = db.pool.begin().await?;
    let mut all = Vec::with_capacity(events);
    for chunk in (1..=events as i64).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|&seq| {
                NewEvent::new(
                    aggregate_type,
                    account,
                    "Bulk",
                    Some(serde_json::json!({ "n": seq })),
                )
                .with_aggregate_seq(seq)
            })
            .collect();
        all.extend(outbox.publish_new(&mut tx, batch).await?);
    }
    if commit {
        match tx.commit().await {
            Ok(()) => book.lock().unwrap().ledger.committed.extend(all),
            Err(e) => {
                book.lock().unwrap().in_doubt.extend(all);
                return Err(e.into());
            }
        }
    } else {
        let _ = tx.rollback().await;
        book.lock().unwrap().ledger.rolled_back.extend(all);
    }
    Ok(())
}

/// Runs the writers, the long-open and the huge transactions; returns when all are done.
/// Errors of single transactions (server restarting, sessions cut) are counted, not fatal.
pub async fn run_writers(
    db: &RunDb,
    aggregate_type: &str,
    w: &Workload,
    seed: u64,
    book: SharedBook,
) -> Result<()> {
    let mut tasks = Vec::new();
    let mode = w.write_mode;
    for (k, &ms) in w.long_open_ms.iter().enumerate() {
        let account = format!("long-open-{k}");
        db.add_account(&account).await?;
        let pool = db.pool.clone();
        let book = book.clone();
        let at = aggregate_type.to_owned();
        tasks.push(tokio::spawn(async move {
            if business_tx(
                &pool,
                mode,
                &at,
                &account,
                2,
                Duration::from_millis(ms),
                true,
                None,
                &book,
            )
            .await
            .is_err()
            {
                book.lock().unwrap().tx_errors += 1;
            }
        }));
    }
    let hostile_accounts: Vec<String> = if w.hostile {
        for id in HOSTILE_IDS {
            db.add_account(id).await?;
        }
        let long = "L".repeat(1000);
        db.add_account(&long).await?;
        HOSTILE_IDS
            .iter()
            .map(|s| s.to_string())
            .chain([long])
            .collect()
    } else {
        Vec::new()
    };
    for writer in 0..w.writers {
        let pool = db.pool.clone();
        let book = book.clone();
        let at = aggregate_type.to_owned();
        let w = w.clone();
        let hostile_accounts = hostile_accounts.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (writer as u64).wrapping_mul(0x9e37_79b9));
            for _ in 0..w.txs {
                let hostile = !hostile_accounts.is_empty() && rng.random_range(0..3) == 0;
                let account = if hostile {
                    hostile_accounts[rng.random_range(0..hostile_accounts.len())].clone()
                } else {
                    format!("acct-{}", rng.random_range(0..w.accounts))
                };
                let events = rng.random_range(1..=w.max_events);
                let linger = if rng.random_range(0..100) < w.linger_pct {
                    Duration::from_millis(rng.random_range(0..=w.linger_max_ms))
                } else {
                    Duration::ZERO
                };
                let commit = rng.random_range(0..100) >= w.rollback_pct;
                let mut hrng = StdRng::seed_from_u64(rng.random());
                let r = business_tx(
                    &pool,
                    w.write_mode,
                    &at,
                    &account,
                    events,
                    linger,
                    commit,
                    hostile.then_some(&mut hrng),
                    &book,
                )
                .await;
                if r.is_err() {
                    book.lock().unwrap().tx_errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if w.pace_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..=w.pace_ms)))
                        .await;
                }
            }
        }));
    }
    for (k, &(events, commit)) in w.huge.iter().enumerate() {
        let book = book.clone();
        let at = aggregate_type.to_owned();
        let account = format!("huge-{k}");
        let r = huge_tx(db, w.write_mode, &at, &account, events, commit, &book).await;
        if r.is_err() {
            book.lock().unwrap().tx_errors += 1;
        }
    }
    for t in tasks {
        t.await.context("writer task panicked")?;
    }
    Ok(())
}

/// Commits one probe event on its own aggregate and returns its id.
pub async fn probe(
    db: &RunDb,
    mode: WriteMode,
    aggregate_type: &str,
    n: usize,
    book: &SharedBook,
) -> Result<Uuid> {
    let outbox = Outbox::default().with_write_mode(mode);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let mut tx = db.pool.begin().await?;
            let ids = outbox
                .publish_new(
                    &mut tx,
                    vec![
                        NewEvent::new(aggregate_type, format!("probe-{n}"), "Probe", None)
                            .with_aggregate_seq(1),
                    ],
                )
                .await?;
            tx.commit().await?;
            anyhow::Ok(ids[0])
        };
        match attempt.await {
            Ok(id) => {
                book.lock().unwrap().ledger.committed.insert(id);
                return Ok(id);
            }
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits until the relay has acknowledged `id` (row marked published); `None` on timeout.
pub async fn wait_published(db: &RunDb, id: Uuid, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        let done: Option<bool> =
            sqlx::query_scalar("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await
                .ok()
                .flatten();
        if done == Some(true) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Inserts poison events with plain SQL, each on its own aggregate followed by a healthy event
/// of the same aggregate (held behind it): an oversized payload, an illegal topic, a legal topic
/// outside the allowed ones, and malformed rows (`headers` not an object, `schema_version` 0) as
/// rows written before the table's checks (migration 4) or past them. Returns the notes of
/// inserts the table itself refused.
pub async fn poison(db: &RunDb, aggregate_type: &str, book: &SharedBook) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    // Malformed rows can only be there if the checks are not: drop them, as on an older table.
    sqlx::query(
        "ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_headers_object, \
         DROP CONSTRAINT IF EXISTS outbox_schema_version_check",
    )
    .execute(&db.pool)
    .await?;
    // (aggregate, payload, topic, headers, schema_version)
    let cases = [
        (
            "poison-size",
            "jsonb_build_object('blob', repeat('x', 1500000))",
            None,
            "{}",
            1,
        ),
        (
            "poison-topic",
            "'{}'::jsonb",
            Some("bad topic!/.."),
            "{}",
            1,
        ),
        (
            "poison-reach",
            "'{}'::jsonb",
            Some("payments.commands"),
            "{}",
            1,
        ),
        (
            "poison-headers",
            "'{}'::jsonb",
            None,
            "[\"not an object\"]",
            1,
        ),
        ("poison-version", "'{}'::jsonb", None, "{}", 0),
    ];
    for (k, (aggregate, payload, topic, headers, version)) in cases.iter().enumerate() {
        let poison_id = Uuid::new_v4();
        let sql = format!(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, topic, aggregate_seq,
                                 headers, schema_version)
             VALUES ($1, $2, $3, 'Poison', {payload}, $4, 1, $5::jsonb, $6)"
        );
        let r = sqlx::query(AssertSqlSafe(sql))
            .bind(poison_id)
            .bind(aggregate_type)
            .bind(format!("{aggregate}-{k}"))
            .bind(topic)
            .bind(headers)
            .bind(version)
            .execute(&db.pool)
            .await;
        if let Err(e) = r {
            notes.push(format!("the table refused poison `{aggregate}`: {e}"));
            continue;
        }
        let behind = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, aggregate_seq)
             VALUES ($1, $2, $3, 'Healthy', '{}', 2)",
        )
        .bind(behind)
        .bind(aggregate_type)
        .bind(format!("{aggregate}-{k}"))
        .execute(&db.pool)
        .await?;
        let mut b = book.lock().unwrap();
        b.expected_parked.insert(poison_id);
        b.expected_parked.insert(behind);
    }
    Ok(notes)
}
