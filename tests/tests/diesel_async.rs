//! The diesel-async adapter end to end, against the real PostgreSQL, the real relay process and
//! the real broker: an event written in a rolled-back diesel-async transaction is never relayed,
//! one written in a committed transaction is, on its topic with its key and id; a write on a
//! connection outside any transaction is refused with a typed error and leaves no row; the adapter
//! stores exactly the rows the sqlx path does for the same events; and its migration creates the
//! sqlx schema under the same lock and history.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Text, Uuid as PgUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use outbox_core::{NewEvent, Outbox, OutboxTable, SCHEMA_VERSION, WriteMode};
use outbox_tests::adapters::*;
use outbox_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(60);

/// A typed event, for the typed calls (`publish_diesel_async`, `publish_all_diesel_async`).
#[derive(Debug, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "order", aggregate_id = "order")]
enum OrderNote {
    Noted { order: String, note: String },
}

async fn diesel_connection(db: &TestDb) -> Result<AsyncPgConnection> {
    AsyncPgConnection::establish(&db.url)
        .await
        .context("connecting with diesel-async")
}

async fn count_rows(db: &TestDb) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many of `ids` the connection `conn` (inside its transaction) sees in the outbox table.
async fn stored_rows_in(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> Result<i64, Error> {
    Ok(
        diesel::sql_query("SELECT count(*) AS n FROM outbox WHERE id = ANY($1)")
            .bind::<Array<PgUuid>, _>(ids)
            .get_result::<Count>(conn)
            .await?
            .n,
    )
}

/// The business write of the tests, on the caller's diesel connection.
async fn insert_order(conn: &mut AsyncPgConnection, order: &str) -> Result<(), Error> {
    diesel::sql_query("INSERT INTO orders (id) VALUES ($1)")
        .bind::<Text, _>(order)
        .execute(conn)
        .await?;
    Ok(())
}

/// The error type of the tests' transactions: the adapter's, which takes diesel's.
type Error = outbox_core::Error;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_diesel_async_transaction_publishes_its_events_iff_it_commits_like_sqlx() -> Result<()> {
    let db = TestDb::migrated("diesel_async").await?;
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    let aggregate_type = unique("diesel");
    let topic = format!("outbox.event.{aggregate_type}");
    create_topic(&topic, 1).await?;
    let outbox = Outbox::default();
    let mut conn = diesel_connection(&db).await?;

    // Rolled back: neither the order nor its events are stored.
    let (placed, batch) = order_events(&aggregate_type, "rolled-back");
    let mut rolled_back = Vec::new();
    let outcome = conn
        .transaction::<(), Error, _>(async |conn| {
            insert_order(conn, "rolled-back").await?;
            rolled_back.extend(outbox.publish_new_diesel_async(conn, vec![placed]).await?);
            rolled_back.extend(outbox.publish_new_diesel_async(conn, batch).await?);
            assert_eq!(
                stored_rows_in(conn, &rolled_back).await?,
                4,
                "inside the transaction the adapter's rows are visible"
            );
            Err(diesel::result::Error::RollbackTransaction.into())
        })
        .await;
    assert!(
        matches!(
            outcome,
            Err(Error::Diesel(diesel::result::Error::RollbackTransaction))
        ),
        "{outcome:?}"
    );
    assert_eq!(rolled_back.len(), 4);
    assert!(!order_exists(&db, "rolled-back").await?);
    assert!(stored_rows(&db, &rolled_back).await?.is_empty());

    // Committed through the adapter: the order and its four events.
    let (placed, batch) = order_events(&aggregate_type, "order-1");
    let adapter_ids = conn
        .transaction::<_, Error, _>(async |conn| {
            insert_order(conn, "order-1").await?;
            let mut ids = outbox.publish_new_diesel_async(conn, vec![placed]).await?;
            ids.extend(outbox.publish_new_diesel_async(conn, batch).await?);
            Ok(ids)
        })
        .await?;
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
        "the diesel-async adapter stored other rows than sqlx"
    );
    assert_eq!(adapter_rows[0]["tracingspancontext"], TRACEPARENT);
    assert_eq!(adapter_rows[0]["headers"]["tenant"], "acme");
    assert_eq!(adapter_rows[0]["schema_version"], 2);
    assert_eq!(adapter_rows[0]["aggregate_seq"], 1);
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
        assert_eq!(adapter.topic, topic);
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

/// A write on a connection outside any transaction — before the first, and after one committed —
/// fails with `NotInTransaction` through every call and leaves no row; the same calls inside a
/// transaction (and inside a nested savepoint) write.
#[tokio::test]
async fn a_diesel_async_write_outside_a_transaction_is_refused_and_writes_nothing() -> Result<()> {
    let db = TestDb::migrated("diesel_async_autocommit").await?;
    let outbox = Outbox::default();
    let mut conn = diesel_connection(&db).await?;
    let note = |n: &str| OrderNote::Noted {
        order: "order-1".into(),
        note: n.into(),
    };
    let assert_refused = |outcome: Result<Vec<Uuid>, Error>| match outcome {
        Err(Error::NotInTransaction) => {}
        other => panic!("expected NotInTransaction, got {other:?}"),
    };

    let single = outbox
        .publish_diesel_async(&mut conn, &note("alone"))
        .await
        .map(|id| vec![id]);
    assert_refused(single);
    assert_refused(
        outbox
            .publish_all_diesel_async(&mut conn, [&note("a"), &note("b")])
            .await,
    );
    assert_refused(
        outbox
            .publish_new_diesel_async(
                &mut conn,
                vec![NewEvent::new("order", "order-1", "Noted", None)],
            )
            .await,
    );
    assert_eq!(count_rows(&db).await?, 0, "a refused write left a row");
    let message = Error::NotInTransaction.to_string();
    assert!(message.contains("not inside a transaction"), "{message}");

    // Inside a transaction, and in a savepoint within it, the same calls write.
    let written = conn
        .transaction::<_, Error, _>(async |conn| {
            let mut ids = vec![outbox.publish_diesel_async(conn, &note("one")).await?];
            ids.extend(
                outbox
                    .publish_all_diesel_async(conn, [&note("two"), &note("three")])
                    .await?,
            );
            let nested = conn
                .transaction::<_, Error, _>(async |conn| {
                    outbox.publish_diesel_async(conn, &note("nested")).await
                })
                .await?;
            ids.push(nested);
            Ok(ids)
        })
        .await?;
    let stored: Vec<(Uuid, String, String)> =
        sqlx::query_as("SELECT id, aggregatetype, payload->>'note' FROM outbox ORDER BY seq")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        stored,
        written
            .iter()
            .zip(["one", "two", "three", "nested"])
            .map(|(id, n)| (*id, "order".to_owned(), n.to_owned()))
            .collect::<Vec<_>>()
    );

    // After the commit the connection is outside a transaction again: refused again.
    assert_refused(
        outbox
            .publish_diesel_async(&mut conn, &note("after"))
            .await
            .map(|id| vec![id]),
    );
    assert_eq!(count_rows(&db).await?, 4);
    Ok(())
}

/// The logical-replication write modes through the adapter: what a rolled-back transaction wrote
/// never reaches the decoded WAL; a committed one's batch inserts-and-deletes its rows, or emits
/// one transactional message per event, in order.
#[tokio::test]
async fn the_diesel_async_adapter_writes_the_logical_modes_in_the_callers_transaction() -> Result<()>
{
    let db = TestDb::migrated("diesel_async_modes").await?;
    let slot = test_decoding_slot(&db, "diesel").await?;
    let insert_delete = Outbox::default().with_write_mode(WriteMode::InsertDelete);
    let message = Outbox::default().with_write_mode(WriteMode::LogicalMessage);
    let events = logical_mode_events;
    let mut conn = diesel_connection(&db).await?;

    let mut rolled_back = Vec::new();
    let outcome = conn
        .transaction::<(), Error, _>(async |conn| {
            rolled_back.extend(
                insert_delete
                    .publish_new_diesel_async(conn, events("RolledBack"))
                    .await?,
            );
            rolled_back.extend(
                message
                    .publish_new_diesel_async(conn, events("RolledBack"))
                    .await?,
            );
            Err(diesel::result::Error::RollbackTransaction.into())
        })
        .await;
    assert!(outcome.is_err());
    assert_eq!(rolled_back.len(), 4);

    let (deleted, messaged) = conn
        .transaction::<_, Error, _>(async |conn| {
            let deleted = insert_delete
                .publish_new_diesel_async(conn, events("ViaInsertDelete"))
                .await?;
            let messaged = message
                .publish_new_diesel_async(conn, events("ViaMessage"))
                .await?;
            Ok((deleted, messaged))
        })
        .await?;

    assert_logical_modes_decoded(&db, &slot, &rolled_back, &deleted, &messaged).await
}

#[tokio::test]
async fn migrate_diesel_async_creates_the_sqlx_schema_once_and_then_publishes() -> Result<()> {
    let diesel_db = TestDb::create("diesel_async_migrate").await?;
    let sqlx_db = TestDb::migrated("diesel_async_migrate_sqlx").await?;
    let outbox = Outbox::default();
    let table = OutboxTable::default();
    let mut conn = diesel_connection(&diesel_db).await?;

    let report = outbox.migrate_diesel_async(&mut conn).await?;
    assert_eq!(report.applied, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    assert_eq!(report.version, SCHEMA_VERSION);
    let version = outbox_core::schema_version(&mut diesel_db.connect().await?, &table).await?;
    assert_eq!(version, Some(SCHEMA_VERSION));
    let diesel_schema = schema_description(&diesel_db, "public").await?;
    assert_eq!(
        diesel_schema,
        schema_description(&sqlx_db, "public").await?,
        "the diesel-async migration created another schema than the sqlx one"
    );

    // Twice is a no-op, through either driver: both read the one history.
    let again = outbox.migrate_diesel_async(&mut conn).await?;
    assert!(again.applied.is_empty(), "{again:?}");
    assert!(
        outbox
            .migrate(&mut diesel_db.connect().await?)
            .await?
            .applied
            .is_empty()
    );
    assert_eq!(
        schema_description(&diesel_db, "public").await?,
        diesel_schema
    );

    // The migrated table takes the adapter's writes.
    let id = conn
        .transaction::<_, Error, _>(async |conn| {
            outbox
                .publish_diesel_async(
                    conn,
                    &OrderNote::Noted {
                        order: "1".into(),
                        note: "hello".into(),
                    },
                )
                .await
        })
        .await?;
    let stored: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, type FROM outbox WHERE published_at IS NULL")
            .fetch_all(&diesel_db.pool)
            .await?;
    assert_eq!(stored, vec![(id, "Noted".to_owned())]);
    Ok(())
}

/// Concurrent migrators of one fresh table in its own schema — several diesel-async connections
/// and a sqlx one — all succeed, and exactly one of them applies each step: they share the
/// advisory lock and the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_diesel_async_and_sqlx_migrations_apply_each_step_once() -> Result<()> {
    let db = TestDb::create("diesel_async_migrate_conc").await?;
    let outbox = Outbox::new(OutboxTable::new(Some("sales"), "events")?);
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(diesel_connection(&db).await?);
    }
    let mut sqlx_conn = db.connect().await?;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(connections.len() + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in connections {
        let (outbox, barrier) = (outbox.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            outbox.migrate_diesel_async(&mut conn).await
        });
    }
    let (outbox_sqlx, barrier_sqlx) = (outbox.clone(), barrier.clone());
    tasks.spawn(async move {
        barrier_sqlx.wait().await;
        outbox_sqlx.migrate(&mut sqlx_conn).await
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
    Ok(())
}
