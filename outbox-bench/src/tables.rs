//! The `tables` section: one `outbox-relay` process relaying the same total backlog spread over
//! 1, 10, 50 and 100 outbox tables (`tables = "bt_*.outbox"`, one pipeline per table), for the drain
//! throughput and the per-table cost in CPU, memory and PostgreSQL sessions.
//!
//! Each run works in its own database: the tables `bt_<i>.outbox` are migrated, the relay is
//! started on them (start-up: from its spawn until every table's pipeline holds its leader lock;
//! then its idle RSS, threads and sessions are read), then `events / tables` rows per table are
//! committed in one transaction (with `ANALYZE`), and the drain runs from that commit until the
//! relay's metrics (summed over the `table` label) count every event published; the CPU counted
//! is the drain's. Sessions are read from `pg_stat_activity` by the
//! relay's `application_name`s (`outbox-relay` = a pipeline's leader session,
//! `outbox-relay-listen` = the LISTEN session every table shares, `outbox-relay-ack` = the pool
//! of `pool_size` sessions every table's row marks share), sampled during the drain (peak) and
//! once idle before it. A run whose sessions could not fit in the server's `max_connections`
//! (one per table plus the shared ones, see [`sessions_needed`]) is skipped with the reason
//! instead of failing the others.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sqlx::AssertSqlSafe;

use crate::db::{AGGREGATES, BenchDb, PAYLOAD_BYTES, unique};
use crate::kafka::create_topic;
use crate::relay::{RelayProcess, http_get};
use crate::sections::{Ctx, per_sec};

/// The relay's default `pool_size`: the sessions every table's row marks share.
const POOL_SIZE: usize = 4;

/// The most sessions a relay of `tables` tables holds at once (docs/operations.md): a leader
/// session per table, the shared pool, the shared LISTEN session and the admin endpoint's two.
fn sessions_needed(tables: usize) -> i64 {
    (tables + POOL_SIZE + 1 + 2) as i64
}

/// What the section runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Total backlog of every run.
    pub events: u64,
    /// Numbers of tables, one run each.
    pub tables: Vec<usize>,
}

/// One drain.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Outbox tables relayed by the one relay process.
    pub tables: usize,
    /// Total backlog (spread evenly over the tables).
    pub events: u64,
    /// Wall time from the backlog's commit until every event was published, seconds.
    pub seconds: f64,
    /// Events per second over that time.
    pub events_per_sec: f64,
    /// Time from spawning the relay until every table's pipeline held its leader lock, seconds.
    pub startup_seconds: f64,
    /// The relay's user + system CPU time during the drain, seconds.
    pub cpu_seconds: f64,
    /// Its CPU per event, µs.
    pub cpu_us_per_event: f64,
    /// Its peak resident set size, bytes.
    pub peak_rss_bytes: u64,
    /// Its resident set size once every pipeline is active, before the backlog, bytes.
    pub idle_rss_bytes: u64,
    /// Its threads then (every producer has librdkafka threads of its own).
    pub threads: u64,
    /// The most relay sessions seen at once during the drain, by `application_name`.
    pub peak_sessions: BTreeMap<String, i64>,
    /// The relay sessions once every pipeline is active, before the backlog, by
    /// `application_name`.
    pub idle_sessions: BTreeMap<String, i64>,
    /// Peak sessions of all kinds ÷ tables.
    pub peak_sessions_per_table: f64,
    /// Peak sessions of all kinds.
    pub peak_sessions_total: i64,
    /// Why the run was skipped, if it was (its figures are then 0).
    pub skipped: Option<String>,
}

/// The section's result.
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    /// The server's `max_connections`.
    pub max_connections: i64,
    /// One run per number of tables.
    pub runs: Vec<Run>,
}

/// Runs the section.
pub async fn run(ctx: &mut Ctx, plan: &Plan) -> Result<Section> {
    let mut runs = Vec::new();
    let mut max_connections = 0;
    for &n in &plan.tables {
        let (run, max) = drain(ctx, plan.events, n).await?;
        max_connections = max;
        runs.push(run);
    }
    Ok(Section {
        max_connections,
        runs,
    })
}

/// The relay's sessions on `db` now, by `application_name`.
async fn sessions(db: &BenchDb) -> Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT application_name, count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'outbox-relay%'
         GROUP BY 1",
    )
    .fetch_all(&db.pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The sum of every series of `name` (any labels) in a scrape, and how many series there are.
fn sum_series(scrape: &str, name: &str) -> (f64, usize) {
    let mut sum = 0.0;
    let mut n = 0;
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
            n += 1;
        }
    }
    (sum, n)
}

/// A number field of `/proc/<pid>/status` (`VmRSS:`, `Threads:`), without its unit.
fn proc_status(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .with_context(|| format!("no {field} in /proc/<pid>/status"))
}

/// One drain of `events` spread over `tables` tables; with the server's `max_connections`.
async fn drain(ctx: &mut Ctx, events: u64, tables: usize) -> Result<(Run, i64)> {
    let bin = ctx.relay_bin()?;
    let db = BenchDb::create(&ctx.admin_url, "tables", &ctx.registry).await?;
    let max: i64 = sqlx::query_scalar("SELECT current_setting('max_connections')::int8")
        .fetch_one(&db.pool)
        .await?;
    let in_use: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity")
        .fetch_one(&db.pool)
        .await?;
    let mut run = Run {
        tables,
        events,
        seconds: 0.0,
        events_per_sec: 0.0,
        startup_seconds: 0.0,
        cpu_seconds: 0.0,
        cpu_us_per_event: 0.0,
        peak_rss_bytes: 0,
        idle_rss_bytes: 0,
        threads: 0,
        peak_sessions: BTreeMap::new(),
        idle_sessions: BTreeMap::new(),
        peak_sessions_per_table: 0.0,
        peak_sessions_total: 0,
        skipped: None,
    };
    // Keep 3 for superusers.
    let needed = sessions_needed(tables);
    if needed > max - in_use - 3 {
        let why = format!(
            "{tables} tables need up to {needed} sessions (one per table + {} shared); the \
             server has max_connections = {max} with {in_use} in use",
            needed - tables as i64
        );
        eprintln!("bench: tables ({tables}): skipped: {why}");
        run.skipped = Some(why);
        db.drop().await?;
        return Ok((run, max));
    }
    let per_table = events / tables as u64;
    let events = per_table * tables as u64;
    run.events = events;
    for i in 0..tables {
        let schema = format!("bt_{i}");
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&db.pool)
            .await?;
        let table = outbox_core::OutboxTable::new(Some(&schema), "outbox")?;
        let mut conn = db.pool.acquire().await?;
        outbox_core::migrate(&mut conn, &table).await?;
    }
    let topic = unique("bench_tables");
    create_topic(&ctx.bootstrap, &topic).await?;
    let mut env = ctx.relay_env(&db, "polling", &topic, "unused_slot");
    env.push(("OUTBOX_TABLES".to_owned(), "bt_*.outbox".to_owned()));
    eprintln!("bench: tables ({tables}): starting the relay on the empty tables");
    let spawned = Instant::now();
    let mut relay = RelayProcess::start(&bin, &env).await?;
    let deadline = spawned + Duration::from_secs(120);
    loop {
        relay.check_alive()?;
        let scrape = http_get(&relay.admin, "/metrics").await?;
        let (leaders, series) = sum_series(&scrape, "outbox_relay_leader");
        if series == tables && leaders as usize == tables {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "tables ({tables}): {leaders} of {tables} pipelines active after 120 s; log:\n{}",
                relay.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.startup_seconds = spawned.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.idle_rss_bytes = proc_status(relay.pid(), "VmRSS:")? * 1024;
    run.threads = proc_status(relay.pid(), "Threads:")?;
    run.idle_sessions = sessions(&db).await?;

    // The whole backlog becomes visible at one commit.
    eprintln!("bench: tables ({tables}): committing {events} events ({per_table} per table)");
    let cpu0 = relay.cpu()?;
    let mut tx = db.pool.begin().await?;
    for i in 0..tables {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO bt_{i}.outbox (id, aggregatetype, aggregateid, type, payload)
             SELECT gen_random_uuid(), 'account', 'acct-' || (g % {AGGREGATES}), 'Changed',
                    jsonb_build_object('seq', g, 'note', repeat('x', {pad}))
             FROM generate_series(1, $1::bigint) AS g",
            pad = PAYLOAD_BYTES - 30,
        )))
        .bind(per_table as i64)
        .execute(&mut *tx)
        .await
        .context("filling the backlog")?;
        sqlx::query(AssertSqlSafe(format!("ANALYZE bt_{i}.outbox")))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let committed = Instant::now();
    let deadline = committed + Duration::from_secs(120 + events / 1000);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        relay.check_alive()?;
        let scrape = http_get(&relay.admin, "/metrics").await?;
        let (published, _) = sum_series(&scrape, "outbox_relay_events_published_total");
        let now = sessions(&db).await?;
        if now.values().sum::<i64>() > run.peak_sessions.values().sum::<i64>() {
            run.peak_sessions = now;
        }
        if published as u64 >= events {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "tables ({tables}): {published} of {events} published before the deadline; log:\n{}",
                relay.log_tail()
            );
        }
    }
    let elapsed = committed.elapsed();
    run.seconds = elapsed.as_secs_f64();
    run.events_per_sec = per_sec(events, elapsed);
    run.cpu_seconds = relay.cpu()?.saturating_sub(cpu0).as_secs_f64();
    run.cpu_us_per_event = run.cpu_seconds * 1e6 / events.max(1) as f64;
    run.peak_rss_bytes = relay.peak_rss()?;
    run.peak_sessions_total = run.peak_sessions.values().sum::<i64>();
    run.peak_sessions_per_table = run.peak_sessions_total as f64 / tables as f64;
    relay.stop().await?;
    db.drop().await?;
    eprintln!(
        "bench: tables ({tables}): {:.0} events/s ({:.2} s), start-up {:.2} s, drain CPU {:.2} s, idle RSS {:.0} MiB, peak RSS {:.0} MiB, {} threads, idle sessions {:?}, peak {:?}",
        run.events_per_sec,
        run.seconds,
        run.startup_seconds,
        run.cpu_seconds,
        run.idle_rss_bytes as f64 / 1048576.0,
        run.peak_rss_bytes as f64 / 1048576.0,
        run.threads,
        run.idle_sessions,
        run.peak_sessions,
    );
    Ok((run, max))
}

/// The section as lines of text for the report.
pub fn table(section: &Section) -> String {
    let mut out = format!(
        "tables per relay (one relay, same total backlog; server max_connections = {}):\n",
        section.max_connections
    );
    out.push_str(
        "  tables   events/s   seconds  start-up s  CPU s  CPU µs/ev  peak RSS MiB  idle RSS MiB  threads  peak sessions (per table)\n",
    );
    for r in &section.runs {
        if let Some(why) = &r.skipped {
            out.push_str(&format!("  {:>6}   skipped: {why}\n", r.tables));
            continue;
        }
        out.push_str(&format!(
            "  {:>6}   {:>8.0}   {:>7.2}  {:>10.2}  {:>5.2}  {:>9.1}  {:>12.1}  {:>12.1}  {:>7}  {:>13} ({:.2})\n",
            r.tables,
            r.events_per_sec,
            r.seconds,
            r.startup_seconds,
            r.cpu_seconds,
            r.cpu_us_per_event,
            r.peak_rss_bytes as f64 / 1048576.0,
            r.idle_rss_bytes as f64 / 1048576.0,
            r.threads,
            r.peak_sessions_total,
            r.peak_sessions_per_table,
        ));
    }
    out
}
