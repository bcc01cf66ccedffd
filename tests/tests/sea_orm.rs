//! The sea-orm adapter end to end, against the real PostgreSQL, the real relay process and the
//! real broker: an event written in a rolled-back sea-orm `DatabaseTransaction` is never relayed,
//! one written in a committed transaction is, with the key, value and headers of the same event
//! written through sqlx; the adapter stores exactly the rows the sqlx path does, whatever the
//! text in them; it writes the logical modes in the caller's transaction; and its migration
//! creates the sqlx schema under the same lock and history.

use anyhow::{Context, Result};
use outbox_core::{NewEvent, Outbox, OutboxTable, SCHEMA_VERSION, WriteMode};
use outbox_tests::adapters::*;
use outbox_tests::*;
use sea_orm::sea_query::{ArrayType, Value};
use sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend, Statement,
    TransactionTrait,
};
use serde_json::json;
use uuid::Uuid;

/// A typed event, for the typed calls (`publish_sea_orm`, `publish_all_sea_orm`).
#[derive(Debug, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "order", aggregate_id = "order")]
enum OrderNote {
    Noted { order: String, note: String },
}

async fn sea_orm_connection(db: &TestDb) -> Result<DatabaseConnection> {
    Database::connect(&db.url)
        .await
        .context("connecting with sea-orm")
}

/// How many of `ids` the transaction `tx` sees in the outbox table.
async fn stored_rows_in(tx: &DatabaseTransaction, ids: &[Uuid]) -> Result<i64> {
    let ids = ids.iter().map(|id| Value::Uuid(Some(*id))).collect();
    let row = tx
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) FROM outbox WHERE id = ANY($1)",
            [Value::Array(ArrayType::Uuid, Some(Box::new(ids)))],
        ))
        .await?
        .context("count(*) returns a row")?;
    Ok(row.try_get_by_index(0)?)
}

async fn insert_order(tx: &DatabaseTransaction, order: &str) -> Result<()> {
    tx.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO orders (id) VALUES ($1)",
        [order.into()],
    ))
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sea_orm_transaction_publishes_its_events_iff_it_commits_like_sqlx() -> Result<()> {
    let db = TestDb::migrated("sea_orm").await?;
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    let aggregate_type = unique("seaorm");
    let topic = format!("outbox.event.{aggregate_type}");
    create_topic(&topic, 1).await?;
    let outbox = Outbox::default();
    let conn = sea_orm_connection(&db).await?;

    // Rolled back: neither the order nor its events are stored.
    let (placed, batch) = order_events(&aggregate_type, "rolled-back");
    let tx = conn.begin().await?;
    insert_order(&tx, "rolled-back").await?;
    let mut rolled_back = outbox.publish_new_sea_orm(&tx, vec![placed]).await?;
    rolled_back.extend(outbox.publish_new_sea_orm(&tx, batch).await?);
    assert_eq!(
        stored_rows_in(&tx, &rolled_back).await?,
        4,
        "inside the transaction the adapter's rows are visible"
    );
    tx.rollback().await?;
    assert!(!order_exists(&db, "rolled-back").await?);
    assert!(stored_rows(&db, &rolled_back).await?.is_empty());

    // Dropped without a commit (an early return, a panic): rolled back too.
    let tx = conn.begin().await?;
    let (placed, _) = order_events(&aggregate_type, "dropped");
    rolled_back.extend(outbox.publish_new_sea_orm(&tx, vec![placed]).await?);
    drop(tx);
    assert!(stored_rows(&db, &rolled_back).await?.is_empty());

    // Committed through the adapter, with sea-orm's closure API: the order and its four events.
    let (placed, batch) = order_events(&aggregate_type, "order-1");
    let adapter_ids = conn
        .transaction::<_, _, outbox_core::Error>(|tx| {
            let outbox = outbox.clone();
            Box::pin(async move {
                tx.execute_unprepared("INSERT INTO orders (id) VALUES ('order-1')")
                    .await?;
                let mut ids = outbox.publish_new_sea_orm(tx, vec![placed]).await?;
                ids.extend(outbox.publish_new_sea_orm(tx, batch).await?);
                Ok(ids)
            })
        })
        .await?;
    assert!(order_exists(&db, "order-1").await?);

    // The same events through sqlx: the same rows, the same records.
    let sqlx_ids = write_order_with_sqlx(&db, &outbox, &aggregate_type, "order-1").await?;
    assert_stored_like_sqlx(&db, "sea-orm", &adapter_ids, &sqlx_ids).await?;
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

/// sea-query cannot bind arrays with `NULL` elements, so the adapter sends the nullable columns
/// of a batch (payloads, trace contexts, topics, sequences) as array literals: text that needs
/// quoting in one (quotes, backslashes, braces, commas, the word NULL, an empty string, non-ASCII)
/// and absent values next to present ones must be stored exactly as the sqlx path stores them.
#[tokio::test]
async fn the_sea_orm_adapter_stores_any_text_like_sqlx() -> Result<()> {
    let db = TestDb::migrated("sea_orm_text").await?;
    let outbox = Outbox::default();
    let conn = sea_orm_connection(&db).await?;
    let events = || {
        let texts = [
            r#"quote " and backslash \ and \" both"#,
            "{braces, commas}",
            "NULL",
            "",
            "non-ASCII: é ß 漢字 🦀",
            "new\nline\ttab",
        ];
        let mut events: Vec<NewEvent> = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let event = NewEvent::new(
                    "order",
                    format!("id:{text}"),
                    "Texty",
                    Some(json!({ "text": text, "i": i })),
                )
                .with_header("h", *text);
                if i % 2 == 0 {
                    event
                        .with_topic("outbox.texty")
                        .with_aggregate_seq(i as i64)
                } else {
                    event.with_traceparent(TRACEPARENT)
                }
            })
            .collect();
        events.push(NewEvent::new("order", "none", "Empty", None));
        events
    };

    let tx = conn.begin().await?;
    let adapter_ids = outbox.publish_new_sea_orm(&tx, events()).await?;
    tx.commit().await?;
    let mut tx = db.pool.begin().await?;
    let sqlx_ids = outbox.publish_new(&mut tx, events()).await?;
    tx.commit().await?;

    let adapter_rows = stored_rows(&db, &adapter_ids).await?;
    assert_eq!(adapter_rows.len(), 7);
    assert_eq!(adapter_rows, stored_rows(&db, &sqlx_ids).await?);
    assert_eq!(
        adapter_rows[0]["aggregateid"],
        r#"id:quote " and backslash \ and \" both"#
    );
    assert_eq!(adapter_rows[2]["payload"]["text"], "NULL");
    assert_eq!(adapter_rows[2]["topic"], "outbox.texty");
    assert_eq!(adapter_rows[3]["topic"], serde_json::Value::Null);
    assert_eq!(adapter_rows[3]["tracingspancontext"], TRACEPARENT);
    assert_eq!(adapter_rows[4]["aggregate_seq"], 4);
    assert_eq!(adapter_rows[5]["aggregate_seq"], serde_json::Value::Null);
    assert_eq!(adapter_rows[6]["payload"], serde_json::Value::Null);
    Ok(())
}

/// The typed calls write in the caller's transaction, in order, and nothing survives a rollback.
#[tokio::test]
async fn the_typed_sea_orm_calls_write_in_the_callers_transaction() -> Result<()> {
    let db = TestDb::migrated("sea_orm_typed").await?;
    let outbox = Outbox::default();
    let conn = sea_orm_connection(&db).await?;
    let note = |n: &str| OrderNote::Noted {
        order: "order-1".into(),
        note: n.into(),
    };

    let tx = conn.begin().await?;
    outbox.publish_sea_orm(&tx, &note("lost")).await?;
    tx.rollback().await?;

    let tx = conn.begin().await?;
    let mut written = vec![outbox.publish_sea_orm(&tx, &note("one")).await?];
    written.extend(
        outbox
            .publish_all_sea_orm(&tx, [&note("two"), &note("three")])
            .await?,
    );
    // A nested sea-orm transaction is a savepoint in the outer one: its events commit with it.
    let nested = tx.begin().await?;
    written.push(outbox.publish_sea_orm(&nested, &note("nested")).await?);
    nested.commit().await?;
    tx.commit().await?;

    let stored: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT id, aggregateid, payload->>'note' FROM outbox ORDER BY seq")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        stored,
        written
            .iter()
            .zip(["one", "two", "three", "nested"])
            .map(|(id, n)| (*id, "order-1".to_owned(), n.to_owned()))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// The logical-replication write modes through the adapter: what a rolled-back transaction wrote
/// never reaches the decoded WAL; a committed one's batch inserts-and-deletes its rows, or emits
/// one transactional message per event, in order.
#[tokio::test]
async fn the_sea_orm_adapter_writes_the_logical_modes_in_the_callers_transaction() -> Result<()> {
    let db = TestDb::migrated("sea_orm_modes").await?;
    let slot = test_decoding_slot(&db, "seaorm").await?;
    let insert_delete = Outbox::default().with_write_mode(WriteMode::InsertDelete);
    let message = Outbox::default().with_write_mode(WriteMode::LogicalMessage);
    let events = logical_mode_events;
    let conn = sea_orm_connection(&db).await?;

    let tx = conn.begin().await?;
    let mut rolled_back = insert_delete
        .publish_new_sea_orm(&tx, events("RolledBack"))
        .await?;
    rolled_back.extend(
        message
            .publish_new_sea_orm(&tx, events("RolledBack"))
            .await?,
    );
    tx.rollback().await?;

    let tx = conn.begin().await?;
    let deleted = insert_delete
        .publish_new_sea_orm(&tx, events("ViaInsertDelete"))
        .await?;
    let messaged = message
        .publish_new_sea_orm(&tx, events("ViaMessage"))
        .await?;
    tx.commit().await?;

    assert_logical_modes_decoded(&db, &slot, &rolled_back, &deleted, &messaged).await
}

#[tokio::test]
async fn migrate_sea_orm_creates_the_sqlx_schema_once_and_then_publishes() -> Result<()> {
    let db = TestDb::create("sea_orm_migrate").await?;
    let reference = TestDb::migrated("sea_orm_migrate_ref").await?;
    let outbox = Outbox::default();
    let conn = sea_orm_connection(&db).await?;

    let report = outbox.migrate_sea_orm(&conn).await?;
    assert_migrated_like_sqlx(&db, &reference, &report).await?;
    // Twice is a no-op, through either driver: both read the one history.
    assert!(outbox.migrate_sea_orm(&conn).await?.applied.is_empty());
    assert!(
        outbox
            .migrate(&mut db.connect().await?)
            .await?
            .applied
            .is_empty()
    );

    // Concurrent migrators of a fresh table in its own schema, through sea-orm (its pool gives
    // each call its own connection) and sqlx: each step applied exactly once.
    let sales = Outbox::new(OutboxTable::new(Some("sales"), "events")?);
    let mut sqlx_conn = db.connect().await?;
    let (ra, rb, rc) = tokio::join!(
        sales.migrate_sea_orm(&conn),
        sales.migrate_sea_orm(&conn),
        sales.migrate(&mut sqlx_conn)
    );
    let mut applied = [ra?.applied, rb?.applied, rc?.applied].concat();
    applied.sort_unstable();
    assert_eq!(applied, (1..=SCHEMA_VERSION).collect::<Vec<_>>());

    // The migrated table takes the adapter's writes.
    let tx = conn.begin().await?;
    let note = OrderNote::Noted {
        order: "1".into(),
        note: "hello".into(),
    };
    let id = outbox.publish_sea_orm(&tx, &note).await?;
    tx.commit().await?;
    let stored: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, type FROM outbox WHERE published_at IS NULL")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(stored, vec![(id, "Noted".to_owned())]);
    Ok(())
}
