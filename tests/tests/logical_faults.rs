//! Fault tests of the logical-replication source: SIGKILL of the relay mid-stream, graceful
//! restarts, heartbeats on an idle server, and clear errors for `wal_level = replica` and a role
//! without the REPLICATION attribute.

mod logical_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use logical_common::*;
use outbox_core::{OutboxTable, WriteMode};
use outbox_relay::source::logical::{LogicalConfig, LogicalError, LogicalSource};
use outbox_tests::*;

/// SIGKILL of the relay process while events stream, three times, then a restart: nothing lost,
/// nothing phantom, no per-aggregate inversion; duplicates are counted and bounded by what was
/// acknowledged but not yet confirmed to the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_sigkill_mid_stream_then_restart_loses_nothing() -> Result<()> {
    let db = TestDb::migrated("logical_kill").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 10, 3).await?;
    let mut env = logical_env(WriteMode::InsertDelete, &slot);
    env.push(("OUTBOX_STATUS_INTERVAL", "300ms".into()));
    let env = env_refs(&env);
    let stop = Arc::new(AtomicBool::new(false));
    let mut relay = RelayProcess::start(&db, &[], &env).await?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    let writers = background_writers(&work, WriteMode::InsertDelete, stop.clone());
    let mut kills = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        relay.kill9().await?;
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay = RelayProcess::start(&db, &[], &env).await?;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    writers.await??;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    relay.terminate(Duration::from_secs(20)).await?;
    let v = Verdict::check(&ledger, &records);
    println!(
        "SIGKILL x{kills}: committed {}, rolled back {}, {v:?}, duplicates per crash {:.1}",
        ledger.committed.len(),
        ledger.rolled_back.len(),
        v.duplicates as f64 / kills as f64
    );
    assert!(ledger.committed.len() > 200, "workload too small");
    v.assert_safe();
    // Bounded: at most what a relay acknowledged in the ~status interval before each kill, far
    // below everything that was written.
    assert!(
        v.duplicates < ledger.committed.len() / 2,
        "duplicates not bounded: {v:?}"
    );
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// A graceful stop (SIGTERM) mid-stream and a restart: no duplicates, even with a status interval
/// far longer than the test (the confirmed position is made durable at shutdown), no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_graceful_restart_produces_no_duplicates() -> Result<()> {
    let db = TestDb::migrated("logical_graceful").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 10, 3).await?;
    let mut env = logical_env(WriteMode::InsertDelete, &slot);
    env.push(("OUTBOX_STATUS_INTERVAL", "60s".into()));
    let env = env_refs(&env);
    let stop = Arc::new(AtomicBool::new(false));
    let mut relay = RelayProcess::start(&db, &[], &env).await?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    let writers = background_writers(&work, WriteMode::InsertDelete, stop.clone());
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
        assert_eq!(code, 0, "graceful stop failed: {log}");
        relay = RelayProcess::start(&db, &[], &env).await?;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    writers.await??;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    relay.terminate(Duration::from_secs(20)).await?;
    let v = Verdict::check(&ledger, &records);
    println!("graceful restarts x2: {v:?}");
    assert!(ledger.committed.len() > 100, "workload too small");
    v.assert_safe();
    assert_eq!(
        v.duplicates, 0,
        "a graceful restart must not duplicate: {v:?}"
    );
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// Samples the slot's confirmed_flush_lsn for `window` and returns how often it moved.
async fn confirmed_moves(pool: &sqlx::PgPool, slot: &str, window: Duration) -> Result<usize> {
    let mut last = confirmed_flush(pool, slot).await?;
    let mut moves = 0;
    let end = Instant::now() + window;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = confirmed_flush(pool, slot).await?;
        if now > last {
            moves += 1;
        }
        last = now;
    }
    Ok(moves)
}

/// On a server with no other activity, heartbeats keep the slot's confirmed_flush_lsn moving
/// (WAL is not pinned); with heartbeats effectively off, it stands still — so the movement is
/// the heartbeats' doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_idle_database_heartbeats_advance_the_slot() -> Result<()> {
    let cluster = TempCluster::start("logical", "")?;
    let db = cluster.test_db().await?;
    let slot = unique("lslot");

    let mut cfg = logical_config(&db, WriteMode::LogicalMessage, &slot);
    cfg.logical.heartbeat_interval = Duration::from_millis(300);
    let relay = InProcessRelay::start(cfg.clone())?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    let start = confirmed_flush(&db.pool, &slot).await?.unwrap_or(0);
    let moves = confirmed_moves(&db.pool, &slot, Duration::from_secs(4)).await?;
    let end = confirmed_flush(&db.pool, &slot).await?.unwrap_or(0);
    let lag = current_wal(&db.pool).await?.saturating_sub(end);
    // The source's live metrics (for the relay's health/metrics endpoints).
    let m = relay.stats.logical.clone();
    let heartbeats = m.heartbeats.get();
    assert!(heartbeats >= 4, "heartbeats written: {heartbeats}");
    assert_eq!(
        m.wal_status.load(Ordering::Relaxed),
        1,
        "wal_status should read 'reserved'"
    );
    assert!(
        m.slot_lag_bytes.load(Ordering::Relaxed) >= 0,
        "slot lag not measured"
    );
    assert!(m.confirmed_lsn.get() >= end);
    relay.stop().await?;
    println!(
        "heartbeats on: confirmed_flush moved {moves} times, {start:#x} -> {end:#x}, lag {lag} bytes"
    );
    assert!(
        moves >= 4,
        "confirmed_flush_lsn did not keep moving on an idle database ({moves})"
    );
    assert!(lag < 64 * 1024, "slot lag on an idle database: {lag} bytes");

    // Control: heartbeats off (1 h) on the same idle server.
    cfg.logical.heartbeat_interval = Duration::from_secs(3600);
    let relay = InProcessRelay::start(cfg)?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moves_off = confirmed_moves(&db.pool, &slot, Duration::from_secs(3)).await?;
    relay.stop().await?;
    println!("heartbeats off: confirmed_flush moved {moves_off} times");
    assert!(
        moves_off <= 1,
        "without heartbeats the slot moved anyway: the test cannot tell"
    );
    Ok(())
}

/// `wal_level = replica`: the source refuses with an error naming the setting, not retryable;
/// the relay binary exits non-zero saying so. A role without REPLICATION is named too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_wal_level_replica_and_missing_privilege_give_clear_errors() -> Result<()> {
    let replica = TempCluster::start("replica", "")?;
    let cfg = LogicalConfig::new(
        replica.url("postgres"),
        OutboxTable::default(),
        WriteMode::LogicalMessage,
    );
    let err = LogicalSource::connect(cfg)
        .await
        .expect_err("wal_level=replica must be refused");
    assert!(matches!(err, LogicalError::WalLevel { .. }), "{err:?}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("wal_level")
            && text.contains("'replica'")
            && text.contains("wal_level = logical"),
        "{text}"
    );

    let db = replica.test_db().await?;
    let slot = unique("lslot");
    let env = logical_env(WriteMode::LogicalMessage, &slot);
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let (code, log) = relay.wait_exit(Duration::from_secs(30)).await?;
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("wal_level"), "{log}");
    drop(replica);

    let logical = TempCluster::start("logical", "")?;
    let db = logical.test_db().await?;
    sqlx::query("CREATE ROLE app LOGIN")
        .execute(&db.pool)
        .await?;
    let cfg = LogicalConfig::new(
        format!("postgres://app@127.0.0.1:{}/postgres", logical.port),
        OutboxTable::default(),
        WriteMode::LogicalMessage,
    );
    let err = LogicalSource::connect(cfg)
        .await
        .expect_err("a role without REPLICATION must be refused");
    assert!(matches!(err, LogicalError::Privilege { .. }), "{err:?}");
    assert!(err.to_string().contains("REPLICATION"), "{err}");
    Ok(())
}

/// The ack rule at the source: while an event is returned but not acknowledged, neither the
/// replication client's status updates, nor its replies to the server's reply-requested
/// keepalives (every second here), nor the source's own keepalive/heartbeat handling confirm the
/// slot past it — even though unrelated writes move the server's WAL far ahead. Once it is
/// acknowledged, the slot moves past it (and past the idle WAL after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_keepalives_never_confirm_past_unacknowledged_events() -> Result<()> {
    use outbox_core::{NewEvent, Outbox};
    use outbox_relay::source::{Position, Source};
    use tokio_util::sync::CancellationToken;

    let cluster = TempCluster::start("logical", "wal_sender_timeout = '2s'")?;
    let db = cluster.test_db().await?;
    db.migrate().await?;
    sqlx::query("CREATE TABLE noise (id bigserial PRIMARY KEY, v text)")
        .execute(&db.pool)
        .await?;
    let slot = unique("lslot");
    let mut cfg = source_config(&db, WriteMode::Table, &slot)?;
    cfg.status_interval = Duration::from_millis(100);
    cfg.heartbeat_interval = Duration::from_millis(200);
    let mut src = LogicalSource::connect(cfg).await?;
    let token = CancellationToken::new();

    let mut tx = db.pool.begin().await?;
    let id = Outbox::default()
        .publish_new(
            &mut tx,
            vec![NewEvent::new("order", "o-1", "Created", None)],
        )
        .await?[0];
    tx.commit().await?;
    let batch = src.next_batch(10, &token).await?;
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].event.id, id);
    let Position::Wal { end_lsn, .. } = batch[0].position else {
        panic!("not a WAL position: {:?}", batch[0].position)
    };

    // Unacknowledged: push the WAL ahead and let keepalives flow for a few seconds.
    let noise_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < noise_until {
        sqlx::query("INSERT INTO noise (v) SELECT repeat('n', 200) FROM generate_series(1, 50)")
            .execute(&db.pool)
            .await?;
        // Let the source handle keepalives/heartbeat timers too (nothing of ours arrives).
        let r = tokio::time::timeout(Duration::from_millis(100), src.next_batch(10, &token)).await;
        assert!(r.is_err(), "nothing new may be returned: {r:?}");
        let confirmed = confirmed_flush(&db.pool, &slot).await?.unwrap_or(0);
        assert!(
            confirmed < end_lsn,
            "slot confirmed {confirmed:#x} past the unacknowledged transaction ending at {end_lsn:#x}"
        );
    }
    let wal = current_wal(&db.pool).await?;
    assert!(
        wal > end_lsn + 100_000,
        "the WAL did not move ahead: {wal:#x}"
    );

    src.acknowledge(&batch).await?;
    // Table mode marks the row beside the pipeline; the LSN is confirmed once that is durable.
    src.flush().await?;
    wait_confirmed(&db.pool, &slot, end_lsn, Duration::from_secs(10)).await?;
    // Idle now: keepalives and heartbeats may confirm the WAL that follows.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(200), src.next_batch(10, &token)).await;
        let confirmed = confirmed_flush(&db.pool, &slot).await?.unwrap_or(0);
        if confirmed >= wal {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle slot never caught up: {confirmed:#x} < {wal:#x}"
        );
    }
    let marked: bool =
        sqlx::query_scalar("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
    assert!(
        marked,
        "table mode: the acknowledged row must be marked published"
    );
    Ok(())
}

/// Publication and slot: created when missing, reused when present, and an existing one that
/// cannot work (publication without the outbox table, slot with another plugin) is refused with
/// an error that says what is wrong; an existing publication that also publishes updates and
/// deletes is accepted (they are ignored). Names are validated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_publication_and_slot_are_created_reused_and_checked() -> Result<()> {
    use outbox_relay::source::Source;
    use outbox_relay::source::logical::{PublicationName, SlotName};

    let db = TestDb::migrated("logical_checks").await?;
    let slot = unique("lslot");
    let cfg = |slot: &str, publication: &str| -> Result<LogicalConfig> {
        let mut c = source_config(&db, WriteMode::Table, slot)?;
        c.publication = PublicationName::parse(publication)?;
        Ok(c)
    };
    let slots = |pool: sqlx::PgPool, name: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(name)
        .fetch_one(&pool)
        .await
    };

    // A publication for another table: refused, and no slot is created.
    sqlx::query("CREATE TABLE other (id int PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    sqlx::query("CREATE PUBLICATION p_wrong FOR TABLE other")
        .execute(&db.pool)
        .await?;
    let err = LogicalSource::connect(cfg(&slot, "p_wrong")?)
        .await
        .expect_err("wrong publication");
    assert!(matches!(err, LogicalError::Publication(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("does not include the outbox table"),
        "{err}"
    );
    assert_eq!(slots(db.pool.clone(), slot.clone()).await?, 0);

    // Missing: both created (publish = 'insert', pgoutput).
    let mut src = LogicalSource::connect(cfg(&slot, "p_new")?).await?;
    let (ins, upd, del): (bool, bool, bool) = sqlx::query_as(
        "SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = 'p_new'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!((ins, upd, del), (true, false, false));
    let plugin: String =
        sqlx::query_scalar("SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(plugin, "pgoutput");
    src.rewind().await?;
    src.close().await?;
    drop(src);

    // Present: reused (same slot, position kept), also with a publication that publishes
    // updates and deletes too.
    sqlx::query("CREATE PUBLICATION p_all FOR TABLE outbox")
        .execute(&db.pool)
        .await?;
    let before = confirmed_flush(&db.pool, &slot).await?;
    let mut src = LogicalSource::connect(cfg(&slot, "p_all")?).await?;
    assert_eq!(slots(db.pool.clone(), slot.clone()).await?, 1);
    assert!(confirmed_flush(&db.pool, &slot).await? >= before);
    src.close().await?;
    drop(src);

    // A slot of another plugin under our name: refused, naming the plugin.
    let foreign = unique("lslot");
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding')")
        .bind(&foreign)
        .execute(&db.pool)
        .await?;
    let err = LogicalSource::connect(cfg(&foreign, "p_new")?)
        .await
        .expect_err("foreign slot");
    assert!(matches!(err, LogicalError::Slot(_)), "{err:?}");
    assert!(err.to_string().contains("test_decoding"), "{err}");
    assert!(!err.is_retryable());

    // Names: PostgreSQL's slot rule, and nothing that could escape quoting.
    assert!(SlotName::parse("Bad-Slot").is_err());
    assert!(SlotName::parse("x'; DROP TABLE outbox; --").is_err());
    assert!(PublicationName::parse("p\"; DROP TABLE outbox; --").is_err());

    drop_slots(&db.pool, &slot).await?;
    drop_slots(&db.pool, &foreign).await?;
    Ok(())
}

/// Forces `wal_status = 'lost'` (max_slot_wal_keep_size exceeded while the relay is down):
/// in `table` mode the relay reports it loudly and recovers every unpublished event from the
/// table; in `insert_delete` mode (nothing to recover from) it exits non-zero saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_invalidated_slot_is_reported_and_recovered_in_table_mode() -> Result<()> {
    use outbox_core::{NewEvent, Outbox};

    let cluster = TempCluster::start(
        "logical",
        "max_slot_wal_keep_size = '1MB'\nmax_wal_size = '64MB'\nmin_wal_size = '32MB'",
    )?;
    let db = cluster.test_db().await?;
    db.migrate().await?;
    sqlx::query("CREATE TABLE noise (id bigserial PRIMARY KEY, v text)")
        .execute(&db.pool)
        .await?;
    let aggregate_type = unique("acct");
    let topic = format!("outbox.event.{aggregate_type}");
    create_topic(&topic, 1).await?;
    let slot = unique("lslot");
    let env = logical_env(WriteMode::Table, &slot);
    let env = env_refs(&env);
    let mut ledger = Ledger::default();
    let outbox = Outbox::default();
    let write = async |n: usize, ledger: &mut Ledger| -> Result<()> {
        for i in 0..n {
            let mut tx = db.pool.begin().await?;
            let ids = outbox
                .publish_new(
                    &mut tx,
                    vec![NewEvent::new(
                        &aggregate_type,
                        format!("a{}", i % 3),
                        "E",
                        None,
                    )],
                )
                .await?;
            tx.commit().await?;
            ledger.committed.extend(ids);
        }
        Ok(())
    };

    let relay = RelayProcess::start(&db, &[], &env).await?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    write(20, &mut ledger).await?;
    wait_drained(&db.pool, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");

    // Relay down: events committed, then enough WAL to invalidate the slot.
    write(30, &mut ledger).await?;
    for _ in 0..6 {
        sqlx::query("INSERT INTO noise (v) SELECT repeat('n', 1000) FROM generate_series(1, 3000)")
            .execute(&db.pool)
            .await?;
        sqlx::query("SELECT pg_switch_wal()")
            .execute(&db.pool)
            .await?;
        sqlx::query("CHECKPOINT").execute(&db.pool).await?;
    }
    let status: Option<String> =
        sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        status.as_deref(),
        Some("lost"),
        "the slot was not invalidated"
    );

    let relay = RelayProcess::start(&db, &[], &env).await?;
    relay
        .wait_for_log("REPLICATION SLOT LOST", Duration::from_secs(30))
        .await?;
    wait_drained(&db.pool, LONG).await?;
    let records = consume(&[&topic], ledger.committed.len(), QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("invalidated slot, table mode: {v:?}");
    v.assert_safe();
    let status: Option<String> =
        sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_one(&db.pool)
            .await?;
    assert_ne!(
        status.as_deref(),
        Some("lost"),
        "the slot was not recreated"
    );

    // insert_delete: the same loss cannot be recovered; the relay must say so and stop.
    let relay = RelayProcess::start(
        &db,
        &[],
        &env_refs(&logical_env(WriteMode::InsertDelete, &slot)),
    )
    .await?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    relay.terminate(Duration::from_secs(20)).await?;
    for _ in 0..6 {
        sqlx::query("INSERT INTO noise (v) SELECT repeat('n', 1000) FROM generate_series(1, 3000)")
            .execute(&db.pool)
            .await?;
        sqlx::query("SELECT pg_switch_wal()")
            .execute(&db.pool)
            .await?;
        sqlx::query("CHECKPOINT").execute(&db.pool).await?;
    }
    let relay = RelayProcess::start(
        &db,
        &[],
        &env_refs(&logical_env(WriteMode::InsertDelete, &slot)),
    )
    .await?;
    let (code, log) = relay.wait_exit(Duration::from_secs(30)).await?;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("LOST") && log.contains("no table to recover from"),
        "{log}"
    );
    Ok(())
}

/// A relay killed while it creates the slot for the first time (creation waits for the
/// transactions open at that moment) leaves a half-made slot that its walsender drops once it
/// notices. The next relay must wait for that slot to be complete or gone and then create it
/// itself — not call it lost and exit — and publish every event (table mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_relay_killed_during_first_slot_creation_recovers() -> Result<()> {
    let db = TestDb::migrated("logical_slot_create_kill").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 5, 3).await?;
    let env = logical_env(WriteMode::Table, &slot);
    let env = env_refs(&env);
    // Rows written before any slot exists: re-published from the table.
    work.write(WriteMode::Table, 2, 10).await?;

    // An open transaction with an xid holds the slot creation back.
    let mut blocker_conn = db.connect().await?;
    let mut blocker = sqlx::Connection::begin(&mut blocker_conn).await?;
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *blocker)
        .await?;
    let first = RelayProcess::start(&db, &[], &env).await?;
    let deadline = Instant::now() + LONG;
    loop {
        let in_creation: Option<bool> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn IS NULL FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .fetch_optional(&db.pool)
        .await?;
        if in_creation == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first relay never started creating the slot; log:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Frozen mid-creation: its walsender keeps the half-made slot while the next relay starts;
    // its leader-lock session is cut so that the next relay becomes the leader.
    first.signal("STOP").await?;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .execute(&db.pool)
    .await?;
    let mut second = RelayProcess::start(&db, &[], &env).await?;
    second
        .wait_for_log("still being created", Duration::from_secs(30))
        .await?;
    first.kill9().await?;
    // The creation goes on once the blocking transaction ends; the killed relay's walsender then
    // either drops the half-made slot or completes it — the relay waiting must cope with both.
    blocker.commit().await?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    work.write(WriteMode::Table, 2, 10).await?;
    let ledger = work.ledger();
    wait_drained(&db.pool, LONG).await?;
    let records = work.consume(&ledger, QUIET, LONG).await?;
    assert!(
        second.child.try_wait()?.is_none(),
        "the second relay exited; log:\n{}",
        second.log()
    );
    let (code, log) = second.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(
        !log.contains("LOST"),
        "a never-completed slot was called lost:\n{log}"
    );
    let v = Verdict::check(&ledger, &records);
    println!("killed during slot creation: {v:?}");
    v.assert_safe();
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}
