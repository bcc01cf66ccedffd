//! End-to-end tests of the logical-replication source (pgoutput) against a real PostgreSQL and a
//! real Kafka-protocol broker: exactly-once delivery without faults in all three write modes,
//! per-aggregate order with out-of-order commits and rollbacks, heartbeats on an idle database,
//! a dropped slot reported and recovered from the table.

mod logical_common;

use std::time::{Duration, Instant};

use anyhow::Result;
use logical_common::*;
use outbox_core::WriteMode;
use outbox_tests::*;

async fn counts(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}

/// Concurrent writers whose transactions commit out of insertion order, with rollbacks and a
/// long-open transaction: every committed event exactly once, none rolled back, per-aggregate
/// order; rows are marked published and the slot is confirmed past the last commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_table_mode_concurrent_out_of_order_commits_exactly_once_in_order() -> Result<()> {
    let db = TestDb::migrated("logical_conc").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 12, 3).await?;
    let relay = InProcessRelay::start(logical_config(&db, WriteMode::Table, &slot))?;
    wait_slot_active(&db.pool, &slot, LONG).await?;

    // A long-open transaction inserts first and commits after everything else.
    let held = work.spawn_long_open_tx(Duration::from_secs(3)).await?;
    work.write(WriteMode::Table, 8, 40).await?;
    held.await??;
    let end = current_wal(&db.pool).await?;

    wait_drained(&db.pool, LONG).await?;
    let ledger = work.ledger();
    assert!(ledger.committed.len() > 300, "workload too small");
    assert!(!ledger.rolled_back.is_empty(), "workload had no rollbacks");
    let records = work.consume(&ledger, QUIET, LONG).await?;
    // Everything acknowledged: the slot must have been confirmed past the last commit.
    wait_confirmed(&db.pool, &slot, end, Duration::from_secs(15)).await?;
    relay.stop().await?;
    let v = Verdict::check(&ledger, &records);
    v.assert_safe();
    assert_eq!(v.duplicates, 0, "duplicates without a fault: {v:?}");
    assert_eq!(v.records, ledger.committed.len());
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// `insert_delete`: the table stays empty, every committed event arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_insert_delete_leaves_the_table_empty_and_delivers_everything() -> Result<()> {
    let db = TestDb::migrated("logical_insdel").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 8, 3).await?;
    let relay = InProcessRelay::start(logical_config(&db, WriteMode::InsertDelete, &slot))?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    work.write(WriteMode::InsertDelete, 6, 30).await?;
    let ledger = work.ledger();
    assert!(ledger.committed.len() > 100);
    let records = work.consume(&ledger, QUIET, LONG).await?;
    relay.stop().await?;
    assert_eq!(
        counts(&db.pool).await?,
        0,
        "insert_delete must leave the table empty"
    );
    let v = Verdict::check(&ledger, &records);
    v.assert_safe();
    assert_eq!(v.duplicates, 0, "{v:?}");
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// `logical_message`: no outbox table at all (never migrated), every committed event arrives,
/// rolled-back messages never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_message_mode_delivers_with_no_table() -> Result<()> {
    let db = TestDb::create("logical_msg").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 8, 3).await?;
    let relay = InProcessRelay::start(logical_config(&db, WriteMode::LogicalMessage, &slot))?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    work.write(WriteMode::LogicalMessage, 6, 30).await?;
    let ledger = work.ledger();
    assert!(!ledger.rolled_back.is_empty());
    let records = work.consume(&ledger, QUIET, LONG).await?;
    relay.stop().await?;
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('outbox')::text")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(table, None, "logical_message mode needs no table");
    let v = Verdict::check(&ledger, &records);
    v.assert_safe();
    assert_eq!(v.duplicates, 0, "{v:?}");
    // Payload and key arrive as written.
    let r = &records[0];
    assert!(
        r.value.as_deref().unwrap_or("").contains("version"),
        "{r:?}"
    );
    assert!(r.key.as_deref().unwrap_or("").starts_with("acct-"));
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// A backlog drained by the logical source, timed (printed; run with `--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_backlog_drain_throughput() -> Result<()> {
    let db = TestDb::migrated("logical_tput").await?;
    let slot = unique("lslot");
    let aggregate_type = unique("bulk");
    let topic = format!("outbox.event.{aggregate_type}");
    create_topic(&topic, 3).await?;
    // Create the slot first (relay start + stop) so the backlog is streamed, not re-published.
    let relay = InProcessRelay::start(logical_config(&db, WriteMode::InsertDelete, &slot))?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    relay.stop().await?;
    let n: i64 = 20_000;
    // 200 transactions of 100 inserts (+ deletes) each.
    let bulk = "DO $$ BEGIN FOR t IN 1..200 LOOP
           INSERT INTO outbox (aggregatetype, aggregateid, type, payload, aggregate_seq)
           SELECT 'AGG', 'agg-' || (i % 50), 'Bulk', jsonb_build_object('i', i, 'pad', repeat('x', 150)), t * 100 + i
           FROM generate_series(1, 100) i;
           DELETE FROM outbox;
           COMMIT;
         END LOOP; END $$"
        .replace("AGG", &aggregate_type);
    sqlx::raw_sql(sqlx::AssertSqlSafe(bulk))
        .execute(&db.pool)
        .await?;
    let end = current_wal(&db.pool).await?;
    let started = Instant::now();
    let relay = InProcessRelay::start(logical_config(&db, WriteMode::InsertDelete, &slot))?;
    wait_confirmed(&db.pool, &slot, end, LONG).await?;
    let took = started.elapsed();
    relay.stop().await?;
    let records = consume(&[&topic], n as usize, QUIET, LONG).await?;
    assert_eq!(records.len() as i64, n);
    println!(
        "logical source drained {n} events (insert_delete, 100 per tx) to Kafka and confirmed the slot in {:.2}s: {:.0} events/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// A slot dropped while the relay streams is reported loudly and, in `table` mode, recovered by
/// re-publishing unpublished rows (read in the new slot's exported snapshot): nothing is lost,
/// nothing duplicated on that path (duplicates are counted and printed). Then the
/// same with the relay stopped while events are written and the slot dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_dropped_slot_is_reported_and_recovered_without_loss_in_table_mode() -> Result<()> {
    let db = TestDb::migrated("logical_lost").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 6, 3).await?;
    let env = logical_env(WriteMode::Table, &slot);
    let env_ref = env_refs(&env);
    let relay = RelayProcess::start(&db, &[], &env_ref).await?;
    // Streaming, not just creating the slot (a slot being created also shows as active).
    relay
        .wait_for_log("replication stream started", LONG)
        .await?;

    // Phase 1: events flow, then the slot is dropped under the running relay while writers
    // keep writing.
    work.write(WriteMode::Table, 3, 10).await?;
    let writers = work.spawn_writers(WriteMode::Table, 3, 30);
    kill_and_drop_slot(&db.pool, &slot).await?;
    writers.await??;
    relay
        .wait_for_log("REPLICATION SLOT LOST", Duration::from_secs(30))
        .await?;
    wait_drained(&db.pool, LONG).await?;

    // Phase 2: relay stopped, events written, slot dropped, relay started again.
    let log1 = relay.kill9().await?;
    work.write(WriteMode::Table, 2, 10).await?;
    for _ in 0..100 {
        if sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&db.pool)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relay = RelayProcess::start(&db, &[], &env_ref).await?;
    wait_drained(&db.pool, LONG).await?;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    let log = relay.log();
    relay.terminate(Duration::from_secs(20)).await?;
    let v = Verdict::check(&ledger, &records);
    println!("dropped slot recovery: {v:?}");
    if v.inversions > 0 || std::env::var("LOGICAL_DEBUG").is_ok() {
        explain_inversions(&records);
        println!("{log1}\n----\n{log}");
    }
    v.assert_safe();
    assert!(log.contains("re-publishing unpublished rows"), "{log}");
    // The relay state table remembers the slot: its absence is reported as a loss.
    assert!(log.contains("REPLICATION SLOT LOST"), "{log}");
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// The source alone (no Kafka): 100k committed inserts read, decoded and acknowledged, timed
/// (printed; compare with `pg_recvlogical` on the same machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_source_only_throughput() -> Result<()> {
    use outbox_relay::source::Source;
    use outbox_relay::source::logical::LogicalSource;
    use tokio_util::sync::CancellationToken;

    let db = TestDb::migrated("logical_src_tput").await?;
    let slot = unique("lslot");
    let cfg = source_config(&db, WriteMode::InsertDelete, &slot)?;
    let mut src = LogicalSource::connect(cfg.clone()).await?;
    src.close().await?;
    drop(src);
    let n: usize = 100_000;
    let bulk = "DO $$ BEGIN FOR t IN 1..1000 LOOP
           INSERT INTO outbox (aggregatetype, aggregateid, type, payload, aggregate_seq)
           SELECT 'bulk', 'agg-' || (i % 50), 'Bulk', jsonb_build_object('i', i, 'pad', repeat('x', 150)), t * 100 + i
           FROM generate_series(1, 100) i;
           DELETE FROM outbox;
           COMMIT;
         END LOOP; END $$";
    sqlx::raw_sql(bulk).execute(&db.pool).await?;
    let token = CancellationToken::new();
    let started = Instant::now();
    let mut src = LogicalSource::connect(cfg).await?;
    let mut got = 0;
    while got < n {
        let batch = src.next_batch(5000, &token).await?;
        got += batch.len();
        src.acknowledge(&batch).await?;
    }
    let took = started.elapsed();
    src.close().await?;
    assert_eq!(got, n);
    println!(
        "logical source alone: {n} events decoded and acknowledged in {:.2}s: {:.0} events/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}
