//! Malformed outbox rows and messages — written by plain SQL or by an older writer, so no derive
//! checked them — are parked with their reason in both sources, and hold only their own
//! aggregate: the relay neither stops nor skips them.

mod logical_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use logical_common::*;
use outbox_core::WriteMode;
use outbox_tests::*;
use uuid::Uuid;

/// A parked row as the test reads it back.
#[derive(Debug)]
struct Parked {
    reason: String,
    blocked_by: Option<Uuid>,
}

async fn parked(pool: &sqlx::PgPool) -> Result<BTreeMap<Uuid, Parked>> {
    let rows: Vec<(Uuid, String, Option<Uuid>)> =
        sqlx::query_as("SELECT id, reason, blocked_by FROM outbox_parked")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, reason, blocked_by)| (id, Parked { reason, blocked_by }))
        .collect())
}

async fn wait_parked(pool: &sqlx::PgPool, n: usize) -> Result<BTreeMap<Uuid, Parked>> {
    let deadline = Instant::now() + LONG;
    loop {
        let p = parked(pool).await?;
        if p.len() >= n {
            return Ok(p);
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} events parked: {p:?}",
            p.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Inserts one row by plain SQL with the given `headers` and `schema_version` literals.
async fn insert_row(
    pool: &sqlx::PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    headers: &str,
    schema_version: i32,
) -> Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers, schema_version)
         VALUES ($1, $2, $3, 'Changed', '{\"n\": 1}', $4::jsonb, $5)",
    )
    .bind(id)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(headers)
    .bind(schema_version)
    .execute(pool)
    .await?;
    Ok(id)
}

/// The migration refuses malformed rows at write time; tables migrated before that (or managed
/// by someone else) can still hold them, which this drops the checks to simulate.
async fn checks_refuse_then_drop(pool: &sqlx::PgPool) -> Result<()> {
    let bad_headers = insert_row(pool, "x", "1", "[1]", 1).await;
    let err = bad_headers.expect_err("a headers array must be refused at write time");
    ensure!(
        err.to_string().contains("outbox_headers_object"),
        "unexpected error: {err:#}"
    );
    let bad_version = insert_row(pool, "x", "1", "{}", 0).await;
    let err = bad_version.expect_err("schema_version 0 must be refused at write time");
    ensure!(
        err.to_string().contains("outbox_schema_version_check"),
        "unexpected error: {err:#}"
    );
    sqlx::query(
        "ALTER TABLE outbox DROP CONSTRAINT outbox_headers_object, \
         DROP CONSTRAINT outbox_schema_version_check",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Writes good and malformed rows on four aggregates and checks that the relay parks exactly the
/// malformed ones (and what follows them on their aggregate), publishes the rest, and keeps
/// running.
async fn malformed_rows_are_parked(db: &TestDb, relay: InProcessRelay) -> Result<()> {
    let agg_type = unique("malf");
    let topic = format!("outbox.event.{agg_type}");
    create_topic(&topic, 1).await?;
    let pool = &db.pool;
    let good_a1 = insert_row(pool, &agg_type, "a1", "{}", 1).await?;
    let bad_headers = insert_row(pool, &agg_type, "a1", "[\"not\", \"an object\"]", 1).await?;
    let held = insert_row(pool, &agg_type, "a1", "{}", 1).await?;
    let bad_version = insert_row(pool, &agg_type, "a2", "{}", 0).await?;
    let bad_topic = insert_row(pool, "no spaces allowed", "a3", "{}", 1).await?;
    let good_a4 = insert_row(pool, &agg_type, "a4", "{\"tenant\": \"t1\"}", 1).await?;

    let p = wait_parked(pool, 4).await?;
    ensure!(p.len() == 4, "exactly four parked: {p:?}");
    let reason = |id: &Uuid| {
        p.get(id)
            .map(|x| x.reason.as_str())
            .unwrap_or("<not parked>")
    };
    ensure!(
        reason(&bad_headers).contains("headers must be a JSON object"),
        "{p:?}"
    );
    ensure!(reason(&bad_version).contains("schema_version 0"), "{p:?}");
    ensure!(reason(&bad_topic).contains("topic"), "{p:?}");
    ensure!(
        p.get(&held).and_then(|x| x.blocked_by) == Some(bad_headers),
        "the later event of a1 is held behind the malformed one: {p:?}"
    );
    ensure!(p[&bad_headers].blocked_by.is_none(), "{p:?}");

    // Everything else is published, once, and the relay keeps going.
    let later = insert_row(pool, &agg_type, "a4", "{}", 1).await?;
    let records = consume(&[&topic], 3, QUIET, LONG).await?;
    let mut got: Vec<Uuid> = records.iter().map(Consumed::event_id).collect();
    got.sort();
    let mut want = vec![good_a1, good_a4, later];
    want.sort();
    ensure!(got == want, "published {got:?}, expected {want:?}");
    ensure!(!relay.task.is_finished(), "the relay stopped");
    relay.stop().await.context("the relay failed")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polling_parks_malformed_rows_and_keeps_relaying() -> Result<()> {
    let db = TestDb::migrated("malformed_poll").await?;
    checks_refuse_then_drop(&db.pool).await?;
    let relay = InProcessRelay::start(relay_config(&db))?;
    malformed_rows_are_parked(&db, relay).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_parks_malformed_rows_and_keeps_relaying() -> Result<()> {
    let db = TestDb::migrated("malformed_logical").await?;
    checks_refuse_then_drop(&db.pool).await?;
    let slot = unique("mslot");
    let relay = InProcessRelay::start(logical_config(&db, WriteMode::Table, &slot))?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    malformed_rows_are_parked(&db, relay).await?;
    drop_slots(&db.pool, &slot).await
}

/// Rows left unpublished from before a slot existed are re-published from the table; malformed
/// ones among them are parked too, not skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_backfill_parks_malformed_rows() -> Result<()> {
    let db = TestDb::migrated("malformed_backfill").await?;
    checks_refuse_then_drop(&db.pool).await?;
    let agg_type = unique("malbf");
    let topic = format!("outbox.event.{agg_type}");
    create_topic(&topic, 1).await?;
    let good = insert_row(&db.pool, &agg_type, "b1", "{}", 1).await?;
    let bad = insert_row(&db.pool, &agg_type, "b2", "42", 1).await?;
    let slot = unique("mslot");
    let relay = InProcessRelay::start(logical_config(&db, WriteMode::Table, &slot))?;
    let p = wait_parked(&db.pool, 1).await?;
    ensure!(
        p.get(&bad)
            .is_some_and(|x| x.reason.contains("headers must be a JSON object")),
        "{p:?}"
    );
    let records = consume(&[&topic], 1, QUIET, LONG).await?;
    ensure!(
        records.iter().map(Consumed::event_id).collect::<Vec<_>>() == vec![good],
        "{records:?}"
    );
    relay.stop().await?;
    drop_slots(&db.pool, &slot).await
}

/// `logical_message` mode: a message that is not a valid event is parked — under its own id when
/// it can be read, else under an id derived from its LSN — and later messages keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_message_mode_parks_malformed_messages() -> Result<()> {
    let db = TestDb::migrated("malformed_msg").await?;
    let agg_type = unique("malmsg");
    let topic = format!("outbox.event.{agg_type}");
    create_topic(&topic, 1).await?;
    let slot = unique("mslot");
    let relay = InProcessRelay::start(logical_config(&db, WriteMode::LogicalMessage, &slot))?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    let emit = |content: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', $1)")
                .bind(content)
                .execute(&pool)
                .await
        }
    };
    let message = |id: Uuid, aggregate: &str, headers: &str| {
        format!(
            r#"{{"id":"{id}","aggregatetype":"{agg_type}","aggregateid":"{aggregate}","type":"Changed","payload":{{"n":1}},"headers":{headers}}}"#
        )
    };
    let good = Uuid::now_v7();
    let bad_headers = Uuid::now_v7();
    let later = Uuid::now_v7();
    emit(message(good, "m1", "{}")).await?;
    emit(message(bad_headers, "m2", "[1]")).await?;
    emit("this is not JSON".to_owned()).await?;
    emit(message(later, "m3", "{}")).await?;

    let p = wait_parked(&db.pool, 2).await?;
    ensure!(
        p.get(&bad_headers)
            .is_some_and(|x| x.reason.contains("malformed outbox event")),
        "{p:?}"
    );
    let by_lsn: Vec<_> = p
        .iter()
        .filter(|(id, _)| id.to_string().starts_with("6f757462-6f78-0000-"))
        .collect();
    ensure!(
        by_lsn.len() == 1 && by_lsn[0].1.reason.contains("not an outbox event"),
        "the unreadable message is parked under an LSN-derived id: {p:?}"
    );
    let records = consume(&[&topic], 2, QUIET, LONG).await?;
    let mut got: Vec<Uuid> = records.iter().map(Consumed::event_id).collect();
    got.sort();
    let mut want = vec![good, later];
    want.sort();
    ensure!(got == want, "published {got:?}, expected {want:?}");
    relay.stop().await?;
    drop_slots(&db.pool, &slot).await
}
