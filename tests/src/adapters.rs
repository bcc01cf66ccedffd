//! What every database-layer adapter test checks the same way: the events of one order written
//! through the adapter and through sqlx, the stored rows compared column by column, the migrated
//! schema described as one value, and the logical write modes read back through a
//! `test_decoding` slot.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use outbox_core::{NewEvent, Outbox, StoredEvent};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Consumed, RelayProcess, TestDb, consume, unique, wait_drained};

/// The trace context the first event of [`order_events`] carries.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The events of one order: one written alone (keyed, with a header, a trace context, a schema
/// version and a sequence) and three written as a batch (one without a payload). Every field but
/// the id is the same whichever path writes them.
pub fn order_events(aggregate_type: &str, order: &str) -> (NewEvent, Vec<NewEvent>) {
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

/// Every column of the stored rows of `ids`, in write order, but those that differ by design
/// between two writes of the same event (`id`, `seq`, `created_at`).
pub async fn stored_rows(db: &TestDb, ids: &[Uuid]) -> Result<Vec<Value>> {
    let rows: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(o) - 'id' - 'seq' - 'created_at' FROM outbox o
         WHERE id = ANY($1) ORDER BY seq",
    )
    .bind(ids)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows)
}

/// Whether the business row of `order` (table `orders`) was committed.
pub async fn order_exists(db: &TestDb, order: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM orders WHERE id = $1)")
            .bind(order)
            .fetch_one(&db.pool)
            .await?,
    )
}

/// A record's headers without those that differ by design between two writes of one event: the
/// event id (`id`, `ce_id`) and the write time (`ce_time`).
pub fn headers_but_identity(record: &Consumed) -> BTreeMap<String, String> {
    let mut headers = record.headers.clone();
    for name in ["id", "ce_id", "ce_time"] {
        headers.remove(name);
    }
    headers
}

/// Everything the outbox migrations create in `schema`, as one JSON value: the columns (types,
/// defaults, nullability, identity) of every table, the index and constraint definitions, the
/// triggers, the functions' definitions and the migration history (without its times).
pub async fn schema_description(db: &TestDb, schema: &str) -> Result<Value> {
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

/// The two events each logical-mode write of the adapter tests writes: one with a payload, one
/// without a payload but with a header.
pub fn logical_mode_events(event_type: &str) -> Vec<NewEvent> {
    vec![
        NewEvent::new("order", "1", event_type, Some(json!({ "n": 1 }))),
        NewEvent::new("order", "1", event_type, None).with_header("tenant", "acme"),
    ]
}

/// A `test_decoding` slot on `db`: it shows exactly what reaches the WAL (committed transactions
/// only). Read and dropped by [`assert_logical_modes_decoded`].
pub async fn test_decoding_slot(db: &TestDb, prefix: &str) -> Result<String> {
    let slot = unique(prefix);
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding')")
        .bind(&slot)
        .execute(&db.pool)
        .await?;
    Ok(slot)
}

/// Checks what an adapter's logical-mode writes left in the WAL since `slot` was created, then
/// drops the slot: no outbox row at all; nothing of the rolled-back transaction; the
/// `insert_delete` events (`ViaInsertDelete`) inserted and deleted; the `logical_message` events
/// (`ViaMessage`, from [`logical_mode_events`]) as transactional messages carrying the whole
/// envelope, in write order.
pub async fn assert_logical_modes_decoded(
    db: &TestDb,
    slot: &str,
    rolled_back: &[Uuid],
    deleted: &[Uuid],
    messaged: &[Uuid],
) -> Result<()> {
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 0, "neither logical mode leaves a row");
    let changes: Vec<String> =
        sqlx::query_scalar("SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)")
            .bind(slot)
            .fetch_all(&db.pool)
            .await?;
    let all = changes.join("\n");
    for id in rolled_back {
        assert!(
            !all.contains(&id.to_string()),
            "rolled back {id} decoded:\n{all}"
        );
    }
    for id in deleted {
        assert!(
            all.contains(&format!("id[uuid]:'{id}'")),
            "{id} not inserted:\n{all}"
        );
    }
    assert_eq!(
        all.matches("table public.outbox: DELETE").count(),
        deleted.len(),
        "{all}"
    );
    let messages: Vec<StoredEvent> = changes
        .iter()
        .filter(|c| c.contains("prefix: outbox") && c.contains("transactional: 1"))
        .map(|c| {
            let content = c.split_once("content:").expect("message content").1.trim();
            StoredEvent::from_logical_message(content.as_bytes())
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
        .bind(slot)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Writes the events of `order` ([`order_events`]) through the sqlx path, the reference every
/// adapter is compared with, in one committed transaction; returns their ids in write order.
pub async fn write_order_with_sqlx(
    db: &TestDb,
    outbox: &Outbox,
    aggregate_type: &str,
    order: &str,
) -> Result<Vec<Uuid>> {
    let (placed, batch) = order_events(aggregate_type, order);
    let mut tx = db.pool.begin().await?;
    let mut ids = outbox.publish_new(&mut tx, vec![placed]).await?;
    ids.extend(outbox.publish_new(&mut tx, batch).await?);
    tx.commit().await?;
    Ok(ids)
}

/// Checks that the rows `adapter` wrote for the events of [`order_events`] (`adapter_ids`) are
/// exactly those the sqlx path wrote for the same events (`sqlx_ids`), column by column, and
/// carry what the events set.
pub async fn assert_stored_like_sqlx(
    db: &TestDb,
    adapter: &str,
    adapter_ids: &[Uuid],
    sqlx_ids: &[Uuid],
) -> Result<()> {
    let adapter_rows = stored_rows(db, adapter_ids).await?;
    let sqlx_rows = stored_rows(db, sqlx_ids).await?;
    assert_eq!(adapter_rows.len(), 4, "{adapter_rows:#?}");
    assert_eq!(
        adapter_rows, sqlx_rows,
        "the {adapter} adapter stored other rows than sqlx"
    );
    assert_eq!(adapter_rows[0]["tracingspancontext"], TRACEPARENT);
    assert_eq!(adapter_rows[0]["headers"]["tenant"], "acme");
    assert_eq!(adapter_rows[0]["schema_version"], 2);
    assert_eq!(adapter_rows[0]["aggregate_seq"], 1);
    assert_eq!(adapter_rows[2]["payload"], Value::Null);
    assert_eq!(adapter_rows[3]["payload"]["parcels"], json!([1, 2]));
    Ok(())
}

/// Runs the real relay process on `db` until the outbox is drained and checks what reached
/// `topic`: exactly `expected` records (the committed events of the test); none of `rolled_back`;
/// every event of `adapter_ids` (the events of [`order_events`] for `order`, written by the
/// adapter) relayed with the key, value and headers of its sqlx twin in `sqlx_ids`.
pub async fn assert_relayed_like_sqlx(
    db: &TestDb,
    topic: &str,
    expected: usize,
    rolled_back: &[Uuid],
    adapter_ids: &[Uuid],
    sqlx_ids: &[Uuid],
    order: &str,
) -> Result<()> {
    const QUIET: Duration = Duration::from_millis(1500);
    const LONG: Duration = Duration::from_secs(60);
    let relay = RelayProcess::start(db, &[], &[]).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    wait_drained(&db.pool, LONG).await?;
    let records = consume(&[topic], expected, QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let by_id: BTreeMap<Uuid, &Consumed> = records.iter().map(|r| (r.event_id(), r)).collect();
    assert_eq!(
        records.len(),
        expected,
        "one record per committed event: {records:#?}"
    );
    for id in rolled_back {
        assert!(
            !by_id.contains_key(id),
            "an event of the rolled-back transaction was relayed"
        );
    }
    for (adapter_id, sqlx_id) in adapter_ids.iter().zip(sqlx_ids) {
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
    assert_eq!(by_id[&adapter_ids[1]].key.as_deref(), Some(order));
    Ok(())
}

/// Checks that the migration `migrated` ran on a fresh `db` created the same schema as the sqlx
/// migration on `reference` (every step applied, recorded in the shared history).
pub async fn assert_migrated_like_sqlx(
    db: &TestDb,
    reference: &TestDb,
    migrated: &outbox_core::MigrationReport,
) -> Result<()> {
    let all: Vec<i32> = (1..=outbox_core::SCHEMA_VERSION).collect();
    assert_eq!(migrated.applied, all);
    assert_eq!(migrated.version, outbox_core::SCHEMA_VERSION);
    let table = outbox_core::OutboxTable::default();
    let version = outbox_core::schema_version(&mut db.connect().await?, &table).await?;
    assert_eq!(version, Some(outbox_core::SCHEMA_VERSION));
    assert_eq!(
        schema_description(db, "public").await?,
        schema_description(reference, "public").await?,
        "the adapter's migration created another schema than the sqlx one"
    );
    Ok(())
}
