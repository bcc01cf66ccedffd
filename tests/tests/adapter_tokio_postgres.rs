//! The `tokio-postgres` adapter end to end, against the real PostgreSQL, the real relay process
//! and the real broker: an event written on a rolled-back `tokio_postgres::Transaction` is never
//! relayed, one written on a committed transaction is, and the adapter stores exactly the rows
//! (and so publishes exactly the records) the sqlx path does for the same events. The adapter's
//! migration creates the same schema as the sqlx one, under the same lock and history.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use outbox_core::{NewEvent, Outbox, OutboxTable, SCHEMA_VERSION, WriteMode};
use outbox_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(60);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

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

/// The events of one order: one written alone (keyed, with a header, a trace context, a schema
/// version and a sequence) and three written as a batch (one without a payload). Every field but
/// the id is the same whichever path writes them.
fn order_events(aggregate_type: &str, order: &str) -> (NewEvent, Vec<NewEvent>) {
    let placed = NewEvent::new(
        aggregate_type,
        order,
        "OrderPlaced",
        Some(json!({ "order": order, "sku": "BOOK-42", "quantity": 2 })),
    )
    .with_key("customer-7")
    .with_header("tenant", "acme")
    .with_traceparent(TRACEPARENT)
    .with_schema_version(2)
    .with_aggregate_seq(1);
    let batch = vec![
        NewEvent::new(
            aggregate_type,
            order,
            "OrderPaid",
            Some(json!({ "amount": "12.50" })),
        )
        .with_aggregate_seq(2),
        NewEvent::new(aggregate_type, order, "OrderTouched", None).with_aggregate_seq(3),
        NewEvent::new(
            aggregate_type,
            order,
            "OrderShipped",
            Some(json!({ "carrier": "post", "parcels": [1, 2] })),
        )
        .with_header("tenant", "acme")
        .with_aggregate_seq(4),
    ];
    (placed, batch)
}

/// The stored rows of `ids`, in write order, without what differs by design between two writes
/// of the same event (`id`, `seq`, `created_at`).
async fn stored_rows(db: &TestDb, ids: &[Uuid]) -> Result<Vec<Value>> {
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(o) - 'id' - 'seq' - 'created_at' FROM outbox o
         WHERE id = ANY($1) ORDER BY seq",
    )
    .bind(ids)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows)
}

async fn order_exists(db: &TestDb, order: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)")
            .bind(order)
            .fetch_one(&db.pool)
            .await?,
    )
}

/// A record's headers without those that differ by design between two writes of one event: the
/// event id (`id`, `ce_id`) and the write time (`ce_time`).
fn headers_but_identity(record: &Consumed) -> BTreeMap<String, String> {
    let mut headers = record.headers.clone();
    for name in ["id", "ce_id", "ce_time"] {
        headers.remove(name);
    }
    headers
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
    // A test_decoding slot shows exactly what reaches the WAL (committed transactions only).
    let slot = unique("tpg");
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding')")
        .bind(&slot)
        .execute(&db.pool)
        .await?;
    let insert_delete = Outbox::default().with_write_mode(WriteMode::InsertDelete);
    let message = Outbox::default().with_write_mode(WriteMode::LogicalMessage);
    let events = |event_type: &str| {
        vec![
            NewEvent::new("order", "1", event_type, Some(json!({ "n": 1 }))),
            NewEvent::new("order", "1", event_type, None).with_header("tenant", "acme"),
        ]
    };
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

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 0, "neither logical mode leaves a row");
    let changes: Vec<String> =
        sqlx::query_scalar("SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)")
            .bind(&slot)
            .fetch_all(&db.pool)
            .await?;
    let all = changes.join("\n");
    for id in &rolled_back {
        assert!(
            !all.contains(&id.to_string()),
            "rolled back {id} decoded:\n{all}"
        );
    }
    for id in &deleted {
        assert!(
            all.contains(&format!("id[uuid]:'{id}'")),
            "{id} not inserted:\n{all}"
        );
    }
    assert_eq!(
        all.matches("table public.outbox: DELETE").count(),
        2,
        "{all}"
    );
    let messages: Vec<outbox_core::StoredEvent> = changes
        .iter()
        .filter(|c| c.contains("prefix: outbox") && c.contains("transactional: 1"))
        .map(|c| {
            let content = c.split_once("content:").expect("message content").1.trim();
            outbox_core::StoredEvent::from_logical_message(content.as_bytes())
        })
        .collect::<Result<_, _>>()?;
    assert_eq!(
        messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        messaged,
        "{all}"
    );
    assert_eq!(messages[0].event_type, "ViaMessage");
    assert_eq!(messages[0].payload.as_deref(), Some(r#"{"n": 1}"#));
    assert_eq!(messages[1].payload, None);
    assert!(
        messages[1]
            .headers
            .contains(&("tenant".to_owned(), "acme".to_owned())),
        "{:?}",
        messages[1].headers
    );
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Everything the outbox migrations create in `schema`, as one JSON value: the columns (types,
/// defaults, nullability, identity) of every table, the index and constraint definitions, the
/// triggers, the functions' definitions and the migration history (without its times).
async fn schema_description(db: &TestDb, schema: &str) -> Result<Value> {
    Ok(sqlx::query_scalar(
        "SELECT jsonb_build_object(
            'columns', (SELECT jsonb_agg(jsonb_build_array(table_name, column_name, data_type,
                            is_nullable, column_default, is_identity, character_maximum_length)
                        ORDER BY table_name, ordinal_position)
                        FROM information_schema.columns WHERE table_schema = $1),
            'indexes', (SELECT jsonb_agg(indexdef ORDER BY indexname)
                        FROM pg_indexes WHERE schemaname = $1),
            'constraints', (SELECT jsonb_agg(jsonb_build_array(conrelid::regclass::text, conname,
                                pg_get_constraintdef(oid)) ORDER BY conname)
                            FROM pg_constraint WHERE connamespace = $1::regnamespace),
            'triggers', (SELECT jsonb_agg(tgname ORDER BY tgname) FROM pg_trigger
                         WHERE NOT tgisinternal
                           AND tgrelid::regclass::text NOT LIKE 'pg_%'),
            'functions', (SELECT jsonb_agg(pg_get_functiondef(oid) ORDER BY proname)
                          FROM pg_proc WHERE pronamespace = $1::regnamespace),
            'history', (SELECT jsonb_agg(jsonb_build_array(table_name, version, description)
                                ORDER BY table_name, version)
                        FROM _outbox_migrations))",
    )
    .bind(schema)
    .fetch_one(&db.pool)
    .await?)
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
