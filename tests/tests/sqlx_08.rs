//! The sqlx 0.8 adapter end to end, against the real PostgreSQL, the real relay process and the
//! real broker: an event written in a rolled-back sqlx 0.8 transaction is never relayed, one
//! written in a committed transaction is, with the key, value and headers of the same event
//! written through sqlx 0.9; the adapter stores exactly the rows the sqlx 0.9 path does; it writes
//! the logical modes in the caller's transaction; and its migration creates the sqlx 0.9 schema
//! under the same lock and history.

use anyhow::{Context, Result};
use outbox_core::{Outbox, OutboxTable, SCHEMA_VERSION, WriteMode};
use outbox_tests::adapters::*;
use outbox_tests::*;
use sqlx08::{Connection, PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// A typed event, for the typed calls (`publish_sqlx08`, `publish_all_sqlx08`).
#[derive(Debug, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "order", aggregate_id = "order")]
enum OrderNote {
    Noted { order: String, note: String },
}

async fn sqlx08_pool(db: &TestDb) -> Result<PgPool> {
    PgPool::connect(&db.url)
        .await
        .context("connecting with sqlx 0.8")
}

/// How many of `ids` the transaction `tx` sees in the outbox table.
async fn stored_rows_in(tx: &mut Transaction<'_, Postgres>, ids: &[Uuid]) -> Result<i64> {
    Ok(
        sqlx08::query_scalar("SELECT count(*) FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .fetch_one(&mut **tx)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlx_08_transaction_publishes_its_events_iff_it_commits_like_sqlx_09() -> Result<()> {
    let db = TestDb::migrated("sqlx_08").await?;
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    let aggregate_type = unique("sqlx08");
    let topic = format!("outbox.event.{aggregate_type}");
    create_topic(&topic, 1).await?;
    let outbox = Outbox::default();
    let pool = sqlx08_pool(&db).await?;

    // Rolled back: neither the order nor its events are stored.
    let (placed, batch) = order_events(&aggregate_type, "rolled-back");
    let mut tx = pool.begin().await?;
    sqlx08::query("INSERT INTO orders (id) VALUES ('rolled-back')")
        .execute(&mut *tx)
        .await?;
    let mut rolled_back = outbox.publish_new_sqlx08(&mut tx, vec![placed]).await?;
    rolled_back.extend(outbox.publish_new_sqlx08(&mut tx, batch).await?);
    assert_eq!(
        stored_rows_in(&mut tx, &rolled_back).await?,
        4,
        "inside the transaction the adapter's rows are visible"
    );
    tx.rollback().await?;
    assert!(!order_exists(&db, "rolled-back").await?);
    assert!(stored_rows(&db, &rolled_back).await?.is_empty());

    // Dropped without a commit (an early return, a panic): rolled back too.
    let mut tx = pool.begin().await?;
    let (placed, _) = order_events(&aggregate_type, "dropped");
    rolled_back.extend(outbox.publish_new_sqlx08(&mut tx, vec![placed]).await?);
    drop(tx);
    assert!(stored_rows(&db, &rolled_back).await?.is_empty());

    // Committed through the adapter: the order and its four events.
    let (placed, batch) = order_events(&aggregate_type, "order-1");
    let mut tx = pool.begin().await?;
    sqlx08::query("INSERT INTO orders (id) VALUES ('order-1')")
        .execute(&mut *tx)
        .await?;
    let mut adapter_ids = outbox.publish_new_sqlx08(&mut tx, vec![placed]).await?;
    adapter_ids.extend(outbox.publish_new_sqlx08(&mut tx, batch).await?);
    tx.commit().await?;
    assert!(order_exists(&db, "order-1").await?);

    // The same events through sqlx 0.9: the same rows, the same records.
    let sqlx_ids = write_order_with_sqlx(&db, &outbox, &aggregate_type, "order-1").await?;
    assert_stored_like_sqlx(&db, "sqlx 0.8", &adapter_ids, &sqlx_ids).await?;
    assert_relayed_like_sqlx(
        &db,
        &topic,
        8,
        &rolled_back,
        &adapter_ids,
        &sqlx_ids,
        "order-1",
    )
    .await
}

/// The typed calls write in the caller's transaction, in order, and nothing survives a rollback.
#[tokio::test]
async fn the_typed_sqlx_08_calls_write_in_the_callers_transaction() -> Result<()> {
    let db = TestDb::migrated("sqlx_08_typed").await?;
    let outbox = Outbox::default();
    let pool = sqlx08_pool(&db).await?;
    let note = |n: &str| OrderNote::Noted {
        order: "order-1".into(),
        note: n.into(),
    };

    let mut tx = pool.begin().await?;
    outbox.publish_sqlx08(&mut tx, &note("lost")).await?;
    tx.rollback().await?;

    let mut tx = pool.begin().await?;
    let mut written = vec![outbox.publish_sqlx08(&mut tx, &note("one")).await?];
    written.extend(
        outbox
            .publish_all_sqlx08(&mut tx, [&note("two"), &note("three")])
            .await?,
    );
    tx.commit().await?;

    let stored: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT id, aggregateid, payload->>'note' FROM outbox ORDER BY seq")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        stored,
        written
            .iter()
            .zip(["one", "two", "three"])
            .map(|(id, n)| (*id, "order-1".to_owned(), n.to_owned()))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// The logical-replication write modes through the adapter: what a rolled-back transaction wrote
/// never reaches the decoded WAL; a committed one's batch inserts-and-deletes its rows, or emits
/// one transactional message per event, in order.
#[tokio::test]
async fn the_sqlx_08_adapter_writes_the_logical_modes_in_the_callers_transaction() -> Result<()> {
    let db = TestDb::migrated("sqlx_08_modes").await?;
    let slot = test_decoding_slot(&db, "sqlx08").await?;
    let insert_delete = Outbox::default().with_write_mode(WriteMode::InsertDelete);
    let message = Outbox::default().with_write_mode(WriteMode::LogicalMessage);
    let events = logical_mode_events;
    let pool = sqlx08_pool(&db).await?;

    let mut tx = pool.begin().await?;
    let mut rolled_back = insert_delete
        .publish_new_sqlx08(&mut tx, events("RolledBack"))
        .await?;
    rolled_back.extend(
        message
            .publish_new_sqlx08(&mut tx, events("RolledBack"))
            .await?,
    );
    tx.rollback().await?;

    let mut tx = pool.begin().await?;
    let deleted = insert_delete
        .publish_new_sqlx08(&mut tx, events("ViaInsertDelete"))
        .await?;
    let messaged = message
        .publish_new_sqlx08(&mut tx, events("ViaMessage"))
        .await?;
    tx.commit().await?;

    assert_logical_modes_decoded(&db, &slot, &rolled_back, &deleted, &messaged).await
}

#[tokio::test]
async fn migrate_sqlx08_creates_the_sqlx_09_schema_once_and_then_publishes() -> Result<()> {
    let db = TestDb::create("sqlx_08_migrate").await?;
    let reference = TestDb::migrated("sqlx_08_migrate_ref").await?;
    let outbox = Outbox::default();
    let mut conn = PgConnection::connect(&db.url).await?;

    let report = outbox.migrate_sqlx08(&mut conn).await?;
    assert_migrated_like_sqlx(&db, &reference, &report).await?;
    // Twice is a no-op, through either sqlx: both read the one history.
    assert!(outbox.migrate_sqlx08(&mut conn).await?.applied.is_empty());
    assert!(
        outbox
            .migrate(&mut db.connect().await?)
            .await?
            .applied
            .is_empty()
    );

    // Concurrent migrators of a fresh table in its own schema, through both sqlx versions: each
    // step applied exactly once.
    let sales = Outbox::new(OutboxTable::new(Some("sales"), "events")?);
    let (mut a, mut b) = (
        PgConnection::connect(&db.url).await?,
        PgConnection::connect(&db.url).await?,
    );
    let mut c = db.connect().await?;
    let (ra, rb, rc) = tokio::join!(
        sales.migrate_sqlx08(&mut a),
        sales.migrate_sqlx08(&mut b),
        sales.migrate(&mut c)
    );
    let mut applied = [ra?.applied, rb?.applied, rc?.applied].concat();
    applied.sort_unstable();
    assert_eq!(applied, (1..=SCHEMA_VERSION).collect::<Vec<_>>());

    // The migrated table takes the adapter's writes.
    let mut tx = conn.begin().await?;
    let note = OrderNote::Noted {
        order: "1".into(),
        note: "hello".into(),
    };
    let id = outbox.publish_sqlx08(&mut tx, &note).await?;
    tx.commit().await?;
    let stored: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, type FROM outbox WHERE published_at IS NULL")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(stored, vec![(id, "Noted".to_owned())]);
    Ok(())
}
