//! The `tables` section: one `outbox-relay` process relaying the same total backlog spread over
//! 1, 10, 50 and 100 outbox tables (`tables = "bt_*.outbox"`, one pipeline per table), for the drain
//! throughput and the per-table cost in CPU, memory and PostgreSQL sessions, with each source
//! (`polling`, and `logical`: one slot and one publication for every table).
//!
//! Each run works in its own database: the tables `bt_<i>.outbox` are migrated, the relay is
//! started on them (start-up: from its spawn until every table's pipeline holds its leader lock,
//! and with the logical source its slot is streamed; then its idle RSS, threads and sessions are
//! read), then `events / tables` rows per table are committed in one transaction (with
//! `ANALYZE`), and the drain runs from that commit until the relay's metrics (summed over the
//! `table` label) count every event published; the CPU counted is the drain's. With the logical
//! source the rows are committed after the relay opened its slot, so they are streamed (a run
//! whose slot has not confirmed the backlog's WAL within 30 s of the drain fails), and the slot
//! is checked to be gone once the run's database is dropped: slots are cluster-wide and a
//! leftover one retains WAL. Sessions are read from `pg_stat_activity` by the relay's `application_name`s
//! (`outbox-relay` = a pipeline's leader session, and with the logical source also the slot's
//! lock session and its replication session, `outbox-relay-listen` = the LISTEN session every
//! polling table shares, `outbox-relay-ack` = the pool of `pool_size` sessions every table's row
//! marks share), sampled during the drain (peak) and once idle before it. A run whose sessions
//! could not fit in the server's `max_connections` (one per table plus the shared ones, see
//! [`sessions_needed`]) is skipped with the reason instead of failing the others.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::db::{AGGREGATES, BenchDb, PAYLOAD_BYTES, unique};
use crate::kafka::create_topic;
use crate::relay::{RelayProcess, http_get};
use crate::sections::{Ctx, per_sec};

/// The relay's default `pool_size`: the sessions every table's row marks share.
const POOL_SIZE: usize = 4;

/// The most sessions a relay of `tables` tables on `source` holds at once (docs/operations.md):
/// a leader session per table, the shared pool and the admin endpoint's two; with the polling
/// source the shared LISTEN session, with the logical one the slot's lock session, its
/// replication session and the source's pool of two for the slot and publication checks.
fn sessions_needed(source: &str, tables: usize) -> i64 {
    let per_source = if source == "logical" { 1 + 1 + 2 } else { 1 };
    (tables + POOL_SIZE + 2 + per_source) as i64
}

/// What the section runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Total backlog of every run.
    pub events: u64,
    /// Numbers of tables, one run each per source.
    pub tables: Vec<usize>,
    /// The relay's sources (`polling`, `logical`), one run each per number of tables.
    pub sources: Vec<&'static str>,
}

/// One drain.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The relay's source: `polling`, or `logical` (one slot and one publication for every
    /// table).
    pub source: String,
    /// Outbox tables relayed by the one relay process.
    pub tables: usize,
    /// Total backlog (spread evenly over the tables).
    pub events: u64,
    /// Wall time from the backlog's commit until every event was published, seconds.
    pub seconds: f64,
    /// Events per second over that time.
    pub events_per_sec: f64,
    /// Time from spawning the relay until every table's pipeline held its leader lock (and, with
    /// the logical source, its slot was streamed), seconds.
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

impl Run {
    /// A run of `events` over `tables` tables on `source` with nothing measured yet.
    fn new(source: &str, tables: usize, events: u64) -> Self {
        Self {
            source: source.to_owned(),
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
        }
    }
}

/// The section's result.
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    /// The server's `max_connections`.
    pub max_connections: i64,
    /// One run per number of tables and source (each number's sources side by side).
    pub runs: Vec<Run>,
}

/// Runs the section.
pub async fn run(ctx: &mut Ctx, plan: &Plan) -> Result<Section> {
    let mut runs = Vec::new();
    let mut max_connections = 0;
    for &n in &plan.tables {
        for source in &plan.sources {
            let (run, max) = drain(ctx, source, plan.events, n).await?;
            max_connections = max;
            runs.push(run);
        }
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

/// Whether the replication slot `slot` exists (`Some(active)`) on the server of `admin_url`.
async fn slot_state(admin_url: &str, slot: &str) -> Result<Option<bool>> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let active: Option<bool> =
        sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(&mut admin)
            .await?;
    let _ = admin.close().await;
    Ok(active)
}

/// Whether the replication slot `slot` is being streamed (`pg_replication_slots` is
/// cluster-wide, so any database's session sees it).
async fn slot_active(db: &BenchDb, slot: &str) -> Result<bool> {
    let active: Option<bool> =
        sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(&db.pool)
            .await?;
    Ok(active == Some(true))
}

/// Whether the slot `slot` confirmed the WAL up to `lsn`.
async fn slot_confirmed(db: &BenchDb, slot: &str, lsn: &str) -> Result<bool> {
    let confirmed: Option<bool> = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .bind(lsn)
    .fetch_optional(&db.pool)
    .await?;
    Ok(confirmed == Some(true))
}

/// One drain of `events` spread over `tables` tables on `source`; with the server's
/// `max_connections`. The run's database (with the relay's slot and publication) is dropped
/// whatever the outcome, and a slot left behind fails the run.
async fn drain(ctx: &mut Ctx, source: &str, events: u64, tables: usize) -> Result<(Run, i64)> {
    let bin = ctx.relay_bin()?;
    let db = BenchDb::create(&ctx.admin_url, "tables", &ctx.registry).await?;
    let slot = unique("bench_tables_slot");
    // On an error the relay is killed (dropped) before the database goes.
    let outcome = measure(ctx, &bin, &db, source, &slot, events, tables).await;
    let dropped = db.drop().await;
    let left = match slot_state(&ctx.admin_url, &slot).await {
        Ok(None) => None,
        Ok(Some(active)) => Some(format!(
            "the replication slot {slot} (active: {active}) is still there after the run's \
             database was dropped; drop it, it retains WAL"
        )),
        Err(e) => Some(format!("cannot check that the slot {slot} is gone: {e:#}")),
    };
    if let Some(why) = &left {
        eprintln!("bench: tables ({source}, {tables}): {why}");
    }
    let (run, max) = outcome?;
    dropped?;
    if let Some(why) = left {
        bail!("tables ({source}, {tables}): {why}");
    }
    Ok((run, max))
}

/// [`drain`] on the run's database `db`, the relay's slot (logical source) named `slot`.
async fn measure(
    ctx: &Ctx,
    bin: &Path,
    db: &BenchDb,
    source: &str,
    slot: &str,
    events: u64,
    tables: usize,
) -> Result<(Run, i64)> {
    let label = format!("{source}, {tables}");
    let max: i64 = sqlx::query_scalar("SELECT current_setting('max_connections')::int8")
        .fetch_one(&db.pool)
        .await?;
    let in_use: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity")
        .fetch_one(&db.pool)
        .await?;
    let mut run = Run::new(source, tables, events);
    // Keep 3 for superusers.
    let needed = sessions_needed(source, tables);
    if needed > max - in_use - 3 {
        let why = format!(
            "{tables} tables need up to {needed} sessions (one per table + {} shared); the \
             server has max_connections = {max} with {in_use} in use",
            needed - tables as i64
        );
        eprintln!("bench: tables ({label}): skipped: {why}");
        run.skipped = Some(why);
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
    let mut env = ctx.relay_env(db, source, &topic, slot);
    env.push(("OUTBOX_TABLES".to_owned(), "bt_*.outbox".to_owned()));
    eprintln!("bench: tables ({label}): starting the relay on the empty tables");
    let spawned = Instant::now();
    let mut relay = RelayProcess::start(bin, &env).await?;
    let deadline = spawned + Duration::from_secs(120);
    loop {
        relay.check_alive()?;
        let scrape = http_get(&relay.admin, "/metrics").await?;
        let (leaders, series) = sum_series(&scrape, "outbox_relay_leader");
        // The logical source: the slot exists (and the publication names every table) before
        // the pipelines start; once it is streamed, what is committed next is streamed too.
        let streaming = source != "logical" || slot_active(db, slot).await?;
        if series == tables && leaders as usize == tables && streaming {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "tables ({label}): {leaders} of {tables} pipelines active (slot streamed: \
                 {streaming}) after 120 s; log:\n{}",
                relay.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.startup_seconds = spawned.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.idle_rss_bytes = proc_status(relay.pid(), "VmRSS:")? * 1024;
    run.threads = proc_status(relay.pid(), "Threads:")?;
    run.idle_sessions = sessions(db).await?;

    // The whole backlog becomes visible at one commit.
    eprintln!("bench: tables ({label}): committing {events} events ({per_table} per table)");
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
    // Past every row of the backlog, before its commit record: the slot confirms this once it
    // has streamed the whole transaction and every table acknowledged it.
    let backlog_lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    let committed = Instant::now();
    let deadline = committed + Duration::from_secs(120 + events / 1000);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        relay.check_alive()?;
        let scrape = http_get(&relay.admin, "/metrics").await?;
        let (published, _) = sum_series(&scrape, "outbox_relay_events_published_total");
        let now = sessions(db).await?;
        if now.values().sum::<i64>() > run.peak_sessions.values().sum::<i64>() {
            run.peak_sessions = now;
        }
        if published as u64 >= events {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "tables ({label}): {published} of {events} published before the deadline; log:\n{}",
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
    if source == "logical" {
        // The figure is the stream's: the slot, opened before the commit, carried the backlog
        // (the tables' re-publication at the slot's opening found them empty). Its confirmed
        // position passes the backlog once every table acknowledged it (the relay confirms
        // every `logical.status_interval`); a multi-table relay exports no `logical_*` series to
        // count the streamed events by.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !slot_confirmed(db, slot, &backlog_lsn).await? {
            if Instant::now() > deadline {
                bail!(
                    "tables ({label}): the slot {slot} did not confirm the backlog (up to \
                     {backlog_lsn}) within 30 s of its drain; log:\n{}",
                    relay.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    relay.stop().await?;
    eprintln!(
        "bench: tables ({label}): {:.0} events/s ({:.2} s), start-up {:.2} s, drain CPU {:.2} s, idle RSS {:.0} MiB, peak RSS {:.0} MiB, {} threads, idle sessions {:?}, peak {:?}",
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
        "  source   tables   events/s   seconds  start-up s  CPU s  CPU µs/ev  peak RSS MiB  idle RSS MiB  threads  peak sessions (per table)\n",
    );
    for r in &section.runs {
        if let Some(why) = &r.skipped {
            out.push_str(&format!(
                "  {:<7}  {:>6}   skipped: {why}\n",
                r.source, r.tables
            ));
            continue;
        }
        out.push_str(&format!(
            "  {:<7}  {:>6}   {:>8.0}   {:>7.2}  {:>10.2}  {:>5.2}  {:>9.1}  {:>12.1}  {:>12.1}  {:>7}  {:>13} ({:.2})\n",
            r.source,
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
