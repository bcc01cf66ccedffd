//! Re-publication from the table (`table` mode, a slot created or lost with rows unpublished):
//! read in keyset pages of at most one batch (by count and by bytes), one page at a time, all of
//! it handed on before anything streamed; the marker slot `<slot>_bf` goes only once the table was
//! read to the end and every re-published row is acknowledged, so an interrupted re-publication
//! is redone on the next start without loss.

mod logical_common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use logical_common::*;
use outbox_core::WriteMode;
use outbox_tests::*;
use uuid::Uuid;

/// Inserts `per_account` unpublished events for each of the workload's accounts, with payloads
/// of about `payload` bytes and consecutive per-aggregate sequence numbers (interleaved across
/// accounts in `seq` order), records them as committed and moves the accounts' versions past
/// them so the workload's writers continue each sequence.
async fn insert_backlog(work: &Workload, per_account: i64, payload: i64) -> Result<()> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, aggregate_seq)
         SELECT gen_random_uuid(), $1, a.id, 'BalanceChanged',
                jsonb_build_object('blob', repeat('x', $3::int), 'seq', g), g
         FROM accounts a, generate_series(1, $2::int8) g
         WHERE a.id = ANY($4)
         ORDER BY g, a.id
         RETURNING id",
    )
    .bind(&work.aggregate_type)
    .bind(per_account)
    .bind(payload)
    .bind(&work.accounts)
    .fetch_all(&work.pool)
    .await?;
    sqlx::query("UPDATE accounts SET version = $1 WHERE id = ANY($2)")
        .bind(per_account)
        .bind(&work.accounts)
        .execute(&work.pool)
        .await?;
    work.ledger.lock().unwrap().committed.extend(ids);
    Ok(())
}

/// The fields of the relay's JSON log line "re-publication … read to the end" (the `n`th one).
fn read_to_end(log: &str, n: usize) -> Option<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"].as_str().is_some_and(|m| {
                m.starts_with("re-publication from the outbox table read to the end")
            })
        })
        .nth(n)
        .map(|v| v["fields"].clone())
}

fn field(fields: &serde_json::Value, name: &str) -> Result<u64> {
    fields[name]
        .as_u64()
        .with_context(|| format!("no `{name}` in {fields}"))
}

async fn marker_exists(db: &TestDb, slot: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 || '_bf')",
    )
    .bind(slot)
    .fetch_one(&db.pool)
    .await?)
}

async fn wait_marker_gone(db: &TestDb, slot: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while marker_exists(db, slot).await? {
        if Instant::now() > deadline {
            bail!("the marker slot {slot}_bf is still there after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn published(db: &TestDb) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await?,
    )
}

/// A slot created while 1,600 rows (≈ 3 MB) are unpublished: they are re-published in pages of at
/// most one batch — 100 rows, and ≈ 100 kB by the byte bound the relay derives from
/// `max_in_flight_bytes` — and every one of them reaches Kafka before the events writers commit
/// on the same aggregates while the pages are read (those are streamed): no loss, no duplicate
/// (the snapshot path), no per-aggregate inversion; the marker slot is gone at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_republication_is_paged_and_precedes_the_stream() -> Result<()> {
    let db = TestDb::migrated("logical_repub_paged").await?;
    let slot = unique("rslot");
    let work = Workload::create(&db, "repub", 8, 1).await?;
    let (per_account, payload) = (200, 2000);
    insert_backlog(&work, per_account, payload).await?;
    let rows = 8 * per_account as u64;

    // 3 batches in flight + 1 being read: each batch (and page) is cut at 100,000 bytes.
    let bound = 100_000u64;
    let mut env = logical_env(WriteMode::Table, &slot);
    env.extend([
        ("OUTBOX_LOG_FORMAT", "json".to_owned()),
        ("OUTBOX_BATCH_SIZE", "100".to_owned()),
        ("OUTBOX_MAX_IN_FLIGHT_BATCHES", "3".to_owned()),
        ("OUTBOX_MAX_IN_FLIGHT_BYTES", (4 * bound).to_string()),
    ]);
    let env = env_refs(&env);
    let relay = RelayProcess::start(&db, &[], &env).await?;
    // Once the slot exists, whatever commits is streamed — and must come after the rows read
    // from the table for the same accounts.
    let deadline = Instant::now() + LONG;
    while confirmed_flush(&db.pool, &slot).await?.is_none() {
        ensure!(
            Instant::now() < deadline,
            "slot never created\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    work.write(WriteMode::Table, 4, 30).await?;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    wait_drained(&db.pool, LONG).await?;
    wait_marker_gone(&db, &slot, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");

    let v = Verdict::check(&ledger, &records);
    if v.inversions > 0 {
        explain_inversions(&records);
    }
    v.assert_safe();
    assert_eq!(
        v.duplicates, 0,
        "the snapshot path publishes nothing twice: {v:?}"
    );
    let end = read_to_end(&log, 0).context("the re-publication never reported its end")?;
    assert_eq!(field(&end, "rows")?, rows, "{end}");
    assert_eq!(end["consistent_snapshot"], true, "{end}");
    let row_bytes = payload as u64 + 40;
    assert!(
        field(&end, "largest_page_rows")? <= 100,
        "a page holds at most one batch: {end}"
    );
    assert!(
        field(&end, "largest_page_bytes")? < bound + row_bytes,
        "a page stops once it reaches the byte bound: {end}"
    );
    assert!(
        field(&end, "pages")? >= rows * payload as u64 / (bound + row_bytes),
        "{end}"
    );
    drop_slots(&db.pool, &slot).await
}

/// A relay killed (SIGKILL) in the middle of a re-publication leaves the marker slot behind; the
/// next start creates the slot again with a fresh snapshot and re-publishes what is still
/// unpublished (paged too), including the events committed while no relay ran, and every row
/// reaches Kafka. The marker stays while any row is unpublished and goes at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_interrupted_republication_is_redone_without_loss() -> Result<()> {
    interrupted_republication("logical_repub_killed", Stop::Kill).await
}

/// A relay stopped gracefully in the middle of a re-publication, with events committed before it
/// starts again: the next start publishes every event exactly once — the rows committed since
/// the old slot's position come from the table in the new snapshot, not from the stream too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_republication_stopped_gracefully_resumes_without_duplicates() -> Result<()> {
    interrupted_republication("logical_repub_stopped", Stop::Graceful).await
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    Kill,
    Graceful,
}

async fn interrupted_republication(name: &str, stop: Stop) -> Result<()> {
    let db = TestDb::migrated(name).await?;
    let slot = unique("rslot");
    let work = Workload::create(&db, "repubk", 8, 1).await?;
    let per_account = 2500;
    insert_backlog(&work, per_account, 100).await?;
    let rows = 8 * per_account;

    // Small batches, one in flight: the first run takes long enough to be stopped half-way.
    let mut env = logical_env(WriteMode::Table, &slot);
    env.extend([
        ("OUTBOX_LOG_FORMAT", "json".to_owned()),
        ("OUTBOX_BATCH_SIZE", "10".to_owned()),
        ("OUTBOX_MAX_IN_FLIGHT_BATCHES", "1".to_owned()),
    ]);
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let deadline = Instant::now() + LONG;
    while published(&db).await? < 100 {
        ensure!(
            Instant::now() < deadline,
            "nothing published\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = match stop {
        Stop::Kill => relay.kill9().await?,
        Stop::Graceful => {
            let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
            assert_eq!(code, 0, "{log}");
            log
        }
    };
    // A mark the killed relay sent just before the kill still commits: count once its sessions
    // are gone.
    db.wait_foreign_sessions_gone(LONG).await?;
    let done = published(&db).await?;
    eprintln!("{stop:?} after {done} of {rows} rows were published");
    ensure!(
        done < rows && read_to_end(&log, 0).is_none(),
        "the relay was to be stopped in the middle of the re-publication ({done} of {rows} published)"
    );
    assert!(
        marker_exists(&db, &slot).await?,
        "an interrupted re-publication must leave its marker slot"
    );
    // Committed after the old slot's position, while no relay runs.
    work.write(WriteMode::Table, 2, 20).await?;
    let added = work.ledger.lock().unwrap().committed.len() - rows as usize;
    ensure!(added > 0, "the writers committed nothing");

    env.retain(|(k, _)| *k != "OUTBOX_BATCH_SIZE" && *k != "OUTBOX_MAX_IN_FLIGHT_BATCHES");
    env.push(("OUTBOX_BATCH_SIZE", "500".to_owned()));
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    // The marker stays as long as anything is unpublished.
    let deadline = Instant::now() + LONG;
    loop {
        // The marker first: rows only ever become published, so a marker already gone with rows
        // still unpublished afterwards is a real early drop, never the relay finishing between
        // the two reads.
        let marker = marker_exists(&db, &slot).await?;
        let left = unpublished(&db.pool).await?;
        if left == 0 {
            break;
        }
        assert!(
            marker,
            "the marker slot went while {left} rows were unpublished\n{}",
            relay.log()
        );
        ensure!(Instant::now() < deadline, "{left} rows still unpublished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_marker_gone(&db, &slot, LONG).await?;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    v.assert_safe();
    if stop == Stop::Graceful {
        assert_eq!(
            v.duplicates, 0,
            "a graceful stop must not make the next start publish anything twice: {v:?}"
        );
    }
    let end = read_to_end(&log, 0).context("the redone re-publication never reported its end")?;
    assert_eq!(
        end["consistent_snapshot"], true,
        "redone in the snapshot of a slot created again: {end}"
    );
    assert!(
        field(&end, "rows")? >= (rows - done) as u64 + added as u64,
        "every row still unpublished is re-published, with those committed meanwhile: {end}"
    );
    assert!(field(&end, "largest_page_rows")? <= 500, "{end}");
    assert!(field(&end, "pages")? >= (rows - done) as u64 / 500, "{end}");
    drop_slots(&db.pool, &slot).await
}
