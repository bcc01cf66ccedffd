//! The logical source's deferred row marks (`table` mode, `acknowledgement = "mark"`): streamed
//! rows get `published_at` in the background, after their LSN was confirmed. What must hold:
//! a row is never marked before it was delivered, a delivered row never stays unmarked (also
//! after a crash lost its mark), nothing acknowledged is streamed again after a restart, and
//! `status` reads the table right once the marks are done.

mod logical_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use logical_common::*;
use outbox_core::{NewEvent, Outbox, OutboxTable, WriteMode};
use outbox_relay::source::Source;
use outbox_relay::source::logical::LogicalSource;
use outbox_tests::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Commits `n` events, one transaction each; their ids in commit order.
async fn commit_events(db: &TestDb, n: usize) -> Result<Vec<Uuid>> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut tx = db.pool.begin().await?;
        let event = NewEvent::new("order", format!("o-{i}"), "Created", None);
        ids.extend(Outbox::default().publish_new(&mut tx, vec![event]).await?);
        tx.commit().await?;
    }
    Ok(ids)
}

/// How many of `ids` are not marked published.
async fn unmarked(db: &TestDb, ids: &[Uuid]) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind(ids)
    .fetch_one(&db.pool)
    .await?)
}

/// Lets `src` handle keepalives and timers until every row of `ids` is marked published.
async fn until_marked(src: &mut LogicalSource, db: &TestDb, ids: &[Uuid]) -> Result<()> {
    let token = CancellationToken::new();
    let deadline = Instant::now() + LONG;
    loop {
        let r = tokio::time::timeout(Duration::from_millis(200), src.next_batch(10, &token)).await;
        if let Ok(batch) = r {
            assert!(batch?.is_empty(), "nothing more was written");
        }
        let left = unmarked(db, ids).await?;
        if left == 0 {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "{left} delivered rows never marked published"
        );
    }
}

/// Rows are marked only once delivered; rows delivered whose marks were lost (a crash between
/// the slot's confirmation and the deferred mark, simulated by clearing `published_at`) are
/// marked by the next start, which streams none of them again; `status` then reads no backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deferred_marks_follow_delivery_and_survive_a_lost_mark() -> Result<()> {
    let db = TestDb::migrated("logical_marks").await?;
    let slot = unique("lslot");
    let mut cfg = source_config(&db, WriteMode::Table, &slot)?;
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.status_interval = Duration::from_millis(100);
    let token = CancellationToken::new();

    let mut src = LogicalSource::connect(cfg.clone()).await?;
    let first = commit_events(&db, 3).await?;
    let mut batch = Vec::new();
    while batch.len() < first.len() {
        batch.extend(src.next_batch(10, &token).await?);
    }
    src.flush().await?;
    assert_eq!(
        unmarked(&db, &first).await?,
        3,
        "marked before Kafka acknowledged them"
    );
    src.acknowledge(&batch).await?;
    src.flush().await?;
    assert_eq!(
        unmarked(&db, &first).await?,
        0,
        "flush marks what was delivered"
    );
    src.close().await?;
    drop(src);

    // Delivered, the slot confirmed past them, but their marks lost.
    sqlx::query("UPDATE outbox SET published_at = NULL WHERE id = ANY($1)")
        .bind(&first)
        .execute(&db.pool)
        .await?;
    let second = commit_events(&db, 4).await?;

    let mut src = LogicalSource::connect(cfg).await?;
    let mut batch = Vec::new();
    while batch.len() < second.len() {
        batch.extend(src.next_batch(10, &token).await?);
    }
    let streamed: Vec<Uuid> = batch.iter().map(|e| e.event.id).collect();
    assert_eq!(streamed, second, "only the new rows are streamed, in order");
    // The start read every unpublished row (the new ones too): none may be marked before the
    // slot is confirmed past it.
    src.flush().await?;
    assert_eq!(
        unmarked(&db, &second).await?,
        4,
        "rows marked before they were delivered"
    );
    assert_eq!(
        unmarked(&db, &first).await?,
        3,
        "the lost marks are redone only once the slot is past them"
    );
    src.acknowledge(&batch).await?;
    let all: Vec<Uuid> = first.iter().chain(&second).copied().collect();
    until_marked(&mut src, &db, &all).await?;

    let mut conn = db.pool.acquire().await?;
    let backlog = outbox_relay::table::backlog(&mut conn, &OutboxTable::default()).await?;
    assert_eq!(backlog.pending_events, 0);
    assert_eq!(backlog.oldest_pending_age_seconds, None);
    assert_eq!(
        backlog.last_published.map(|l| l.id),
        second.last().copied(),
        "the last published event is the newest row"
    );
    src.close().await?;
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// SIGKILL of a `table`-mode relay while events stream, twice, then a restart: nothing lost,
/// nothing phantom, no inversion, duplicates bounded; every delivered row ends up marked
/// published (the marks a kill interrupted are redone) and `status` reads no backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn table_mode_sigkill_leaves_no_delivered_row_unmarked() -> Result<()> {
    let db = TestDb::migrated("logical_marks_kill").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 10, 3).await?;
    let mut env = logical_env(WriteMode::Table, &slot);
    env.push(("OUTBOX_STATUS_INTERVAL", "300ms".into()));
    let env = env_refs(&env);
    let stop = Arc::new(AtomicBool::new(false));
    let mut relay = RelayProcess::start(&db, &[], &env).await?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    let writers = background_writers(&work, WriteMode::Table, stop.clone());
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        relay.kill9().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay = RelayProcess::start(&db, &[], &env).await?;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    writers.await??;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    let v = Verdict::check(&ledger, &records);
    println!("table mode, SIGKILL x2: {v:?}");
    assert!(ledger.committed.len() > 100, "workload too small");
    v.assert_safe();
    assert!(
        v.duplicates < ledger.committed.len() / 2,
        "duplicates not bounded: {v:?}"
    );

    let mut conn = db.pool.acquire().await?;
    let deadline = Instant::now() + LONG;
    loop {
        let backlog = outbox_relay::table::backlog(&mut conn, &OutboxTable::default()).await?;
        if backlog.pending_events == 0 {
            assert!(backlog.last_published.is_some());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivered rows left unmarked: {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.terminate(Duration::from_secs(20)).await?;
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}
