//! The write side against a real PostgreSQL: events commit and roll back with the business
//! transaction, batches keep their order, guards refuse bad events before anything is written,
//! migrations upgrade a Debezium table in place, and the three write modes write what the relay
//! expects.

use anyhow::Result;
use outbox_core::{Error, NewEvent, Outbox, OutboxTable, WriteMode};
use outbox_tests::*;
use uuid::Uuid;

async fn count(db: &TestDb) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?)
}

#[tokio::test]
async fn events_commit_and_roll_back_with_the_transaction() -> Result<()> {
    let db = TestDb::migrated("write_tx").await?;
    let outbox = Outbox::default();
    let mut tx = db.pool.begin().await?;
    let id = outbox
        .publish_new(&mut tx, vec![NewEvent::new("a", "1", "Gone", None)])
        .await?[0];
    tx.rollback().await?;
    assert_eq!(count(&db).await?, 0);

    let mut tx = db.pool.begin().await?;
    let ids = outbox
        .publish_new(&mut tx, vec![NewEvent::new("a", "1", "Kept", None)])
        .await?;
    tx.commit().await?;
    assert_eq!(count(&db).await?, 1);
    assert_ne!(ids[0], id);
    assert_eq!(
        ids[0].get_version_num(),
        7,
        "event ids are time-ordered UUIDv7"
    );
    Ok(())
}

#[tokio::test]
async fn a_batch_keeps_its_order_and_every_envelope_field() -> Result<()> {
    let db = TestDb::migrated("write_batch").await?;
    let outbox = Outbox::default();
    let fixed = Uuid::new_v4();
    let events: Vec<NewEvent> = (0..50)
        .map(|i| {
            NewEvent::new(
                "acct",
                "7",
                format!("E{i}"),
                Some(serde_json::json!({ "i": i })),
            )
        })
        .chain([NewEvent::new("acct", "7", "Last", None)
            .with_id(fixed)
            .with_header("tenant", "t1")
            .with_schema_version(3)
            .with_topic("custom.topic")
            .with_aggregate_seq(99)
            .with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")])
        .collect();
    let mut tx = db.pool.begin().await?;
    let ids = outbox.publish_new(&mut tx, events).await?;
    tx.commit().await?;
    assert_eq!(ids.len(), 51);
    assert_eq!(ids[50], fixed);
    let in_seq_order: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY seq")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(in_seq_order, ids, "seq order is the caller's order");
    let row: (
        serde_json::Value,
        i32,
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<serde_json::Value>,
    ) = sqlx::query_as(
        "SELECT headers, schema_version, topic, aggregate_seq, tracingspancontext, payload
             FROM outbox WHERE id = $1",
    )
    .bind(fixed)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(row.0, serde_json::json!({ "tenant": "t1" }));
    assert_eq!(
        (row.1, row.2.as_deref(), row.3),
        (3, Some("custom.topic"), Some(99))
    );
    assert!(row.4.unwrap().starts_with("00-4bf92f"));
    assert_eq!(row.5, None, "a None payload is SQL NULL");
    Ok(())
}

/// A write on a connection in autocommit — never in a transaction, after one committed, or in
/// one opened by a raw `BEGIN` that sqlx does not know of — is refused through every sqlx call
/// and leaves no row; the same calls in a sqlx transaction (and in a savepoint within it) write.
#[tokio::test]
async fn a_sqlx_write_outside_a_transaction_is_refused_and_writes_nothing() -> Result<()> {
    use sqlx::Connection;
    let db = TestDb::migrated("write_autocommit").await?;
    let outbox = Outbox::default();
    let event = || NewEvent::new("a", "1", "Alone", None);
    let assert_refused = |outcome: outbox_core::Result<Vec<Uuid>>| match outcome {
        Err(Error::NotInTransaction) => {}
        other => panic!("expected NotInTransaction, got {other:?}"),
    };

    let mut conn = db.pool.acquire().await?;
    assert_refused(outbox.publish_new(&mut conn, vec![event()]).await);
    assert_refused(outbox.publish_new(&mut conn, vec![event(), event()]).await);
    let mut tx = conn.begin().await?;
    outbox.publish_new(&mut tx, vec![event()]).await?;
    {
        let mut savepoint = tx.begin().await?;
        outbox.publish_new(&mut savepoint, vec![event()]).await?;
        savepoint.commit().await?;
    }
    tx.commit().await?;
    assert_refused(outbox.publish_new(&mut conn, vec![event()]).await);
    assert_eq!(
        count(&db).await?,
        2,
        "only the two writes in a transaction left rows"
    );

    // A transaction sqlx did not open is not recognised: refused, not silently assumed.
    sqlx::query("BEGIN").execute(&mut *conn).await?;
    assert_refused(outbox.publish_new(&mut conn, vec![event()]).await);
    sqlx::query("ROLLBACK").execute(&mut *conn).await?;
    assert_eq!(count(&db).await?, 2);
    let message = Error::NotInTransaction.to_string();
    assert!(message.contains("not inside a transaction"), "{message}");
    Ok(())
}

#[tokio::test]
async fn guards_refuse_bad_events_before_writing_anything() -> Result<()> {
    let db = TestDb::migrated("write_guard").await?;
    let outbox = Outbox::default().with_max_payload_bytes(100);
    let mut tx = db.pool.begin().await?;
    let big = NewEvent::new(
        "a",
        "1",
        "Big",
        Some(serde_json::json!({ "x": "y".repeat(200) })),
    );
    match outbox
        .publish_new(&mut tx, vec![NewEvent::new("a", "1", "Ok", None), big])
        .await
    {
        Err(Error::PayloadTooLarge {
            size, limit: 100, ..
        }) => assert!(size > 200),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    for (bad, needle) in [
        (NewEvent::new("a", "", "T", None), "aggregate id is empty"),
        (
            NewEvent::new("a", "1", "T", None).with_traceparent("nope"),
            "not a W3C traceparent",
        ),
        (
            NewEvent::new("a", "1", "T", None).with_topic("a/b"),
            "topic `a/b`",
        ),
        (
            NewEvent::new("a", "1", "T", None).with_schema_version(0),
            "schema version",
        ),
    ] {
        let e = outbox.publish_new(&mut tx, vec![bad]).await.unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    // The transaction is still usable: guards fail before any SQL.
    outbox
        .publish_new(&mut tx, vec![NewEvent::new("a", "1", "Fine", None)])
        .await?;
    tx.commit().await?;
    assert_eq!(count(&db).await?, 1);

    // A duplicate event id fails the insert (and so the caller's transaction).
    let id = Uuid::new_v4();
    let mut tx = db.pool.begin().await?;
    outbox
        .publish_new(
            &mut tx,
            vec![NewEvent::new("a", "1", "A", None).with_id(id)],
        )
        .await?;
    tx.commit().await?;
    let mut tx = db.pool.begin().await?;
    let e = outbox
        .publish_new(
            &mut tx,
            vec![NewEvent::new("a", "1", "A", None).with_id(id)],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Database(_)), "{e}");
    Ok(())
}

#[tokio::test]
async fn migrate_upgrades_an_existing_debezium_table_in_place_and_runs_once_under_concurrency()
-> Result<()> {
    let db = TestDb::create("write_migrate").await?;
    sqlx::query(
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
         aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)",
    )
    .execute(&db.pool)
    .await?;
    let old = Uuid::new_v4();
    sqlx::query("INSERT INTO outbox VALUES ($1, 'order', '1', 'Created', '{}')")
        .bind(old)
        .execute(&db.pool)
        .await?;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await?;
            outbox_core::migrate(&mut conn, &OutboxTable::default()).await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await??.applied.len();
    }
    assert_eq!(
        applied,
        outbox_core::SCHEMA_VERSION as usize,
        "each version is applied by exactly one caller"
    );
    let (seq, headers, published): (
        Option<i64>,
        serde_json::Value,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = sqlx::query_as("SELECT seq, headers, published_at FROM outbox WHERE id = $1")
        .bind(old)
        .fetch_one(&db.pool)
        .await?;
    assert!(seq.is_some(), "existing rows get a seq");
    assert_eq!(headers, serde_json::json!({}));
    assert_eq!(published, None, "existing rows are still due");

    // A table migrated by a newer library is refused, not touched.
    sqlx::query("INSERT INTO _outbox_migrations (table_name, version, description) VALUES ('outbox', 99, 'future')")
        .execute(&db.pool)
        .await?;
    let e = outbox_core::migrate(&mut *db.pool.acquire().await?, &OutboxTable::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::SchemaTooNew { found: 99, .. }), "{e}");
    Ok(())
}

/// Sends one marker notification and collects the empty-payload wake-ups received before it.
/// Notifications arrive in commit order, so this counts exactly the wake-ups of the transactions
/// that committed before the marker.
async fn wake_ups_before_marker(
    db: &TestDb,
    listener: &mut sqlx::postgres::PgListener,
    channel: &str,
) -> Result<usize> {
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(channel)
        .execute(&db.pool)
        .await?;
    let mut wake_ups = 0;
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv()).await??;
        match n.payload() {
            "marker" => return Ok(wake_ups),
            "" => wake_ups += 1,
            other => anyhow::bail!("unexpected notification payload {other:?}"),
        }
    }
}

/// Writes one event of type `event_type` (aggregate `a`/`1`) in `tx` and commits it.
async fn commit_one_event(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    outbox: &Outbox,
    event_type: &str,
) -> Result<()> {
    outbox
        .publish_new(&mut tx, vec![NewEvent::new("a", "1", event_type, None)])
        .await?;
    tx.commit().await?;
    Ok(())
}

#[tokio::test]
async fn no_wake_up_by_default_and_the_optional_trigger_notifies_unless_outbox_notify_is_off()
-> Result<()> {
    let db = TestDb::migrated("write_notify").await?;
    let table = OutboxTable::default();
    let channel = table
        .resolve(&mut db.connect().await?)
        .await?
        .notify_channel();
    assert_eq!(channel, "outbox_public_outbox");
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await?;
    listener.listen(&channel).await?;
    let outbox = Outbox::default();

    // Default: writers send nothing, so their commits stay parallel.
    for _ in 0..2 {
        commit_one_event(db.pool.begin().await?, &outbox, "Quiet").await?;
    }
    assert_eq!(
        wake_ups_before_marker(&db, &mut listener, &channel).await?,
        0
    );

    // The optional trigger: every committed outbox write wakes the relay. Installing it twice
    // is harmless.
    for _ in 0..2 {
        sqlx::query(sqlx::AssertSqlSafe(outbox_core::notify_trigger_sql(&table)))
            .execute(&db.pool)
            .await?;
    }
    for _ in 0..2 {
        commit_one_event(db.pool.begin().await?, &outbox, "On").await?;
    }
    assert_eq!(
        wake_ups_before_marker(&db, &mut listener, &channel).await?,
        2
    );

    // Switched off per transaction.
    let mut tx = db.pool.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL {} = off",
        outbox_core::NOTIFY_SETTING
    )))
    .execute(&mut *tx)
    .await?;
    commit_one_event(tx, &outbox, "Off").await?;
    assert_eq!(
        wake_ups_before_marker(&db, &mut listener, &channel).await?,
        0
    );

    // Per database: new sessions inherit the setting.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" SET {} = off",
        db.name,
        outbox_core::NOTIFY_SETTING
    )))
    .execute(&db.pool)
    .await?;
    let mut conn = db.connect().await?;
    commit_one_event(sqlx::Connection::begin(&mut conn).await?, &outbox, "OffDb").await?;
    assert_eq!(
        wake_ups_before_marker(&db, &mut listener, &channel).await?,
        0
    );
    assert_eq!(count(&db).await?, 6, "the events are written either way");
    Ok(())
}

/// The notify triggers on the default outbox table.
async fn notify_triggers(db: &TestDb) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal",
    )
    .fetch_all(&db.pool)
    .await?)
}

#[tokio::test]
async fn migrating_a_version_5_table_drops_its_wake_up_trigger_and_keeps_pending_rows() -> Result<()>
{
    let db = TestDb::migrated("write_migrate_v6").await?;
    // A table as version 5 left it: the statement trigger on every insert, and a pending row.
    sqlx::query("DELETE FROM _outbox_migrations WHERE table_name = 'outbox' AND version = 6")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "CREATE TRIGGER outbox_notify_trg AFTER INSERT ON outbox
         FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()",
    )
    .execute(&db.pool)
    .await?;
    let mut tx = db.pool.begin().await?;
    let pending = Outbox::default()
        .publish_new(&mut tx, vec![NewEvent::new("a", "1", "Pending", None)])
        .await?[0];
    tx.commit().await?;
    assert_eq!(notify_triggers(&db).await?, ["outbox_notify_trg"]);

    let report =
        outbox_core::migrate(&mut *db.pool.acquire().await?, &OutboxTable::default()).await?;
    assert_eq!(report.applied, [6]);
    assert!(
        notify_triggers(&db).await?.is_empty(),
        "the upgrade drops the per-statement trigger"
    );
    let published: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT published_at FROM outbox WHERE id = $1")
            .bind(pending)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(published, None, "the pending row is still due");
    // The function stays, so the optional trigger can be put back.
    sqlx::query(sqlx::AssertSqlSafe(outbox_core::notify_trigger_sql(
        &OutboxTable::default(),
    )))
    .execute(&db.pool)
    .await?;
    assert_eq!(notify_triggers(&db).await?, ["outbox_notify_trg"]);
    Ok(())
}

#[tokio::test]
async fn write_modes_write_what_the_logical_relay_reads() -> Result<()> {
    let db = TestDb::migrated("write_modes").await?;
    // A test_decoding slot shows exactly what reaches the WAL.
    let slot = unique("wm");
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding')")
        .bind(&slot)
        .execute(&db.pool)
        .await?;

    let mut tx = db.pool.begin().await?;
    let id_del = Outbox::default()
        .with_write_mode(WriteMode::InsertDelete)
        .publish_new(
            &mut tx,
            vec![NewEvent::new("a", "1", "ViaInsertDelete", None)],
        )
        .await?[0];
    tx.commit().await?;
    assert_eq!(count(&db).await?, 0, "insert_delete leaves the table empty");

    let mut tx = db.pool.begin().await?;
    let id_msg = Outbox::default()
        .with_write_mode(WriteMode::LogicalMessage)
        .with_message_prefix("outbox")?
        .publish_new(
            &mut tx,
            vec![NewEvent::new(
                "a",
                "1",
                "ViaMessage",
                Some(serde_json::json!({"k": [1, 2]})),
            )],
        )
        .await?[0];
    tx.commit().await?;
    assert_eq!(count(&db).await?, 0, "logical_message writes no row");

    let changes: Vec<String> =
        sqlx::query_scalar("SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)")
            .bind(&slot)
            .fetch_all(&db.pool)
            .await?;
    let all = changes.join("\n");
    assert!(
        all.contains(&format!("id[uuid]:'{id_del}'")),
        "the insert is in the WAL:\n{all}"
    );
    assert!(all.contains("table public.outbox: DELETE"), "{all}");
    let message = changes
        .iter()
        .find(|c| c.contains("prefix: outbox"))
        .unwrap_or_else(|| panic!("no logical message in:\n{all}"));
    assert!(message.contains("transactional: 1"), "{message}");
    assert!(message.contains(&id_msg.to_string()), "{message}");
    let content = message.split_once("content:").unwrap().1.trim();
    let ev = outbox_core::StoredEvent::from_logical_message(content.as_bytes())?;
    assert_eq!(ev.id, id_msg);
    assert_eq!(ev.event_type, "ViaMessage");
    assert_eq!(ev.payload.as_deref(), Some(r#"{"k": [1, 2]}"#));
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db.pool)
        .await?;
    Ok(())
}
