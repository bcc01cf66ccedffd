//! Writers for end-to-end tests: business transactions that lock an aggregate row, write events
//! with consecutive per-aggregate sequence numbers, linger so commits interleave out of `seq`
//! order, and commit or roll back — each outcome recorded in a [`Ledger`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use outbox_core::{NewEvent, Outbox, WriteMode};
use rand::RngExt;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{Consumed, Ledger, TestDb, consume, create_topic};

/// Creates the aggregates table writers lock to serialise writes per aggregate.
pub async fn create_accounts(pool: &PgPool, n: usize) -> Result<Vec<String>> {
    sqlx::query("CREATE TABLE accounts (id text PRIMARY KEY, version bigint NOT NULL DEFAULT 0)")
        .execute(pool)
        .await?;
    let ids: Vec<String> = (0..n).map(|i| format!("acct-{i}")).collect();
    sqlx::query("INSERT INTO accounts (id) SELECT unnest($1::text[])")
        .bind(&ids)
        .execute(pool)
        .await?;
    Ok(ids)
}

/// The event a business transaction writes for its account's per-aggregate sequence number
/// `seq`.
pub fn balance_changed(aggregate_type: &str, account: &str, seq: i64) -> NewEvent {
    NewEvent::new(
        aggregate_type,
        account,
        "BalanceChanged",
        Some(serde_json::json!({ "version": seq, "note": "x".repeat(50) })),
    )
}

/// The body of a business transaction, in `tx`: locks `account`'s row, writes `events` events
/// made by `event` for the account's next per-aggregate sequence numbers (each tagged with its
/// number), and stores the account's new version. Returns the ids written; committing, rolling
/// back and recording the outcome are the caller's.
pub async fn write_account_events(
    tx: &mut PgConnection,
    outbox: &Outbox,
    account: &str,
    events: usize,
    mut event: impl FnMut(i64) -> NewEvent,
) -> Result<Vec<Uuid>> {
    let version: i64 = sqlx::query_scalar("SELECT version FROM accounts WHERE id = $1 FOR UPDATE")
        .bind(account)
        .fetch_one(&mut *tx)
        .await?;
    let batch: Vec<NewEvent> = (1..=events as i64)
        .map(|i| event(version + i).with_aggregate_seq(version + i))
        .collect();
    let ids = outbox.publish_new(&mut *tx, batch).await?;
    sqlx::query("UPDATE accounts SET version = $2 WHERE id = $1")
        .bind(account)
        .bind(version + events as i64)
        .execute(&mut *tx)
        .await?;
    Ok(ids)
}

/// A `Changed` event of `aggregate` with per-aggregate sequence `seq` and a payload padded to
/// about `bytes` bytes (to make an event a sink refuses for its size).
pub fn padded_event(aggregate_type: &str, aggregate: &str, seq: i64, bytes: usize) -> NewEvent {
    NewEvent::new(
        aggregate_type,
        aggregate,
        "Changed",
        Some(serde_json::json!({ "seq": seq, "pad": "x".repeat(bytes) })),
    )
    .with_aggregate_seq(seq)
}

/// Writes `events` into the default outbox table in one committed transaction; their ids.
pub async fn commit_events(db: &TestDb, events: Vec<NewEvent>) -> Result<Vec<Uuid>> {
    let mut tx = db.pool.begin().await?;
    let ids = Outbox::default().publish_new(&mut tx, events).await?;
    tx.commit().await?;
    Ok(ids)
}

/// One business transaction: lock the aggregate, write `events` events with consecutive
/// per-aggregate sequence numbers, linger, then commit or roll back; recorded in `ledger`.
#[allow(clippy::too_many_arguments)]
pub async fn business_tx(
    pool: &PgPool,
    outbox: &Outbox,
    aggregate_type: &str,
    account: &str,
    events: usize,
    linger: Duration,
    commit: bool,
    ledger: &Mutex<Ledger>,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    let ids = write_account_events(&mut tx, outbox, account, events, |seq| {
        balance_changed(aggregate_type, account, seq)
    })
    .await?;
    if !linger.is_zero() {
        tokio::time::sleep(linger).await;
    }
    if commit {
        tx.commit().await?;
        ledger.lock().unwrap().committed.extend(ids);
    } else {
        tx.rollback().await?;
        ledger.lock().unwrap().rolled_back.extend(ids);
    }
    Ok(())
}

/// `writers` concurrent writers, `txs` transactions each, random accounts, random lingering (so
/// commits interleave out of insertion order), one in ten rolled back.
pub async fn run_writers(
    pool: &PgPool,
    mode: WriteMode,
    aggregate_type: &str,
    accounts: &[String],
    writers: usize,
    txs: usize,
    ledger: Arc<Mutex<Ledger>>,
) -> Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let pool = pool.clone();
        let accounts = accounts.to_vec();
        let ledger = ledger.clone();
        let aggregate_type = aggregate_type.to_owned();
        tasks.push(tokio::spawn(async move {
            let outbox = Outbox::default().with_write_mode(mode);
            for _ in 0..txs {
                let (account, events, linger, commit) = {
                    let mut rng = rand::rng();
                    (
                        accounts[rng.random_range(0..accounts.len())].clone(),
                        rng.random_range(1..=3),
                        Duration::from_millis(rng.random_range(0..6)),
                        rng.random_range(0..10) != 0,
                    )
                };
                business_tx(
                    &pool,
                    &outbox,
                    &aggregate_type,
                    &account,
                    events,
                    linger,
                    commit,
                    &ledger,
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// A write workload on its own aggregate type: the accounts its writers lock, the topic its
/// events are routed to (`outbox.event.<aggregate type>`, created up front) and the [`Ledger`] of
/// what they committed and rolled back. A clone shares the ledger.
#[derive(Clone)]
pub struct Workload {
    /// The pool writers use.
    pub pool: PgPool,
    /// A unique aggregate type.
    pub aggregate_type: String,
    /// Its default topic.
    pub topic: String,
    /// The account ids writers pick from.
    pub accounts: Vec<String>,
    /// What the writers wrote.
    pub ledger: Arc<Mutex<Ledger>>,
}

impl Workload {
    /// Creates `accounts` accounts in `db` (see [`create_accounts`]), a unique aggregate type
    /// named after `prefix`, and its topic with `partitions` partitions.
    pub async fn create(
        db: &TestDb,
        prefix: &str,
        accounts: usize,
        partitions: i32,
    ) -> Result<Self> {
        let accounts = create_accounts(&db.pool, accounts).await?;
        let aggregate_type = crate::unique(prefix);
        let topic = format!("outbox.event.{aggregate_type}");
        create_topic(&topic, partitions).await?;
        Ok(Self {
            pool: db.pool.clone(),
            aggregate_type,
            topic,
            accounts,
            ledger: Arc::new(Mutex::new(Ledger::default())),
        })
    }

    /// Runs `writers` concurrent writers of `txs` transactions each in write mode `mode` (see
    /// [`run_writers`]) and waits for them.
    pub async fn write(&self, mode: WriteMode, writers: usize, txs: usize) -> Result<()> {
        run_writers(
            &self.pool,
            mode,
            &self.aggregate_type,
            &self.accounts,
            writers,
            txs,
            self.ledger.clone(),
        )
        .await
    }

    /// [`Workload::write`] in a task of its own.
    pub fn spawn_writers(
        &self,
        mode: WriteMode,
        writers: usize,
        txs: usize,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let work = self.clone();
        tokio::spawn(async move { work.write(mode, writers, txs).await })
    }

    /// Adds the account `acct-long-open` and starts, in a task of its own, a transaction (table
    /// mode) that writes two events on it first and commits `linger` later, after the writers
    /// started meanwhile.
    pub async fn spawn_long_open_tx(
        &self,
        linger: Duration,
    ) -> Result<tokio::task::JoinHandle<Result<()>>> {
        sqlx::query("INSERT INTO accounts (id) VALUES ('acct-long-open')")
            .execute(&self.pool)
            .await?;
        let work = self.clone();
        Ok(tokio::spawn(async move {
            business_tx(
                &work.pool,
                &Outbox::default(),
                &work.aggregate_type,
                "acct-long-open",
                2,
                linger,
                true,
                &work.ledger,
            )
            .await
        }))
    }

    /// A copy of the ledger as it stands.
    pub fn ledger(&self) -> Ledger {
        self.ledger.lock().unwrap().clone()
    }

    /// Reads the topic back until at least every event committed in `ledger` has arrived and
    /// then nothing new for `quiet`, or until `timeout` (see [`consume`]).
    pub async fn consume(
        &self,
        ledger: &Ledger,
        quiet: Duration,
        timeout: Duration,
    ) -> Result<Vec<Consumed>> {
        consume(&[&self.topic], ledger.committed.len(), quiet, timeout).await
    }
}
