//! Several relays on one outbox table (`shards`, polling source): the table's aggregates are
//! split into shards by a hash of `aggregateid`, each relay instance owns some of them through
//! advisory locks on its lock session, and the instances rebalance when one joins, leaves or
//! dies. See `outbox_relay::shard` and docs/operations.md, "Sharding".

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox_core::{OutboxTable, WriteMode};
use outbox_relay::shard::{ShardKeys, holders};
use outbox_relay::status::ShardsStatus;
use outbox_tests::writers::Workload;
use outbox_tests::*;
use tokio_util::sync::CancellationToken;

const QUIET: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(90);
const JOINED: &str = "joined the sharded relays of this table";

/// The relays' settings: `shards` shards, a short lease (heartbeats, hence rebalancing, every
/// 500 ms) and small batches, so shards change hands while batches are in flight.
fn relay_env(shards: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_SHARDS", shards.to_owned()),
        ("OUTBOX_LEADER_LEASE", "2s".to_owned()),
        ("OUTBOX_BATCH_SIZE", "50".to_owned()),
    ]
}

async fn start_relay(db: &TestDb, env: &[(&'static str, String)]) -> Result<RelayProcess> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    RelayProcess::start(db, &[], &env).await
}

/// Who owns which shard, read from the lock table.
async fn ownership(db: &TestDb, shards: u32) -> Result<ShardsStatus> {
    let mut conn = db.connect().await?;
    Ok(outbox_relay::status::shards(&mut conn, &OutboxTable::default(), shards).await?)
}

/// Waits until `members` relays have joined and every shard is owned, each owner holding at most
/// its fair share.
async fn wait_balanced(db: &TestDb, shards: u32, members: usize) -> Result<ShardsStatus> {
    let deadline = Instant::now() + LONG;
    let share = (shards as usize).div_ceil(members);
    loop {
        let s = ownership(db, shards).await?;
        if s.members == members
            && s.unowned.is_empty()
            && s.owners.len() == members
            && s.owners.iter().all(|o| o.shards.len() <= share)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the shards never settled over {members} relays: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What sampling the lock table during a run found.
#[derive(Debug, Default)]
struct Samples {
    taken: usize,
    /// A shard held by two sessions at once, or by a session that is not a member.
    violations: Vec<String>,
    /// Every session seen owning shards, with the most shards it owned at once.
    owners: BTreeMap<i32, usize>,
}

/// Samples the shard locks of the default table every 20 ms until `stop`.
fn sample_locks(
    db: &TestDb,
    shards: u32,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<Samples>> {
    let url = db.url.clone();
    tokio::spawn(async move {
        use sqlx::ConnectOptions;
        let mut conn = url
            .parse::<sqlx::postgres::PgConnectOptions>()?
            .connect()
            .await?;
        let keys = ShardKeys::new(&OutboxTable::new(Some("public"), "outbox")?, shards);
        let mut samples = Samples::default();
        while !stop.is_cancelled() {
            // One reading of the lock table for both: the members and the shard holders.
            let mut wanted = keys.shards.clone();
            wanted.push(keys.members);
            let (members, held): (Vec<_>, Vec<_>) = holders(&mut conn, &wanted)
                .await?
                .into_iter()
                .partition(|(key, _)| *key == keys.members);
            let members: BTreeSet<i32> = members.into_iter().map(|(_, pid)| pid).collect();
            let mut by_shard: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
            let mut by_owner: BTreeMap<i32, usize> = BTreeMap::new();
            for (key, pid) in held {
                by_shard.entry(key).or_default().push(pid);
                *by_owner.entry(pid).or_default() += 1;
            }
            for (key, pids) in &by_shard {
                let shard = keys
                    .shards
                    .iter()
                    .position(|k| k == key)
                    .unwrap_or(usize::MAX);
                if pids.len() > 1 {
                    samples
                        .violations
                        .push(format!("shard {shard} held by {pids:?} at once"));
                }
                // Shards are held only by sessions that joined (membership goes with them).
                if pids.iter().any(|p| !members.contains(p)) {
                    samples.violations.push(format!(
                        "shard {shard} held by {pids:?}, members {members:?}"
                    ));
                }
            }
            for (pid, n) in by_owner {
                let most = samples.owners.entry(pid).or_default();
                *most = (*most).max(n);
            }
            samples.taken += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(samples)
    })
}

/// The shard of each aggregate id among `shards`, as PostgreSQL computes it.
async fn shards_of(
    db: &TestDb,
    aggregates: &[String],
    shards: u32,
) -> Result<BTreeMap<String, u32>> {
    let sql = format!(
        "SELECT t.aggregateid, {}::int4 FROM unnest($1::text[]) AS t(aggregateid)",
        outbox_relay::shard::expression(shards, "t")
    );
    let rows: Vec<(String, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(aggregates)
        .fetch_all(&db.pool)
        .await?;
    Ok(rows.into_iter().map(|(a, s)| (a, s as u32)).collect())
}

/// 3 relays on one table with 16 shards, writers on 200 aggregates; one relay is SIGKILLed
/// mid-run and another started. Nothing is lost, nothing phantom, no aggregate's events are
/// reordered, every duplicate belongs to a shard the killed relay owned when it died, no shard
/// is ever held by two sessions, and every relay owned shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sharded_relays_share_a_table_and_survive_a_kill_without_loss_or_reordering()
-> Result<()> {
    const SHARDS: u32 = 16;
    let db = TestDb::migrated("shards_e2e").await?;
    let out = relay_cli_on(&db, &["migrate", "--shards", "16"], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    let work = Workload::create(&db, "shd", 200, 4).await?;
    let env = relay_env("16");

    let stop = CancellationToken::new();
    let sampler = sample_locks(&db, SHARDS, stop.clone());
    let mut relays = Vec::new();
    for _ in 0..3 {
        let relay = start_relay(&db, &env).await?;
        relay.wait_for_log(JOINED, LONG).await?;
        relays.push(relay);
    }
    let writers = work.spawn_writers(WriteMode::Table, 4, 700);
    let before = wait_balanced(&db, SHARDS, 3).await?;
    let deadline = Instant::now() + LONG;
    while work.ledger.lock().unwrap().committed.len() < 600 {
        assert!(Instant::now() < deadline, "writers stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing joins or leaves until the kill, so the shards stay where they are.
    let before = {
        let now = ownership(&db, SHARDS).await?;
        assert_eq!(now.owners, before.owners, "the shards moved while settled");
        now
    };
    assert!(!writers.is_finished(), "the kill must happen mid-run");
    let victim = relays.remove(1);
    let log = victim.kill9().await?;
    assert!(log.contains(JOINED), "{log}");
    // The killed relay's session is the member that vanished; its shards go to the others.
    let after = wait_balanced(&db, SHARDS, 2).await?;
    let gone: Vec<_> = before
        .owners
        .iter()
        .filter(|o| !after.owners.iter().any(|a| a.pid == o.pid))
        .collect();
    assert_eq!(gone.len(), 1, "before {before:?}, after {after:?}");
    let killed_shards: BTreeSet<u32> = gone[0].shards.iter().copied().collect();

    relays.push(start_relay(&db, &env).await?);
    relays[2].wait_for_log(JOINED, LONG).await?;
    writers.await??;
    wait_drained(&db.pool, LONG).await?;
    let settled = wait_balanced(&db, SHARDS, 3).await?;
    stop.cancel();
    let samples = sampler.await??;

    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    let v = Verdict::check(&ledger, &records);
    println!("3 relays, 16 shards, one SIGKILLed: {v:?}; killed relay owned {killed_shards:?}");
    println!(
        "lock samples: {}, owners seen: {:?}",
        samples.taken, samples.owners
    );
    v.assert_safe();

    // Duplicates: only events of the killed relay's shards (its unacknowledged window).
    let mut seen = BTreeSet::new();
    let mut duplicated = BTreeSet::new();
    for r in &records {
        if !seen.insert(r.event_id()) {
            duplicated.insert(r.key.clone().context("a record without a key")?);
        }
    }
    let duplicated: Vec<String> = duplicated.into_iter().collect();
    for (aggregate, shard) in shards_of(&db, &duplicated, SHARDS).await? {
        assert!(
            killed_shards.contains(&shard),
            "{aggregate} (shard {shard}) was duplicated, but the killed relay owned {killed_shards:?}"
        );
    }
    // At most the killed relay's window: `max_in_flight_batches` (3) batches of 50 in flight
    // plus the acknowledgements still running (at most 2 batches).
    assert!(v.duplicates <= 50 * (3 + 2), "{v:?}");

    assert!(samples.taken > 50, "{samples:?}");
    assert!(samples.violations.is_empty(), "{:?}", samples.violations);
    // 3 relays, then the survivors, then the newcomer: 4 lock sessions owned shards.
    assert!(samples.owners.len() >= 4, "{samples:?}");
    let newcomer: Vec<_> = settled
        .owners
        .iter()
        .filter(|o| !before.owners.iter().any(|b| b.pid == o.pid))
        .collect();
    assert_eq!(newcomer.len(), 1, "{settled:?}");
    assert!(!newcomer[0].shards.is_empty(), "{settled:?}");

    for relay in relays {
        let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
        assert_eq!(code, 0, "{log}");
        assert!(log.contains("shards rebalanced"), "{log}");
    }
    Ok(())
}

/// Fair-share rebalancing between real processes: a relay alone owns every shard; a second one
/// joins and gets half (the first drains and releases its surplus); when the first leaves, the
/// second takes all of them over. `status` and `/metrics` show the ownership.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_move_to_a_joining_relay_and_are_taken_over_when_one_leaves() -> Result<()> {
    const SHARDS: u32 = 8;
    let db = TestDb::migrated("shards_rebalance").await?;
    let out = relay_cli_on(&db, &["migrate", "--shards", "8"], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    let work = Workload::create(&db, "rbl", 50, 2).await?;
    let mut env = relay_env("8");
    env.push(("OUTBOX_ADMIN_ADDR", "127.0.0.1:0".to_owned()));

    let first = start_relay(&db, &env).await?;
    first.wait_for_log(JOINED, LONG).await?;
    let alone = wait_balanced(&db, SHARDS, 1).await?;
    assert_eq!(alone.owners[0].shards, (0..SHARDS).collect::<Vec<_>>());
    let first_addr = admin_addr(&first.log()).context("admin address logged")?;
    let (_, scrape) = http_get(&first_addr, "/metrics").await?;
    assert_eq!(
        metric(&scrape, "outbox_relay_shards_owned"),
        Some(8.0),
        "{scrape}"
    );

    // A join under load: shards move, nothing is lost or reordered.
    let writers = work.spawn_writers(WriteMode::Table, 2, 300);
    let second = start_relay(&db, &env).await?;
    second.wait_for_log(JOINED, LONG).await?;
    let split = wait_balanced(&db, SHARDS, 2).await?;
    assert!(
        split.owners.iter().all(|o| o.shards.len() == 4),
        "{split:?}"
    );
    let second_addr = admin_addr(&second.log()).context("admin address logged")?;
    let (_, scrape) = http_get(&second_addr, "/metrics").await?;
    assert_eq!(
        metric(&scrape, "outbox_relay_shards_owned"),
        Some(4.0),
        "{scrape}"
    );

    // `status` shows the same.
    let out = relay_cli_on(&db, &["status", "--json", "--shards", "8"], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    let status: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(status["shards"]["members"], 2, "{status}");
    assert_eq!(
        status["shards"]["owners"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    let out = relay_cli_on(&db, &["status", "--shards", "8"], &[]).await?;
    assert!(
        out.stdout
            .contains("shards            8 over 2 relay(s), 0 unowned"),
        "{}",
        out.text()
    );

    // A leave under load: the survivor takes every shard over.
    let (code, log) = first.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let survivor = wait_balanced(&db, SHARDS, 1).await?;
    assert_eq!(survivor.owners[0].shards.len(), 8, "{survivor:?}");
    let (_, scrape) = http_get(&second_addr, "/metrics").await?;
    assert_eq!(
        metric(&scrape, "outbox_relay_shards_owned"),
        Some(8.0),
        "{scrape}"
    );

    writers.await??;
    wait_drained(&db.pool, LONG).await?;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    let (code, log) = second.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    // Graceful join and leave: every hand-off waited for the window, so nothing repeats.
    Verdict::check(&ledger, &records).assert_exactly_once(&ledger);
    Ok(())
}

/// A paused relay (SIGSTOP past its lease) loses all its shards at once, exactly as a single
/// leader loses its lock: the server ends its lock session, the other relay takes them over and
/// relays their new events, and the paused relay, resumed, steps down and joins again, getting
/// its share back. Nothing was in flight at the pause, so nothing repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_paused_past_its_lease_loses_its_shards_and_rejoins_when_resumed() -> Result<()> {
    const SHARDS: u32 = 8;
    let db = TestDb::migrated("shards_pause").await?;
    let out = relay_cli_on(&db, &["migrate", "--shards", "8"], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    let work = Workload::create(&db, "pse", 40, 2).await?;
    let env = relay_env("8");
    let first = start_relay(&db, &env).await?;
    first.wait_for_log(JOINED, LONG).await?;
    let second = start_relay(&db, &env).await?;
    second.wait_for_log(JOINED, LONG).await?;
    let both = wait_balanced(&db, SHARDS, 2).await?;
    work.write(WriteMode::Table, 2, 40).await?;
    wait_drained(&db.pool, LONG).await?;

    first.signal("STOP").await?;
    // The lease (2 s) runs out, the server ends the paused relay's session: its shards go to
    // the other relay, which relays everything written meanwhile.
    let alone = wait_balanced(&db, SHARDS, 1).await?;
    assert!(
        both.owners.iter().any(|o| o.pid == alone.owners[0].pid),
        "{both:?} {alone:?}"
    );
    work.write(WriteMode::Table, 2, 40).await?;
    wait_drained(&db.pool, LONG).await?;

    first.signal("CONT").await?;
    let again = wait_balanced(&db, SHARDS, 2).await?;
    assert!(
        again.owners.iter().all(|o| o.shards.len() == 4),
        "{again:?}"
    );
    let deadline = Instant::now() + LONG;
    while first.log().matches(JOINED).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the resumed relay never rejoined:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        first.log().contains("leader lease lost: stepped down"),
        "{}",
        first.log()
    );
    work.write(WriteMode::Table, 2, 40).await?;
    wait_drained(&db.pool, LONG).await?;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    for relay in [first, second] {
        let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
        assert_eq!(code, 0, "{log}");
    }
    Verdict::check(&ledger, &records).assert_exactly_once(&ledger);
    Ok(())
}

/// Waits until `done` holds, checking every 20 ms; fails naming `what` after `LONG`.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + LONG;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Inserts one event for each of `aggregates` aggregates `<prefix>-<i>`.
async fn insert_events(db: &TestDb, prefix: &str, aggregates: usize) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
         SELECT gen_random_uuid(), 'acct', $1 || '-' || i, 'Changed', '{}'::jsonb
         FROM generate_series(1, $2) i",
    )
    .bind(prefix)
    .bind(aggregates as i32)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// The hand-off itself, step by step in one process: instance A owns all 4 shards and has a
/// batch of every shard in flight when B joins. A stops claiming its surplus at once but keeps
/// those shards — B gets none of them — until A's in-flight rows are acknowledged; then they
/// move to B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_shard_moves_only_after_its_in_flight_rows_are_acknowledged() -> Result<()> {
    use outbox_relay::config::RowAcknowledgement;
    use outbox_relay::leader::{Leadership, Sharding};
    use outbox_relay::source::Source;
    use outbox_relay::source::polling::{PollingSettings, PollingSource};

    let db = TestDb::migrated("shards_handoff").await?;
    let out = relay_cli_on(&db, &["migrate", "--shards", "4"], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    let options: sqlx::postgres::PgConnectOptions = db.url.parse()?;
    let table = OutboxTable::default();
    let never = CancellationToken::new();
    let join = |stats: &outbox_relay::RelayStats| {
        Leadership::acquire_sharded(
            &options,
            &table,
            Duration::from_millis(50),
            Duration::from_secs(1),
            Some(Sharding {
                count: 4,
                owned: stats.shards_owned.clone(),
            }),
            &never,
        )
    };
    let (stats_a, stats_b) = (
        outbox_relay::RelayStats::default(),
        outbox_relay::RelayStats::default(),
    );

    insert_events(&db, "first", 100).await?;
    let a = join(&stats_a).await?.context("A joined")?;
    let own_a = a.ownership().context("A is sharded")?;
    assert_eq!(own_a.held(), [0, 1, 2, 3], "alone, A owns every shard");
    let mut source = PollingSource::new(
        PollingSettings {
            table: table.clone(),
            acknowledgement: RowAcknowledgement::Mark,
            poll_interval: Duration::from_millis(50),
            listen: false,
        },
        a,
        &options,
    )
    .await?;
    let in_flight = source.poll_batch(1000).await?;
    assert_eq!(in_flight.len(), 100);

    let b = join(&stats_b).await?.context("B joined")?;
    let own_b = b.ownership().context("B is sharded")?;
    // A's next heartbeat: two members, a share of 2: two of A's shards drain, but every shard
    // has rows in flight, so A keeps all four and B gets none.
    wait_until("A drains half of its shards", || {
        own_a.held().len() == 4 && own_a.claimable().len() == 2
    })
    .await?;
    assert!(
        own_b.held().is_empty(),
        "B took a shard A still has rows in flight of"
    );
    assert_eq!(ownership(&db, 4).await?.owners.len(), 1);
    assert_eq!(stats_a.shards_owned.get(), 4);

    // A claims only from the shards it keeps.
    insert_events(&db, "second", 100).await?;
    let kept = source.poll_batch(1000).await?;
    let aggregates: Vec<String> = kept.iter().map(|e| e.event.aggregate_id.clone()).collect();
    let claimable: BTreeSet<u32> = own_a.claimable().into_iter().map(|s| s as u32).collect();
    let shards = shards_of(&db, &aggregates, 4).await?;
    assert!(!kept.is_empty());
    assert!(
        shards.values().all(|s| claimable.contains(s)),
        "claimed from a draining shard: {shards:?}, claimable {claimable:?}"
    );

    // Once everything in flight is acknowledged, the drained shards go to B.
    source.acknowledge(&in_flight).await?;
    source.acknowledge(&kept).await?;
    source.flush().await?;
    wait_until("the drained shards move to B", || {
        own_a.held().len() == 2 && own_b.held().len() == 2
    })
    .await?;
    let held_a: BTreeSet<u32> = own_a.held().into_iter().collect();
    assert!(own_b.held().iter().all(|s| !held_a.contains(s)));
    assert_eq!(
        (stats_a.shards_owned.get(), stats_b.shards_owned.get()),
        (2, 2)
    );
    drop(source);
    drop(b);
    Ok(())
}

/// `migrate --shards N` creates the shard index (idempotently), and the sharded claim reads each
/// owned shard from it instead of scanning the table's backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_creates_the_shard_index_and_the_claim_reads_it() -> Result<()> {
    let db = TestDb::migrated("shards_index").await?;
    for _ in 0..2 {
        let out = relay_cli_on(&db, &["migrate", "--shards", "16"], &[]).await?;
        assert_eq!(out.code, 0, "{}", out.text());
    }
    let definition: String = sqlx::query_scalar(
        "SELECT pg_get_indexdef('outbox_shards16_idx'::regclass) || ' valid=' || indisvalid
         FROM pg_index WHERE indexrelid = 'outbox_shards16_idx'::regclass",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(
        definition.contains("md5")
            && definition.contains("% (16)::bigint")
            && definition.ends_with("valid=true"),
        "{definition}"
    );
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
         SELECT gen_random_uuid(), 'acct', 'acct-' || (i % 500), 'Changed', '{}'::jsonb
         FROM generate_series(1, 20000) i",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query("ANALYZE outbox").execute(&db.pool).await?;
    let mut conn = db.connect().await?;
    // The lock session's settings (see `source::polling`).
    for setting in [
        "SET plan_cache_mode = force_custom_plan",
        "SET enable_sort = off",
        "SET enable_bitmapscan = off",
        "SET enable_seqscan = off",
        "SET jit = off",
    ] {
        sqlx::query(setting).execute(&mut conn).await?;
    }
    let sql = outbox_relay::table::Claim::sharded_text(&OutboxTable::default(), 16);
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) {sql}"
    )))
    .bind(1000_i64)
    .bind(Vec::<i64>::new())
    .bind(i64::MAX)
    .bind(vec![1_i64, 5, 9, 13])
    .fetch_all(&mut conn)
    .await?;
    let plan = plan.join("\n");
    println!("{plan}");
    assert!(
        plan.contains("Index Scan using outbox_shards16_idx"),
        "{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "{plan}");
    // Each shard's scan stops at the batch: at most 4 × 1000 index entries read.
    assert!(plan.contains("loops=4"), "{plan}");
    let rows: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT seq, shard FROM ({sql}) c"
    )))
    .bind(1000_i64)
    .bind(Vec::<i64>::new())
    .bind(i64::MAX)
    .bind(vec![1_i64, 5, 9, 13])
    .fetch_all(&mut conn)
    .await?;
    assert_eq!(rows.len(), 1000);
    assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "in seq order");
    assert!(rows.iter().all(|(_, s)| [1, 5, 9, 13].contains(s)));
    Ok(())
}

/// An unsharded relay and sharded ones never run on one table together, nor sharded relays with
/// different shard counts: the newcomer stands by, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_with_another_shard_count_or_none_stand_by() -> Result<()> {
    let db = TestDb::migrated("shards_mixed").await?;
    let plain = RelayProcess::start(&db, &[], &[]).await?;
    plain.wait_for_log("this relay is active", LONG).await?;
    let sharded = start_relay(&db, &relay_env("4")).await?;
    sharded
        .wait_for_log("an unsharded relay (no `shards` setting) is active", LONG)
        .await?;
    let (code, log) = plain.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    sharded.wait_for_log(JOINED, LONG).await?;

    let other = start_relay(&db, &relay_env("8")).await?;
    other
        .wait_for_log("relays with shards = 4 are active on this table", LONG)
        .await?;
    let plain = RelayProcess::start(&db, &[], &[]).await?;
    plain
        .wait_for_log("another relay holds the leader lock: standing by", LONG)
        .await?;
    assert!(!other.log().contains(JOINED), "{}", other.log());
    for relay in [sharded, other, plain] {
        let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
        assert_eq!(code, 0, "{log}");
    }
    Ok(())
}

/// Invalid shard settings are refused before anything connects, naming `shards`.
#[tokio::test]
async fn invalid_shard_settings_are_a_clear_configuration_error() -> Result<()> {
    let url = "postgres://relay@localhost/app";
    /// Arguments, environment, and what the error must say.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        (&["--shards", "0"], &[], "must be between 1 and 1024"),
        (&["--shards", "1025"], &[], "must be between 1 and 1024"),
        (&[], &[("OUTBOX_SHARDS", "0")], "must be between 1 and 1024"),
        (&["--shards", "many"], &[], "shards"),
        (
            &["--shards", "4", "--source", "logical"],
            &[],
            "not supported with source = \"logical\"",
        ),
    ];
    for (args, env, reason) in cases {
        let mut all = vec!["config", "validate"];
        all.extend_from_slice(args);
        let mut vars = vec![("OUTBOX_DATABASE_URL", url)];
        vars.extend_from_slice(env);
        let out = relay_cli(&all, &vars).await?;
        assert_eq!(out.code, 2, "{args:?} {env:?}: {}", out.text());
        assert!(
            out.text().contains("invalid setting `shards`") && out.text().contains(reason),
            "{args:?} {env:?}: {}",
            out.text()
        );
    }
    let out = relay_cli(
        &["config", "validate", "--shards", "16"],
        &[("OUTBOX_DATABASE_URL", url)],
    )
    .await?;
    assert_eq!(out.code, 0, "{}", out.text());
    Ok(())
}
