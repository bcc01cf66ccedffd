//! The measurements: ceilings, backlog drain, latency at a fixed arrival rate, write-path cost.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox_core::{NewEvent, Outbox, WriteMode};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use crate::db::{AGGREGATES, BenchDb, EVENT_TYPES, Registry, payload_json, unique};
use crate::kafka::{LatencyConsumer, create_topic, producer_ceiling};
use crate::relay::{RelayProcess, histogram_quantile};
use crate::report::{
    AdminLoadRun, BatchWriteRun, Ceilings, DrainRun, LatencyRun, Percentiles, Scale,
    ScaleDrainPoint, ScaleWritePoint, WriteRun,
};
use crate::sinks::Reader;

/// What every section needs.
pub struct Ctx {
    /// URL of the server's `postgres` database.
    pub admin_url: String,
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// Directory of `pg_recvlogical`.
    pub pg_bin: Option<PathBuf>,
    /// Databases to drop at the end.
    pub registry: Registry,
    /// The relay binary (built on first use).
    pub relay_bin: Option<PathBuf>,
    /// The repository root.
    pub repo: PathBuf,
    /// Backlog size.
    pub events: u64,
    /// Quick mode.
    pub quick: bool,
    /// Extra `OUTBOX_*` variables for every relay process (`--relay-env`).
    pub relay_extra: Vec<(String, String)>,
    /// The NATS, Redis and RabbitMQ servers of the `sinks` section.
    pub brokers: crate::services::BrokerUrls,
}

impl Ctx {
    /// The relay binary, located (or built) on first use.
    pub(crate) fn relay_bin(&mut self) -> Result<PathBuf> {
        if self.relay_bin.is_none() {
            self.relay_bin = Some(crate::relay::binary(&self.repo)?);
        }
        Ok(self.relay_bin.clone().expect("set above"))
    }

    /// The `OUTBOX_*` variables of a relay on `db` relaying `source` into `topic`, with the
    /// `--relay-env` extras.
    pub(crate) fn relay_env(
        &self,
        db: &BenchDb,
        source: &str,
        topic: &str,
        slot: &str,
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("OUTBOX_DATABASE_URL", db.url.clone()),
            ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", self.bootstrap.clone()),
            ("OUTBOX_SOURCE", source.to_owned()),
            ("OUTBOX_TOPIC", topic.to_owned()),
            ("OUTBOX_SLOT", slot.to_owned()),
            ("OUTBOX_PUBLICATION", slot.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(self.relay_extra.iter().cloned());
        env
    }
}

pub(crate) fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// The relay's claim query (`source/polling.rs`), column for column; `$2` holds the `seq` of
/// rows in flight (none here: the ceiling loop is sequential).
const CLAIM_SQL: &str = "SELECT id, aggregatetype, aggregateid, type, payload::text AS payload, seq, \
     created_at, tracingspancontext, headers::text AS headers, schema_version, topic, aggregate_seq \
     FROM \"outbox\" WHERE published_at IS NULL AND NOT (seq = ANY($2)) ORDER BY seq LIMIT $1";

/// The relay's acknowledgement in `mark` mode (rows found by `seq`).
const MARK_SQL: &str = "UPDATE \"outbox\" SET published_at = clock_timestamp() \
     WHERE seq = ANY($1) AND published_at IS NULL";

/// Ceilings: the raw producer, `pg_recvlogical` over a backlog, the polling claim-and-mark loop
/// over the same backlog with nothing produced.
pub async fn ceilings(ctx: &mut Ctx) -> Result<Ceilings> {
    let n = ctx.events;
    let mut out = Ceilings::default();

    eprintln!("bench: ceiling: raw producer, {n} records");
    let topic = unique("bench_ceiling_producer");
    create_topic(&ctx.bootstrap, &topic).await?;
    let bootstrap = ctx.bootstrap.clone();
    let t = topic.clone();
    let elapsed =
        tokio::task::spawn_blocking(move || producer_ceiling(&bootstrap, &t, n, false)).await??;
    out.producer_events_per_sec = Some(per_sec(n, elapsed));
    out.producer_seconds = Some(elapsed.as_secs_f64());

    eprintln!("bench: ceiling: source reads over a backlog of {n}");
    let db = BenchDb::create(&ctx.admin_url, "ceiling", &ctx.registry).await?;
    let slot = unique("bench_slot");
    db.create_slot(&slot, &slot).await?;
    let fill = db.fill_backlog(n, 1000, false).await?;
    out.fill_seconds = Some(fill.as_secs_f64());
    let endpos = db.current_lsn().await?;

    match &ctx.pg_bin {
        Some(bin) => {
            let started = Instant::now();
            let mut child = tokio::process::Command::new(bin.join("pg_recvlogical"))
                .args(["-d", &db.url, "--slot", &slot, "--start", "--no-loop"])
                .args(["--endpos", &endpos, "-f", "/dev/null"])
                .args(["-o", "proto_version=1", "-o"])
                .arg(format!("publication_names={slot}"))
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting pg_recvlogical")?;
            let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
                .await
                .context("pg_recvlogical did not reach the end position within 120 s")??;
            let elapsed = started.elapsed();
            if !status.success() {
                bail!("pg_recvlogical failed: {status}");
            }
            out.logical_source_rows_per_sec = Some(per_sec(n, elapsed));
            out.logical_source_seconds = Some(elapsed.as_secs_f64());
        }
        None => eprintln!("bench: warning: pg_recvlogical not found; no logical source ceiling"),
    }

    // The polling loop, exactly the relay's statements, one batch of 1000 at a time.
    let mut conn = db.connect().await?;
    // As on the relay's leader session.
    for setting in [
        "SET plan_cache_mode = force_custom_plan",
        "SET enable_sort = off",
        "SET enable_bitmapscan = off",
        "SET enable_seqscan = off",
    ] {
        sqlx::query(setting).execute(&mut conn).await?;
    }
    let mut claim = Duration::ZERO;
    let mut mark = Duration::ZERO;
    let mut rows_total = 0u64;
    let mut batches = 0u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    while Instant::now() < deadline && batches <= n / 1000 + 10 {
        let t0 = Instant::now();
        let rows = sqlx::query(AssertSqlSafe(CLAIM_SQL))
            .bind(1000i64)
            .bind(Vec::<i64>::new())
            .fetch_all(&mut conn)
            .await?;
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            // Decode every column, as the relay does.
            let _: uuid::Uuid = row.try_get("id")?;
            ids.push(row.try_get::<i64, _>("seq")?);
            let _: String = row.try_get("aggregatetype")?;
            let _: String = row.try_get("aggregateid")?;
            let _: String = row.try_get("type")?;
            let _: Option<String> = row.try_get("payload")?;
            let _: Option<chrono::DateTime<chrono::Utc>> = row.try_get("created_at")?;
            let _: Option<String> = row.try_get("tracingspancontext")?;
            let _: Option<String> = row.try_get("headers")?;
        }
        let t1 = Instant::now();
        claim += t1 - t0;
        if ids.is_empty() {
            break;
        }
        sqlx::query(MARK_SQL).bind(&ids).execute(&mut conn).await?;
        mark += t1.elapsed();
        rows_total += ids.len() as u64;
        batches += 1;
    }
    let elapsed = started.elapsed();
    let _ = conn.close().await;
    if rows_total != n {
        bail!("polling ceiling read {rows_total} of {n} rows");
    }
    out.polling_source_rows_per_sec = Some(per_sec(n, elapsed));
    out.polling_source_seconds = Some(elapsed.as_secs_f64());
    out.polling_claim_ms_per_batch = Some(claim.as_secs_f64() * 1e3 / batches.max(1) as f64);
    out.polling_mark_ms_per_batch = Some(mark.as_secs_f64() * 1e3 / batches.max(1) as f64);
    db.drop().await?;
    Ok(out)
}

/// Backlog drain: `events` pre-committed events, then the relay until Kafka acknowledged all.
/// `write_mode` is `table` (the figure) or `insert_delete` (a diagnostic of the logical source
/// without the per-batch row marking: nothing stays in the table).
pub async fn drain(ctx: &mut Ctx, source: &str, write_mode: WriteMode) -> Result<DrainRun> {
    let n = ctx.events;
    drain_backlog(ctx, source, write_mode, n).await
}

/// [`drain`] of a backlog of `n` events.
async fn drain_backlog(
    ctx: &mut Ctx,
    source: &str,
    write_mode: WriteMode,
    n: u64,
) -> Result<DrainRun> {
    let topic = unique(&format!("bench_drain_{source}"));
    create_topic(&ctx.bootstrap, &topic).await?;
    drain_into(ctx, source, write_mode, n, &topic, &[], "").await
}

/// [`drain_backlog`] into `topic` (which must exist on the sink), the relay started with
/// `sink_env` added (`OUTBOX_SINK` and its settings; none: Kafka); `label` prefixes the progress
/// lines (`nats: `).
pub async fn drain_into(
    ctx: &mut Ctx,
    source: &str,
    write_mode: WriteMode,
    n: u64,
    topic: &str,
    sink_env: &[(String, String)],
    label: &str,
) -> Result<DrainRun> {
    let bin = ctx.relay_bin()?;
    let label = match write_mode {
        WriteMode::Table => format!("{label}{source}"),
        other => format!("{label}{source}, {other}"),
    };
    let source_label = label.as_str();
    eprintln!("bench: drain ({source_label}): filling {n} events");
    let db = BenchDb::create(&ctx.admin_url, &format!("drain_{source}"), &ctx.registry).await?;
    let slot = unique("bench_slot");
    if source == "logical" {
        // The slot must exist before the rows, or the relay would re-publish them from the table.
        db.create_slot(&slot, &slot).await?;
    }
    let fill = db
        .fill_backlog(n, 1000, write_mode == WriteMode::InsertDelete)
        .await?;
    eprintln!(
        "bench: drain ({source_label}): filled in {:.2} s; starting the relay",
        fill.as_secs_f64()
    );
    let mut env = ctx.relay_env(&db, source, topic, &slot);
    env.push((
        "OUTBOX_WRITE_MODE".to_owned(),
        write_mode.as_str().to_owned(),
    ));
    env.extend(sink_env.iter().cloned());
    let mut relay = RelayProcess::start(&bin, &env).await?;
    eprintln!("bench: drain ({source_label}): relay pid {}", relay.pid());
    let cpu0 = relay.cpu()?;
    let started = relay.started;
    let deadline = Instant::now() + Duration::from_secs(60 + n / 1000);
    let (end, m) = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        relay.check_alive()?;
        let asked = Instant::now();
        let m = relay.metrics().await?;
        if m.get("outbox_relay_events_published_total") >= n as f64 {
            // The relay's own timestamp of its last acknowledgement, to the millisecond.
            let since =
                Duration::from_secs_f64(m.get("outbox_relay_seconds_since_last_event").max(0.0));
            break (asked.checked_sub(since).unwrap_or(asked).max(started), m);
        }
        if Instant::now() > deadline {
            bail!(
                "drain ({source_label}): {} of {n} published before the deadline; log:\n{}",
                m.get("outbox_relay_events_published_total"),
                relay.log_tail()
            );
        }
    };
    let cpu = relay.cpu()?.saturating_sub(cpu0);
    let unpublished = db.unpublished().await?;
    // `table` mode: the logical source marks delivered rows in the background, after their
    // acknowledgement; how long until every row is marked too.
    let mut all_marked = (unpublished == 0).then_some(end);
    if write_mode == WriteMode::Table {
        while all_marked.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if db.unpublished().await? == 0 {
                all_marked = Some(Instant::now());
            }
        }
    }
    let peak = relay.peak_rss()?;
    let elapsed = end - started;
    let batches = m.get("outbox_relay_batches_total");
    let publish_sum = m.get("outbox_relay_publish_duration_seconds_sum");
    relay.stop().await?;
    db.drop().await?;
    let run = DrainRun {
        source: source.to_owned(),
        write_mode: write_mode.as_str().to_owned(),
        events: n,
        seconds: elapsed.as_secs_f64(),
        events_per_sec: per_sec(n, elapsed),
        fill_seconds: fill.as_secs_f64(),
        relay_cpu_seconds: cpu.as_secs_f64(),
        relay_cpu_seconds_per_100k: cpu.as_secs_f64() * 1e5 / n as f64,
        relay_cpu_utilisation: cpu.as_secs_f64() / elapsed.as_secs_f64().max(1e-9),
        relay_peak_rss_bytes: peak,
        batches,
        mean_batch: n as f64 / batches.max(1.0),
        produce_seconds: publish_sum,
        produce_share: publish_sum / elapsed.as_secs_f64().max(1e-9),
        unpublished_after: unpublished,
        all_marked_seconds: all_marked.map(|t| (t - started).as_secs_f64()),
    };
    eprintln!(
        "bench: drain ({source_label}): {:.0} events/s ({:.2} s), produce {:.0}% of the time",
        run.events_per_sec,
        run.seconds,
        run.produce_share * 100.0
    );
    Ok(run)
}

/// Latency at a fixed arrival rate: single-row autocommit inserts paced by timers; a consumer
/// reads the topic and reports receive time − `ce_time` (= the row's `created_at`).
pub async fn latency(
    ctx: &mut Ctx,
    source: &str,
    rate: u64,
    warmup: Duration,
    duration: Duration,
) -> Result<LatencyRun> {
    let topic = unique(&format!("bench_latency_{source}"));
    create_topic(&ctx.bootstrap, &topic).await?;
    let limit = reader_limit(rate, warmup, duration);
    let bootstrap = ctx.bootstrap.clone();
    let t = topic.clone();
    let reader = async move {
        Ok(Reader::Kafka(LatencyConsumer::start(
            &bootstrap, &t, limit,
        )?))
    };
    latency_through(ctx, source, rate, warmup, duration, &topic, &[], "", reader).await
}

/// How many records a latency reader keeps at most: twice what the run writes.
pub fn reader_limit(rate: u64, warmup: Duration, duration: Duration) -> usize {
    ((rate * (warmup + duration).as_secs() + rate) * 2) as usize
}

/// [`latency`] through `topic` (which must exist on the sink), the relay started with
/// `sink_env` added; `reader` starts the consumer once the relay runs; `label` prefixes the
/// progress lines.
#[allow(clippy::too_many_arguments)]
pub async fn latency_through(
    ctx: &mut Ctx,
    source: &str,
    rate: u64,
    warmup: Duration,
    duration: Duration,
    topic: &str,
    sink_env: &[(String, String)],
    label: &str,
    reader: impl std::future::Future<Output = Result<Reader>>,
) -> Result<LatencyRun> {
    let bin = ctx.relay_bin()?;
    eprintln!(
        "bench: latency ({label}{source}, {rate}/s): {:.0} s warm-up + {:.0} s",
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    let db = BenchDb::create(&ctx.admin_url, &format!("latency_{source}"), &ctx.registry).await?;
    let slot = unique("bench_slot");
    // No NOTIFY trigger (the migrations install none): the polling relay finds the rows by its
    // adaptive polling, the logical source by the replication stream.
    let notify_trigger = false;
    if source == "logical" {
        db.create_slot(&slot, &slot).await?;
    }
    let mut env = ctx.relay_env(&db, source, topic, &slot);
    env.extend(sink_env.iter().cloned());
    let mut relay = RelayProcess::start(&bin, &env).await?;
    let consumer = reader.await?;
    // Let the consumer connect and the relay open its source.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let writers = rate.div_ceil(250).clamp(2, 16);
    let period = Duration::from_secs_f64(writers as f64 / rate as f64);
    let begin = Instant::now();
    let end = begin + warmup + duration;
    let written = Arc::new(AtomicU64::new(0));
    // Event id → when its COMMIT returned to the writer (Unix microseconds).
    let committed: Arc<std::sync::Mutex<std::collections::HashMap<uuid::Uuid, i64>>> =
        Arc::default();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut conn = db.connect().await?;
        let written = written.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + period.mul_f64(w as f64 / writers as f64),
                period,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut i = w;
            while Instant::now() < end {
                tick.tick().await;
                let account = format!("acct-{}", i % AGGREGATES);
                let id = uuid::Uuid::now_v7();
                sqlx::query(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
                     VALUES ($1, 'account', $2, $3, $4::jsonb)",
                )
                .bind(id)
                .bind(&account)
                .bind(EVENT_TYPES[(i % 4) as usize])
                .bind(payload_json(&account, i).to_string())
                .execute(&mut conn)
                .await?;
                let returned = chrono::Utc::now().timestamp_micros();
                committed
                    .lock()
                    .map_err(|_| anyhow::anyhow!("commit-time map poisoned"))?
                    .insert(id, returned);
                written.fetch_add(1, Ordering::Relaxed);
                i += writers;
            }
            let _ = conn.close().await;
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep_until((begin + warmup).into()).await;
    let window_start = chrono::Utc::now().timestamp_micros();
    let m0 = relay.metrics().await?;
    let cpu0 = relay.cpu()?;
    let published0 = m0.get("outbox_relay_events_published_total");
    tokio::time::sleep_until(end.into()).await;
    let window_end = chrono::Utc::now().timestamp_micros();
    for t in tasks {
        t.await??;
    }
    let total = written.load(Ordering::Relaxed);
    // Wait for the stragglers (bounded).
    let settle = Instant::now() + Duration::from_secs(30);
    while consumer.received() < total && Instant::now() < settle {
        relay.check_alive()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m1 = relay.metrics().await?;
    let cpu = relay.cpu()?.saturating_sub(cpu0);
    let peak = relay.peak_rss()?;
    let published = m1.get("outbox_relay_events_published_total") - published0;
    let received = consumer.received();
    let seen = consumer.finish().await?;
    relay.stop().await?;
    db.drop().await?;

    let mut lat: Vec<i64> = seen
        .iter()
        .filter(|s| s.created_us >= window_start && s.created_us < window_end)
        .map(|s| s.received_us - s.created_us)
        .collect();
    lat.sort_unstable();
    let mut after_commit: Vec<i64> = {
        let committed = committed
            .lock()
            .map_err(|_| anyhow::anyhow!("commit-time map poisoned"))?;
        seen.iter()
            .filter(|s| s.created_us >= window_start && s.created_us < window_end)
            .filter_map(|s| Some(s.received_us - committed.get(&s.id?)?))
            .collect()
    };
    after_commit.sort_unstable();
    let window = Duration::from_micros((window_end - window_start).max(1) as u64);
    let hist = "outbox_relay_commit_to_ack_seconds";
    let (b0, b1) = (m0.buckets(hist), m1.buckets(hist));
    let ack = |q| histogram_quantile(&b0, &b1, q).map(|s| s * 1e3);
    let run = LatencyRun {
        source: source.to_owned(),
        target_rate: rate,
        achieved_rate: per_sec(lat.len() as u64, window),
        writers,
        notify_trigger,
        samples: lat.len() as u64,
        written: total,
        received,
        commit_to_consumer_ms: Percentiles::of(&lat),
        commit_returned_to_consumer_ms: Percentiles::of(&after_commit),
        commit_to_ack_ms_from_histogram: Percentiles {
            p50: ack(0.5),
            p99: ack(0.99),
            p999: ack(0.999),
            max: None,
        },
        relay_cpu_seconds_per_100k: if published > 0.0 {
            Some(cpu.as_secs_f64() * 1e5 / published)
        } else {
            None
        },
        relay_peak_rss_bytes: peak,
    };
    if received < total {
        eprintln!(
            "bench: warning: latency ({label}{source}, {rate}/s): {received} of {total} events arrived"
        );
    }
    eprintln!(
        "bench: latency ({label}{source}, {rate}/s): achieved {:.0}/s, p50 {} p99 {} p99.9 {} ms",
        run.achieved_rate,
        fmt_opt(run.commit_to_consumer_ms.p50),
        fmt_opt(run.commit_to_consumer_ms.p99),
        fmt_opt(run.commit_to_consumer_ms.p999)
    );
    Ok(run)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

/// A business transaction measured by the write-path section: what it writes besides updating
/// one account row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteVariant {
    /// Nothing: the business transaction alone.
    None,
    /// One plain INSERT into `account_events`, a table of the outbox's five Debezium columns and
    /// a `created_at`, with only its primary key: the physical floor of "one more row".
    PlainInsert,
    /// One event through `Outbox::publish_new` into the default, freshly migrated table.
    Outbox(WriteMode),
    /// One event into `outbox_woken`, a table with the optional NOTIFY wake-up trigger
    /// (`outbox_core::notify_trigger_sql`) installed; `notify` is the session's
    /// `outbox.notify` (off: the trigger fires and sends nothing).
    Woken { notify: bool },
    /// One event into `outbox_backlog`, an outbox table holding a large unpublished backlog
    /// (the scale curve).
    Backlogged,
}

/// The outbox table of [`WriteVariant::Backlogged`].
const BACKLOG_TABLE: &str = "outbox_backlog";

/// The business table every write-path variant updates: [`AGGREGATES`] accounts.
async fn create_accounts(db: &BenchDb) -> Result<()> {
    sqlx::query(
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0,
                                version bigint NOT NULL DEFAULT 0)",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO accounts (id) SELECT g FROM generate_series(0, {}) g",
        AGGREGATES - 1
    )))
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// The comparable table of [`WriteVariant::PlainInsert`].
const PLAIN_TABLE_SQL: &str = "CREATE TABLE account_events (
    id            uuid         PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb,
    created_at    timestamptz  NOT NULL DEFAULT now())";

/// Write-path cost: K clients (8, then 32) running a business transaction (update one account
/// row) without any other write, with a plain INSERT into a comparable table, and with the outbox
/// write in each write mode and with the optional NOTIFY trigger; transactions per second, the
/// variants interleaved round by round. Then the batch figure: 100 events per transaction through
/// one `publish_all` against 100 `publish` calls.
pub async fn write_path(ctx: &mut Ctx) -> Result<(Vec<WriteRun>, Vec<BatchWriteRun>)> {
    let (secs, rounds) = if ctx.quick { (2.0, 1) } else { (5.0, 2) };
    let db = BenchDb::create(&ctx.admin_url, "write", &ctx.registry).await?;
    create_accounts(&db).await?;
    sqlx::query(PLAIN_TABLE_SQL).execute(&db.pool).await?;
    let woken = outbox_core::OutboxTable::new(None, "outbox_woken")?;
    {
        let mut conn = db.pool.acquire().await?;
        outbox_core::migrate(&mut conn, &woken).await?;
        sqlx::query(AssertSqlSafe(outbox_core::notify_trigger_sql(&woken)))
            .execute(&mut *conn)
            .await?;
    }
    let variants = [
        WriteVariant::None,
        WriteVariant::PlainInsert,
        WriteVariant::Outbox(WriteMode::Table),
        WriteVariant::Outbox(WriteMode::InsertDelete),
        WriteVariant::Outbox(WriteMode::LogicalMessage),
        WriteVariant::Woken { notify: true },
        WriteVariant::Woken { notify: false },
    ];
    let mut runs = Vec::new();
    for clients in [8, 32] {
        eprintln!(
            "bench: write path: {clients} clients, {rounds} round(s) of {secs:.0} s per variant"
        );
        let mut conns = Vec::new();
        for _ in 0..clients {
            conns.push(db.connect().await?);
        }
        // Warm-up.
        conns = run_clients(conns, WriteVariant::None, Duration::from_secs(1))
            .await?
            .1;
        let mut sums = [0.0f64; 7];
        for _ in 0..rounds {
            for (i, variant) in variants.iter().enumerate() {
                let notify = !matches!(variant, WriteVariant::Woken { notify: false });
                for c in &mut conns {
                    set_session_notify(c, notify).await?;
                }
                let (tps, back) =
                    run_clients(conns, *variant, Duration::from_secs_f64(secs)).await?;
                conns = back;
                sums[i] += tps;
            }
        }
        for c in conns {
            let _ = c.close().await;
        }
        let avg = sums.map(|s| s / rounds as f64);
        eprintln!(
            "bench: write path, {clients} clients: none {:.0} tx/s, plain insert {:.0}, table {:.0}, insert_delete {:.0}, logical_message {:.0}, NOTIFY trigger {:.0} (outbox.notify=off: {:.0})",
            avg[0], avg[1], avg[2], avg[3], avg[4], avg[5], avg[6]
        );
        runs.push(WriteRun {
            clients,
            seconds_per_variant: secs * rounds as f64,
            baseline_tx_per_sec: avg[0],
            plain_insert_tx_per_sec: avg[1],
            table_tx_per_sec: avg[2],
            insert_delete_tx_per_sec: avg[3],
            logical_message_tx_per_sec: avg[4],
            table_with_notify_tx_per_sec: avg[5],
            table_with_trigger_notify_off_tx_per_sec: avg[6],
        });
    }
    let mut batches = Vec::new();
    for clients in [1, 8] {
        batches.push(batch_write(&db, clients, secs, rounds).await?);
    }
    db.drop().await?;
    Ok((runs, batches))
}

/// Events per transaction in the batch-write figure.
const BATCH_EVENTS: usize = 100;

/// A typed event for the batch-write figure, so that both variants go through the typed API
/// (`publish`, `publish_all`) a service calls.
struct Deposited {
    account: String,
    payload: serde_json::Value,
}

impl outbox_core::OutboxEvent for Deposited {
    fn aggregate_type(&self) -> &str {
        "account"
    }

    fn aggregate_id(&self) -> String {
        self.account.clone()
    }

    fn event_type(&self) -> &str {
        "FundsDeposited"
    }

    fn to_payload(&self) -> Result<serde_json::Value, serde_json::Error> {
        Ok(self.payload.clone())
    }
}

/// `clients` clients writing transactions of [`BATCH_EVENTS`] events, through one `publish_all`
/// or through one `publish` per event, interleaved; events per second of each. One client
/// measures how much faster one such transaction is; eight, what the server's CPU does with them.
async fn batch_write(
    db: &BenchDb,
    clients: usize,
    secs: f64,
    rounds: usize,
) -> Result<BatchWriteRun> {
    eprintln!(
        "bench: batch writes: {clients} clients, {BATCH_EVENTS} events per transaction, {rounds} round(s) of {secs:.0} s"
    );
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(db.connect().await?);
    }
    let mut sums = [0.0f64; 2];
    for _ in 0..rounds {
        for (i, all) in [true, false].into_iter().enumerate() {
            let (rate, back) = run_batch_clients(conns, all, Duration::from_secs_f64(secs)).await?;
            conns = back;
            sums[i] += rate;
        }
    }
    for c in conns {
        let _ = c.close().await;
    }
    let [all, each] = sums.map(|s| s / rounds as f64);
    eprintln!("bench: batch writes: publish_all {all:.0} events/s, publish {each:.0} events/s");
    Ok(BatchWriteRun {
        clients,
        events_per_transaction: BATCH_EVENTS,
        seconds_per_variant: secs * rounds as f64,
        publish_all_events_per_sec: all,
        publish_each_events_per_sec: each,
    })
}

/// Runs transactions of [`BATCH_EVENTS`] events on every connection for `duration`; returns
/// events/s and the connections.
async fn run_batch_clients(
    conns: Vec<PgConnection>,
    publish_all: bool,
    duration: Duration,
) -> Result<(f64, Vec<PgConnection>)> {
    let outbox = Outbox::default();
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    for (c, mut conn) in conns.into_iter().enumerate() {
        let outbox = outbox.clone();
        // The domain events are built once: what is measured is the outbox's part.
        let events: Vec<Deposited> = (0..BATCH_EVENTS as u64)
            .map(|k| {
                let account = format!("acct-{}", (c as u64 * 7919 + k) % AGGREGATES);
                let payload = payload_json(&account, k);
                Deposited { account, payload }
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < end {
                let mut tx = conn.begin().await?;
                if publish_all {
                    outbox.publish_all(&mut tx, &events).await?;
                } else {
                    for e in &events {
                        outbox.publish(&mut tx, e).await?;
                    }
                }
                tx.commit().await?;
                done += BATCH_EVENTS as u64;
            }
            anyhow::Ok((done, conn))
        }));
    }
    join_clients(tasks, started).await
}

/// Switches the outbox's NOTIFY wake-up on or off for one session.
/// Waits for the clients' tasks: transactions (or events) per second since `started`, and the
/// clients' connections back for the next round.
async fn join_clients(
    tasks: Vec<tokio::task::JoinHandle<Result<(u64, PgConnection)>>>,
    started: Instant,
) -> Result<(f64, Vec<PgConnection>)> {
    let mut total = 0;
    let mut back = Vec::new();
    for t in tasks {
        let (done, conn) = t.await??;
        total += done;
        back.push(conn);
    }
    Ok((per_sec(total, started.elapsed()), back))
}

async fn set_session_notify(conn: &mut PgConnection, on: bool) -> Result<()> {
    sqlx::query(AssertSqlSafe(format!(
        "SET {} = {}",
        outbox_core::NOTIFY_SETTING,
        if on { "on" } else { "off" }
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// Runs the business transaction of `variant` on every connection for `duration`; returns tx/s
/// and the connections.
async fn run_clients(
    conns: Vec<PgConnection>,
    variant: WriteVariant,
    duration: Duration,
) -> Result<(f64, Vec<PgConnection>)> {
    let outbox = match variant {
        WriteVariant::Outbox(mode) => Some(Outbox::default().with_write_mode(mode)),
        WriteVariant::Woken { .. } => Some(Outbox::new(outbox_core::OutboxTable::new(
            None,
            "outbox_woken",
        )?)),
        WriteVariant::Backlogged => Some(Outbox::new(outbox_core::OutboxTable::new(
            None,
            BACKLOG_TABLE,
        )?)),
        WriteVariant::None | WriteVariant::PlainInsert => None,
    };
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = Vec::new();
    for (c, mut conn) in conns.into_iter().enumerate() {
        let outbox = outbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut done = 0u64;
            while Instant::now() < end {
                let id = (rng.next() % AGGREGATES) as i32;
                let mut tx = conn.begin().await?;
                sqlx::query(
                    "UPDATE accounts SET balance = balance + 1, version = version + 1 WHERE id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
                if let Some(outbox) = &outbox {
                    let account = format!("acct-{id}");
                    let payload = payload_json(&account, done);
                    outbox
                        .publish_new(
                            &mut tx,
                            vec![NewEvent::new("account", account, "FundsDeposited", Some(payload))],
                        )
                        .await?;
                } else if variant == WriteVariant::PlainInsert {
                    // The same values, serialized and bound the way the outbox binds them.
                    let account = format!("acct-{id}");
                    let payload = payload_json(&account, done).to_string();
                    sqlx::query(
                        "INSERT INTO account_events (id, aggregatetype, aggregateid, type, payload)
                         VALUES ($1, $2, $3, $4, $5::text::jsonb)",
                    )
                    .bind(uuid::Uuid::now_v7())
                    .bind("account")
                    .bind(account)
                    .bind("FundsDeposited")
                    .bind(payload)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                done += 1;
            }
            anyhow::Ok((done, conn))
        }));
    }
    join_clients(tasks, started).await
}

/// A tiny PRNG (no dependency, `Send`).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// One drain of the admin-load section, with or without requests against the admin endpoint.
struct LoadedDrain {
    seconds: f64,
    relay_cpu_seconds: f64,
    requests: u64,
    failed_requests: u64,
    load_seconds: f64,
    status_readings: f64,
}

/// `--admin-load`: the relay drains a backlog of `rows` rows (the whole table, all pending: the
/// worst case for the status queries) once quietly and once while a client sends `rate`
/// requests/s to `/status` (with the bearer token) and `/metrics` for at most `window`; repeated
/// `repeats` times, alternating. Requests are paced by a timer, bounded in number (`rate ×
/// window`) and in flight (64), loopback only.
pub async fn admin_load(
    ctx: &mut Ctx,
    rows: u64,
    rate: u64,
    window: Duration,
    repeats: usize,
) -> Result<AdminLoadRun> {
    let bin = ctx.relay_bin()?;
    let mut quiet = Vec::new();
    let mut loaded = Vec::new();
    for round in 0..repeats {
        for with_load in [false, true] {
            let d = admin_load_drain(ctx, &bin, rows, with_load.then_some((rate, window))).await?;
            eprintln!(
                "bench: admin load ({}/{repeats}, {}): drain {:.0} events/s ({:.2} s, relay CPU {:.2} s); {} requests ({} failed) over {:.1} s, {} status readings",
                round + 1,
                if with_load { "with load" } else { "quiet" },
                rows as f64 / d.seconds,
                d.seconds,
                d.relay_cpu_seconds,
                d.requests,
                d.failed_requests,
                d.load_seconds,
                d.status_readings
            );
            if with_load {
                loaded.push(d);
            } else {
                quiet.push(d);
            }
        }
    }
    let mean = |v: &[LoadedDrain]| {
        v.iter().map(|d| rows as f64 / d.seconds).sum::<f64>() / v.len().max(1) as f64
    };
    let (q, l) = (mean(&quiet), mean(&loaded));
    let requests: u64 = loaded.iter().map(|d| d.requests).sum();
    let cpu = |v: &[LoadedDrain]| v.iter().map(|d| d.relay_cpu_seconds).sum::<f64>();
    let load_seconds: f64 = loaded.iter().map(|d| d.load_seconds).sum();
    Ok(AdminLoadRun {
        rows,
        rate,
        window_seconds: window.as_secs_f64(),
        repeats,
        quiet_events_per_sec: quiet.iter().map(|d| rows as f64 / d.seconds).collect(),
        loaded_events_per_sec: loaded.iter().map(|d| rows as f64 / d.seconds).collect(),
        ratio: l / q.max(1e-9),
        requests,
        failed_requests: loaded.iter().map(|d| d.failed_requests).sum(),
        achieved_rate: requests as f64 / load_seconds.max(1e-9),
        status_readings: loaded.iter().map(|d| d.status_readings).sum(),
        load_seconds,
        relay_cpu_seconds_quiet: cpu(&quiet),
        relay_cpu_seconds_loaded: cpu(&loaded),
    })
}

async fn admin_load_drain(
    ctx: &mut Ctx,
    bin: &std::path::Path,
    rows: u64,
    load: Option<(u64, Duration)>,
) -> Result<LoadedDrain> {
    let db = BenchDb::create(&ctx.admin_url, "admin_load", &ctx.registry).await?;
    let topic = unique("bench_admin_load");
    create_topic(&ctx.bootstrap, &topic).await?;
    db.fill_backlog(rows, 10_000, false).await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;
    let token = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let mut env = ctx.relay_env(&db, "polling", &topic, "unused_slot");
    env.push(("OUTBOX_ADMIN__TOKEN".to_owned(), token.clone()));
    let mut relay = RelayProcess::start(bin, &env).await?;
    let started = relay.started;
    let cpu0 = relay.cpu()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load_task = load.map(|(rate, window)| {
        let (addr, stop, sent, failed) = (
            relay.admin.clone(),
            stop.clone(),
            sent.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            let began = Instant::now();
            let limit = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let max = rate * window.as_secs();
            let mut i = 0u64;
            while i < max && began.elapsed() < window && !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    break;
                };
                let (addr, token, failed) = (addr.clone(), token.clone(), failed.clone());
                let path = if i.is_multiple_of(2) {
                    "/status"
                } else {
                    "/metrics"
                };
                tokio::spawn(async move {
                    if crate::relay::http_get_authorized(&addr, path, &token)
                        .await
                        .is_err()
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            // Wait for the requests still in flight.
            let _ = limit.acquire_many(64).await;
            began.elapsed()
        })
    });
    let deadline = Instant::now() + Duration::from_secs(120 + rows / 1000);
    let end = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        relay.check_alive()?;
        let asked = Instant::now();
        let m = relay.metrics().await?;
        if m.get("outbox_relay_events_published_total") >= rows as f64 {
            let since =
                Duration::from_secs_f64(m.get("outbox_relay_seconds_since_last_event").max(0.0));
            break asked.checked_sub(since).unwrap_or(asked).max(started);
        }
        if Instant::now() > deadline {
            bail!(
                "admin load: {} of {rows} published before the deadline; log:\n{}",
                m.get("outbox_relay_events_published_total"),
                relay.log_tail()
            );
        }
    };
    stop.store(true, Ordering::Relaxed);
    let load_seconds = match load_task {
        Some(t) => t.await?.as_secs_f64(),
        None => 0.0,
    };
    let readings = relay
        .metrics()
        .await?
        .get("outbox_relay_admin_status_queries_total");
    let cpu = relay.cpu()?.saturating_sub(cpu0);
    relay.stop().await?;
    db.drop().await?;
    Ok(LoadedDrain {
        seconds: (end - started).as_secs_f64(),
        relay_cpu_seconds: cpu.as_secs_f64(),
        requests: sent.load(Ordering::Relaxed),
        failed_requests: failed.load(Ordering::Relaxed),
        load_seconds,
        status_readings: readings,
    })
}

/// The scale curve: a `table`-mode drain by each of `sources` at each of `backlogs` (ascending),
/// then the write path with each of `writers` concurrent writers: the business transaction
/// alone, with one outbox event into an empty outbox table, and with one into an outbox table
/// holding the largest backlog unpublished (variants interleaved, `rounds` rounds of `secs`).
pub async fn scale(
    ctx: &mut Ctx,
    sources: &[&str],
    backlogs: &[u64],
    writers: &[usize],
    secs: f64,
    rounds: usize,
) -> Result<Scale> {
    let mut out = Scale {
        backlogs: backlogs.to_vec(),
        ..Scale::default()
    };
    for &n in backlogs {
        for &source in sources {
            eprintln!("bench: scale: drain ({source}) of {n} events");
            let d = drain_backlog(ctx, source, WriteMode::Table, n).await?;
            out.drain.push(ScaleDrainPoint {
                source: d.source,
                events: d.events,
                events_per_sec: d.events_per_sec,
                relay_cpu_us_per_event: d.relay_cpu_seconds * 1e6 / n.max(1) as f64,
                relay_peak_rss_bytes: d.relay_peak_rss_bytes,
                seconds: d.seconds,
                fill_seconds: d.fill_seconds,
            });
        }
    }

    let backlog_rows = backlogs.iter().copied().max().unwrap_or(0);
    let db = BenchDb::create(&ctx.admin_url, "scale_write", &ctx.registry).await?;
    create_accounts(&db).await?;
    {
        let mut conn = db.pool.acquire().await?;
        outbox_core::migrate(
            &mut conn,
            &outbox_core::OutboxTable::new(None, BACKLOG_TABLE)?,
        )
        .await?;
    }
    eprintln!("bench: scale: write path: filling {BACKLOG_TABLE} with {backlog_rows} rows");
    db.fill_table(BACKLOG_TABLE, backlog_rows, 1000, false)
        .await?;
    sqlx::query(AssertSqlSafe(format!("VACUUM ANALYZE {BACKLOG_TABLE}")))
        .execute(&db.pool)
        .await?;
    let variants = [
        WriteVariant::None,
        WriteVariant::Outbox(WriteMode::Table),
        WriteVariant::Backlogged,
    ];
    for &n in writers {
        eprintln!("bench: scale: write path, {n} writer(s), {rounds} round(s) of {secs:.0} s");
        let mut conns = Vec::new();
        for _ in 0..n {
            conns.push(db.connect().await?);
        }
        conns = run_clients(conns, WriteVariant::None, Duration::from_secs(1))
            .await?
            .1;
        let mut sums = [0.0f64; 3];
        for _ in 0..rounds {
            for (i, variant) in variants.iter().enumerate() {
                let (tps, back) =
                    run_clients(conns, *variant, Duration::from_secs_f64(secs)).await?;
                conns = back;
                sums[i] += tps;
            }
        }
        for c in conns {
            let _ = c.close().await;
        }
        let [base, table, backlogged] = sums.map(|s| s / rounds as f64);
        let per_tx_us = |tps: f64| 1e6 / tps.max(1e-9);
        out.write.push(ScaleWritePoint {
            writers: n,
            seconds_per_variant: secs * rounds as f64,
            backlog_rows,
            baseline_tx_per_sec: base,
            table_tx_per_sec: table,
            table_with_backlog_tx_per_sec: backlogged,
            table_ratio: table / base.max(1e-9),
            table_with_backlog_ratio: backlogged / base.max(1e-9),
            outbox_us_per_event: per_tx_us(table) - per_tx_us(base),
        });
        eprintln!(
            "bench: scale: write path, {n} writer(s): none {base:.0} tx/s, outbox {table:.0}, outbox over {backlog_rows} rows {backlogged:.0}"
        );
    }
    db.drop().await?;
    Ok(out)
}
