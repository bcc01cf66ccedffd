//! PostgreSQL fails over to a physical standby (PostgreSQL 15: logical slots are not replicated
//! to standbys). The relay state table is an ordinary table, so the standby has it: a relay
//! pointed at the promoted standby knows it streamed before and finds its slot missing. In
//! `insert_delete` mode that is a loud `SlotLost` exit (no slot silently created, which would skip
//! the events committed since the old slot's position); in `table` mode every event not yet
//! published is re-published from the table. See docs/postgres.md, "Failover".

mod logical_common;

use std::time::Duration;

use anyhow::{Result, bail};
use logical_common::*;
use outbox_core::WriteMode;
use outbox_tests::*;

/// Waits until `standby` has replayed everything `primary` wrote so far.
async fn wait_caught_up(primary: &TestDb, standby: &TestDb) -> Result<()> {
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&primary.pool)
        .await?;
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let done: Option<bool> =
            sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&target)
                .fetch_one(&standby.pool)
                .await?;
        if done == Some(true) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the standby never replayed up to {target}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay on the primary publishes (one database in `insert_delete` mode, one in `table`
/// mode) and stops; more events are committed and reach the asynchronous standby; the primary
/// dies and the standby is promoted. On the promoted standby: the `insert_delete` relay exits
/// non-zero with SlotLost naming the recorded position and the operator's options, every time,
/// and creates no slot; the `table` relay reports the loss and publishes every committed event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_failover_to_a_standby_without_the_slot_is_loud_or_recovered() -> Result<()> {
    let primary = TempCluster::start("logical", "")?;
    let admin = primary.test_db().await?;
    for db in ["failover_id", "failover_table"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&admin.pool)
            .await?;
    }
    let id_db = primary.db("failover_id").await?;
    let table_db = primary.db("failover_table").await?;
    id_db.migrate().await?;
    table_db.migrate().await?;
    let id_work = Workload::create(&id_db, "acct", 3, 1).await?;
    let table_work = Workload::create(&table_db, "acct", 3, 1).await?;
    let id_slot = unique("fslot");
    let table_slot = unique("fslot");
    let id_env = logical_env(WriteMode::InsertDelete, &id_slot);
    let id_env = env_refs(&id_env);
    let table_env = logical_env(WriteMode::Table, &table_slot);
    let table_env = env_refs(&table_env);

    // The relays run on the primary, publish, and stop.
    let relay = start_streaming(&id_db, &id_slot, &id_env).await?;
    id_work.write(WriteMode::InsertDelete, 2, 5).await?;
    let published = id_work.ledger();
    let records = id_work.consume(&published, QUIET, LONG).await?;
    Verdict::check(&published, &records).assert_safe();
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");

    let relay = RelayProcess::start(&table_db, &[], &table_env).await?;
    table_work.write(WriteMode::Table, 2, 5).await?;
    wait_drained(&table_db.pool, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");

    // The standby is cloned now (no slot comes with it), and more events are committed while no
    // relay runs; they reach the standby.
    let standby = primary.standby()?;
    id_work.write(WriteMode::InsertDelete, 1, 4).await?;
    table_work.write(WriteMode::Table, 1, 4).await?;
    let standby_id = standby.db("failover_id").await?;
    let standby_table = standby.db("failover_table").await?;
    wait_caught_up(&id_db, &standby_id).await?;
    wait_caught_up(&table_db, &standby_table).await?;
    assert!(!slot_exists(&standby_id, &id_slot).await?);

    // Failover: the primary dies, the standby is promoted.
    primary.pg_ctl(&["-m", "immediate", "stop"])?;
    standby.pg_ctl(&["promote"])?;
    let standby_id = standby.db("failover_id").await?;
    let standby_table = standby.db("failover_table").await?;

    // insert_delete: streamed before (the state table came with the standby), slot missing:
    // loud, on every start, and nothing created.
    for attempt in 0..2 {
        let relay = RelayProcess::start(&standby_id, &[], &id_env).await?;
        let (code, log) = relay.wait_exit(Duration::from_secs(60)).await?;
        assert_ne!(code, 0, "attempt {attempt}: must exit non-zero\n{log}");
        assert!(
            log.contains("REPLICATION SLOT LOST")
                && log.contains("outbox_relay_state\" records that a relay streamed from it")
                && log.contains("failed over")
                && log.contains(&format!("outbox-relay slot drop {id_slot}")),
            "attempt {attempt}: {log}"
        );
        assert!(
            !slot_exists(&standby_id, &id_slot).await?,
            "attempt {attempt}: a slot was silently created on the promoted standby"
        );
    }

    // table: the loss is reported and everything committed is published from the table.
    let relay = RelayProcess::start(&standby_table, &[], &table_env).await?;
    wait_drained(&standby_table.pool, LONG).await?;
    let ledger = table_work.ledger();
    let records = table_work.consume(&ledger, QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("REPLICATION SLOT LOST"), "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("failover, table mode: {v:?}");
    v.assert_safe();
    drop(standby_id);
    drop(standby_table);
    Ok(())
}

/// The position the relay acknowledged lives in its memory until the next status update. After
/// PostgreSQL restarted (or failed over: a promoted standby can give the same LSN to another
/// transaction) the source must resume from the slot's own position, not from that memory: here
/// the acknowledged event is streamed again (a duplicate) instead of being skipped over, which on
/// a diverged WAL history would skip other events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_source_resumes_from_the_slot_after_postgres_restarted() -> Result<()> {
    use outbox_core::{NewEvent, Outbox};
    use outbox_relay::source::Source;
    use outbox_relay::source::logical::LogicalSource;
    use tokio_util::sync::CancellationToken;

    let cluster = TempCluster::start("logical", "")?;
    let db = cluster.test_db().await?;
    db.migrate().await?;
    let slot = unique("lslot");
    let mut cfg = source_config(&db, WriteMode::InsertDelete, &slot)?;
    // Nothing tells the server the acknowledged position during the test.
    cfg.status_interval = Duration::from_secs(3600);
    cfg.heartbeat_interval = Duration::from_secs(3600);
    let mut src = LogicalSource::connect(cfg).await?;
    let token = CancellationToken::new();
    let outbox = Outbox::default().with_write_mode(WriteMode::InsertDelete);
    let mut tx = db.pool.begin().await?;
    let id = outbox
        .publish_new(
            &mut tx,
            vec![NewEvent::new("order", "o-1", "Created", None)],
        )
        .await?[0];
    tx.commit().await?;
    let batch = src.next_batch(10, &token).await?;
    assert_eq!(batch.len(), 1);
    src.acknowledge(&batch).await?;
    let at_slot = confirmed_flush(&db.pool, &slot).await?.unwrap_or(0);
    assert!(
        src.confirmed_lsn().0 > at_slot,
        "the acknowledged position must still be ahead of the slot"
    );

    // PostgreSQL crashes and comes back: the slot is at its last save.
    cluster.pg_ctl(&["-m", "immediate", "stop"])?;
    cluster.pg_ctl(&["-t", "60", "start"])?;
    let deadline = std::time::Instant::now() + LONG;
    let again = loop {
        match tokio::time::timeout(Duration::from_secs(10), src.next_batch(10, &token)).await {
            Ok(Ok(b)) if !b.is_empty() => break b,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => println!("next_batch after the restart: {e}"),
            Err(_) => bail!(
                "the acknowledged event was not streamed again: the source resumed from its memory past the slot"
            ),
        }
        if std::time::Instant::now() > deadline {
            bail!("the source never streamed again");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(again[0].event.id, id);
    src.acknowledge(&again).await?;
    src.close().await?;
    Ok(())
}
