//! Helpers of the multi-table tests (`tests/tests/multi_table*.rs`): outbox tables in schemas of
//! their own, interleaved writers, the exactness check, and a relay process started on a
//! `relay.toml` (start, wait for its admin endpoint, stop cleanly).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outbox_core::{NewEvent, Outbox, OutboxTable};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::{Consumed, RelayProcess, TestDb, admin_addr, unique};

/// How long the helpers wait for a relay to come up or for a table to drain.
pub const LONG: Duration = Duration::from_secs(90);

/// Creates the table's schema (if any) and migrates the outbox table in it.
pub async fn migrate_table(db: &TestDb, table: &str) -> Result<()> {
    let t = OutboxTable::parse(table)?;
    let mut conn = db.connect().await?;
    if let Some(schema) = t.schema() {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            schema.quoted()
        )))
        .execute(&mut conn)
        .await?;
    }
    outbox_core::migrate(&mut conn, &t)
        .await
        .with_context(|| format!("migrating {table}"))?;
    Ok(())
}

/// Writes `per_aggregate` events for each of `aggregates` aggregates (`agg-0`, `agg-1`, …) of
/// type `aggregate_type` into `table`, interleaved over aggregates, one transaction per round;
/// returns each aggregate's event ids in write order.
pub async fn write_events(
    db: &TestDb,
    table: &str,
    aggregate_type: &str,
    aggregates: usize,
    per_aggregate: usize,
) -> Result<BTreeMap<String, Vec<Uuid>>> {
    write_rounds(
        db,
        table,
        aggregate_type,
        aggregates,
        1..=per_aggregate as i64,
    )
    .await
}

/// [`write_events`] for the rounds `seqs` only (to continue a writer after a pause).
pub async fn write_rounds(
    db: &TestDb,
    table: &str,
    aggregate_type: &str,
    aggregates: usize,
    seqs: std::ops::RangeInclusive<i64>,
) -> Result<BTreeMap<String, Vec<Uuid>>> {
    let outbox = Outbox::new(OutboxTable::parse(table)?);
    let mut written: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for seq in seqs {
        let events: Vec<NewEvent> = (0..aggregates)
            .map(|a| {
                NewEvent::new(
                    aggregate_type,
                    format!("agg-{a}"),
                    "Changed",
                    Some(serde_json::json!({ "seq": seq })),
                )
                .with_aggregate_seq(seq)
            })
            .collect();
        let mut tx = db.pool.begin().await?;
        let ids = outbox.publish_new(&mut tx, events).await?;
        tx.commit().await?;
        for (a, id) in ids.into_iter().enumerate() {
            written.entry(format!("agg-{a}")).or_default().push(id);
        }
    }
    Ok(written)
}

/// Rows of `table` not yet published.
pub async fn pending(db: &TestDb, table: &str) -> Result<i64> {
    let t = OutboxTable::parse(table)?;
    Ok(sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {} WHERE published_at IS NULL",
        t.qualified()
    )))
    .fetch_one(&db.pool)
    .await?)
}

/// Waits until every row of `table` is published.
pub async fn wait_table_drained(db: &TestDb, table: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = pending(db, table).await?;
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{n} events of {table} still unpublished after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that `records` hold exactly the events of `written` — none lost, none duplicated —
/// and each aggregate's in write order (records keyed by aggregate id).
pub fn check_exact_and_ordered(
    records: &[Consumed],
    written: &BTreeMap<String, Vec<Uuid>>,
    what: &str,
) -> Result<()> {
    let mut seen: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for r in records {
        ensure!(
            ids.insert(r.event_id()),
            "{what}: event {} arrived twice",
            r.event_id()
        );
        seen.entry(r.key.clone().unwrap_or_default())
            .or_default()
            .push(r.event_id());
    }
    let expected: usize = written.values().map(Vec::len).sum();
    ensure!(
        records.len() == expected,
        "{what}: {} records for {expected} events",
        records.len()
    );
    for (aggregate, ids) in written {
        ensure!(
            seen.get(aggregate) == Some(ids),
            "{what}: aggregate {aggregate} arrived as {:?}, written as {ids:?}",
            seen.get(aggregate)
        );
    }
    Ok(())
}

/// Writes `text` to a fresh `relay.toml` and returns its path.
pub fn config_file(text: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(unique("outbox-multi"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("relay.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts a relay process on `config` with its admin endpoint on a free port (not waiting for
/// it: see [`wait_admin`]).
pub async fn start_with_config(
    db: &TestDb,
    config: &Path,
    env: &[(&str, &str)],
) -> Result<RelayProcess> {
    let path = config.to_str().context("a UTF-8 path")?;
    let mut all = vec![("OUTBOX_ADMIN_ADDR", "127.0.0.1:0")];
    all.extend_from_slice(env);
    RelayProcess::start(db, &["--config", path], &all).await
}

/// Waits for the relay's admin endpoint and returns its address.
pub async fn wait_admin(relay: &RelayProcess) -> Result<String> {
    relay.wait_for_log("admin endpoint listening", LONG).await?;
    admin_addr(&relay.log()).context("admin address not logged")
}

/// Writes `toml` to a fresh `relay.toml`, starts a relay on it and waits for its admin endpoint:
/// the relay, the endpoint's address and the configuration's path.
pub async fn start_relay(
    db: &TestDb,
    toml: &str,
    env: &[(&str, &str)],
) -> Result<(RelayProcess, String, PathBuf)> {
    let config = config_file(toml)?;
    let relay = start_with_config(db, &config, env).await?;
    let addr = wait_admin(&relay).await?;
    Ok((relay, addr, config))
}

/// Stops the relay with SIGTERM, fails unless it exits with 0, and returns its log.
pub async fn stop_cleanly(relay: RelayProcess) -> Result<String> {
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    ensure!(code == 0, "the relay exited with {code}:\n{log}");
    Ok(log)
}

/// A labelled sample `name{table="…"}` of a scrape.
pub fn table_metric(scrape: &str, name: &str, table: &str) -> Option<f64> {
    let prefix = format!("{name}{{table=\"{table}\"}} ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Checks that `records` hold every event of `written` at least once and that each aggregate's
/// events arrived first in write order (re-sent copies after a failure may follow).
pub fn check_complete_and_ordered(
    records: &[Consumed],
    written: &BTreeMap<String, Vec<Uuid>>,
    what: &str,
) -> Result<()> {
    let mut first: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for r in records {
        if seen.insert(r.event_id()) {
            first
                .entry(r.key.clone().unwrap_or_default())
                .or_default()
                .push(r.event_id());
        }
    }
    for (aggregate, ids) in written {
        ensure!(
            first.get(aggregate) == Some(ids),
            "{what}: aggregate {aggregate} first arrived as {:?}, written as {ids:?}",
            first.get(aggregate)
        );
    }
    Ok(())
}

/// Every sample line of the metric `name` in a scrape (`name value` or `name{labels} value`).
pub fn metric_samples<'a>(scrape: &'a str, name: &str) -> Vec<&'a str> {
    scrape
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .collect()
}

/// The unlabelled sample `name value` of a scrape.
pub fn unlabelled_metric(scrape: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}
