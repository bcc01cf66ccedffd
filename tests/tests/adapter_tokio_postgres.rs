//! The `tokio-postgres` adapter end to end, against the real PostgreSQL, the real relay process
//! and the real broker: an event written on a rolled-back `tokio_postgres::Transaction` is never
//! relayed, one written on a committed transaction is, and the adapter stores exactly the rows
//! (and so publishes exactly the records) the sqlx path does for the same events. The adapter's
//! migration creates the same schema as the sqlx one, under the same lock and history.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use outbox_core::{NewEvent, Outbox, OutboxTable, SCHEMA_VERSION, WriteMode};
use outbox_tests::adapters::*;
use outbox_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(60);

/// A `tokio-postgres` client on the test's database, its connection driven by a task.
async fn tokio_postgres_client(db: &TestDb) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .context("connecting with tokio-postgres")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("tokio-postgres connection ended: {error}");
        }
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tokio_postgres_transaction_publishes_its_events_iff_it_commits_like_sqlx() -> Result<()>
{
    let db = TestDb::migrated("adapter_tpg").await?;
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    let aggregate_type = unique("tpg");
    let topic = format!("outbox.event.{aggregate_type}");
    create_topic(&topic, 1).await?;
    let outbox = Outbox::default();
    let mut client = tokio_postgres_client(&db).await?;

    // Rolled back: neither the order nor its events are stored.
    let (placed, batch) = order_events(&aggregate_type, "rolled-back");
    let tx = client.transaction().await?;
    tx.execute("INSERT INTO orders (id) VALUES ('rolled-back')", &[])
        .await?;
    let mut rolled_back = vec![outbox.publish_new_tokio_postgres(&tx, vec![placed]).await?[0]];
    rolled_back.extend(outbox.publish_new_tokio_postgres(&tx, batch).await?);
    assert_eq!(
        stored_rows_in(&tx, &rolled_back).await?,
        4,
        "inside the transaction the adapter's rows are visible"
    );
    tx.rollback().await?;
    assert!(!order_exists(&db, "rolled-back").await?);
    assert!(stored_rows(&db, &rolled_back).await?.is_empty());

    // Committed through the adapter: the order and its four events.
    let (placed, batch) = order_events(&aggregate_type, "order-1");
    let tx = client.transaction().await?;
    tx.execute("INSERT INTO orders (id) VALUES ('order-1')", &[])
        .await?;
    let mut adapter_ids = vec![outbox.publish_new_tokio_postgres(&tx, vec![placed]).await?[0]];
    adapter_ids.extend(outbox.publish_new_tokio_postgres(&tx, batch).await?);
    tx.commit().await?;
    assert!(order_exists(&db, "order-1").await?);

    // The same events through the sqlx path.
    let (placed, batch) = order_events(&aggregate_type, "order-1");
    let mut tx = db.pool.begin().await?;
    let mut sqlx_ids = outbox.publish_new(&mut tx, vec![placed]).await?;
    sqlx_ids.extend(outbox.publish_new(&mut tx, batch).await?);
    tx.commit().await?;

    let adapter_rows = stored_rows(&db, &adapter_ids).await?;
    let sqlx_rows = stored_rows(&db, &sqlx_ids).await?;
    assert_eq!(adapter_rows.len(), 4, "{adapter_rows:#?}");
    assert_eq!(
        adapter_rows, sqlx_rows,
        "the adapter stored other rows than sqlx"
    );
    assert_eq!(adapter_rows[0]["tracingspancontext"], TRACEPARENT);
    assert_eq!(adapter_rows[0]["headers"]["tenant"], "acme");
    assert_eq!(adapter_rows[0]["schema_version"], 2);
    assert_eq!(adapter_rows[2]["payload"], Value::Null);
    assert_eq!(adapter_rows[3]["payload"]["parcels"], json!([1, 2]));

    // The relay publishes the committed events of both paths, and nothing of the rolled-back
    // transaction.
    let relay = RelayProcess::start(&db, &[], &[]).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    wait_drained(&db.pool, LONG).await?;
    let records = consume(&[&topic], 8, QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let by_id: BTreeMap<Uuid, &Consumed> = records.iter().map(|r| (r.event_id(), r)).collect();
    assert_eq!(
        records.len(),
        8,
        "one record per committed event: {records:#?}"
    );
    for id in &rolled_back {
        assert!(
            !by_id.contains_key(id),
            "an event of the rolled-back transaction was relayed"
        );
    }
    for (adapter_id, sqlx_id) in adapter_ids.iter().zip(&sqlx_ids) {
        let adapter = by_id
            .get(adapter_id)
            .with_context(|| format!("the adapter's event {adapter_id} was not relayed"))?;
        let sqlx = by_id
            .get(sqlx_id)
            .with_context(|| format!("the sqlx event {sqlx_id} was not relayed"))?;
        assert_eq!(adapter.key, sqlx.key, "keys differ");
        assert_eq!(adapter.value, sqlx.value, "values differ");
        assert_eq!(
            headers_but_identity(adapter),
            headers_but_identity(sqlx),
            "headers differ"
        );
    }
    let placed = by_id[&adapter_ids[0]];
    assert_eq!(placed.key.as_deref(), Some("customer-7"));
    assert_eq!(placed.header("tenant"), Some("acme"));
    assert_eq!(placed.header("traceparent"), Some(TRACEPARENT));
    assert_eq!(by_id[&adapter_ids[1]].key.as_deref(), Some("order-1"));
    Ok(())
}

/// How many of `ids` the transaction `tx` sees in the outbox table.
async fn stored_rows_in(tx: &tokio_postgres::Transaction<'_>, ids: &[Uuid]) -> Result<i64> {
    let row = tx
        .query_one("SELECT count(*) FROM outbox WHERE id = ANY($1)", &[&ids])
        .await?;
    Ok(row.get(0))
}

/// The logical-replication write modes through the adapter: what a rolled-back transaction wrote
/// never reaches the decoded WAL; a committed one's batch inserts-and-deletes its rows, or emits
/// one transactional message per event, in order.
#[tokio::test]
async fn the_adapter_writes_the_logical_modes_in_the_callers_transaction() -> Result<()> {
    let db = TestDb::migrated("adapter_tpg_modes").await?;
    let slot = test_decoding_slot(&db, "tpg").await?;
    let insert_delete = Outbox::default().with_write_mode(WriteMode::InsertDelete);
    let message = Outbox::default().with_write_mode(WriteMode::LogicalMessage);
    let events = logical_mode_events;
    let mut client = tokio_postgres_client(&db).await?;

    let tx = client.transaction().await?;
    let mut rolled_back = insert_delete
        .publish_new_tokio_postgres(&tx, events("RolledBack"))
        .await?;
    rolled_back.extend(
        message
            .publish_new_tokio_postgres(&tx, events("RolledBack"))
            .await?,
    );
    tx.rollback().await?;

    let tx = client.transaction().await?;
    let deleted = insert_delete
        .publish_new_tokio_postgres(&tx, events("ViaInsertDelete"))
        .await?;
    let messaged = message
        .publish_new_tokio_postgres(&tx, events("ViaMessage"))
        .await?;
    tx.commit().await?;

    assert_logical_modes_decoded(&db, &slot, &rolled_back, &deleted, &messaged).await
}

#[tokio::test]
async fn migrate_tokio_postgres_creates_the_sqlx_schema_once_and_then_publishes() -> Result<()> {
    let tpg_db = TestDb::create("adapter_tpg_migrate").await?;
    let sqlx_db = TestDb::migrated("adapter_tpg_migrate_sqlx").await?;
    let outbox = Outbox::default();
    let table = OutboxTable::default();
    let mut client = tokio_postgres_client(&tpg_db).await?;

    let report = outbox.migrate_tokio_postgres(&mut client).await?;
    assert_eq!(report.applied, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    assert_eq!(report.version, SCHEMA_VERSION);
    let tpg_version = outbox_core::schema_version(&mut tpg_db.connect().await?, &table).await?;
    let sqlx_version = outbox_core::schema_version(&mut sqlx_db.connect().await?, &table).await?;
    assert_eq!(tpg_version, Some(SCHEMA_VERSION));
    assert_eq!(tpg_version, sqlx_version);
    let tpg_schema = schema_description(&tpg_db, "public").await?;
    assert_eq!(
        tpg_schema,
        schema_description(&sqlx_db, "public").await?,
        "the tokio-postgres migration created another schema than the sqlx one"
    );
    assert_eq!(
        tpg_schema["history"].as_array().map(Vec::len),
        Some(SCHEMA_VERSION as usize),
        "{tpg_schema:#}"
    );

    // Twice is a no-op, through either driver: both read the one history.
    let again = outbox.migrate_tokio_postgres(&mut client).await?;
    assert!(again.applied.is_empty(), "{again:?}");
    let mut conn = tpg_db.connect().await?;
    assert!(outbox.migrate(&mut conn).await?.applied.is_empty());
    assert_eq!(schema_description(&tpg_db, "public").await?, tpg_schema);

    // The migrated table takes the adapter's writes.
    let tx = client.transaction().await?;
    let ids = outbox
        .publish_new_tokio_postgres(
            &tx,
            vec![NewEvent::new(
                "order",
                "1",
                "OrderPlaced",
                Some(json!({ "n": 1 })),
            )],
        )
        .await?;
    tx.commit().await?;
    let stored: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, type FROM outbox WHERE published_at IS NULL")
            .fetch_all(&tpg_db.pool)
            .await?;
    assert_eq!(stored, vec![(ids[0], "OrderPlaced".to_owned())]);
    Ok(())
}

/// Concurrent migrators of one fresh table in its own schema — several tokio-postgres clients and
/// a sqlx connection — all succeed, and exactly one of them applies each step: they share the
/// advisory lock and the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tokio_postgres_and_sqlx_migrations_apply_each_step_once() -> Result<()> {
    let db = TestDb::create("adapter_tpg_migrate_conc").await?;
    let table = OutboxTable::new(Some("sales"), "events")?;
    let outbox = Outbox::new(table.clone());
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(tokio_postgres_client(&db).await?);
    }
    let mut conn = db.connect().await?;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len() + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for mut client in clients {
        let (outbox, barrier) = (outbox.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            outbox.migrate_tokio_postgres(&mut client).await
        });
    }
    let (outbox_sqlx, barrier_sqlx) = (outbox.clone(), barrier.clone());
    tasks.spawn(async move {
        barrier_sqlx.wait().await;
        outbox_sqlx.migrate(&mut conn).await
    });
    let mut applied = Vec::new();
    while let Some(report) = tasks.join_next().await {
        let report = report?.context("a concurrent migration failed")?;
        assert_eq!(report.version, SCHEMA_VERSION);
        applied.extend(report.applied);
    }
    applied.sort_unstable();
    assert_eq!(
        applied,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>(),
        "each step applied exactly once"
    );
    let history: Vec<i32> = sqlx::query_scalar(
        "SELECT version FROM sales._outbox_migrations WHERE table_name = 'events' ORDER BY version",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(history, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    let mut client = tokio_postgres_client(&db).await?;
    let tx = client.transaction().await?;
    outbox
        .publish_new_tokio_postgres(&tx, vec![NewEvent::new("order", "1", "OrderPlaced", None)])
        .await?;
    tx.commit().await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sales.events")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 1);
    Ok(())
}
