//! The one row decoder (`outbox_relay::table::decode_row`) against a real PostgreSQL: the polling
//! claim, the logical source's backfill page and `replay` read the typed columns in binary and
//! get exactly the event the text decoder (the one the logical stream uses) gets from the same
//! row printed as text; a table created by hand with other column types still decodes, and a row
//! that is not an event comes back malformed, not as an error.

use anyhow::{Result, ensure};
use outbox_core::{NewEvent, Outbox, OutboxTable, StoredEvent};
use outbox_relay::table::{Claim, ReplayFilter, replay_page, unpublished_page};
use outbox_tests::*;
use serde_json::json;
use sqlx::Row;

/// Every event column of `outbox`, each printed as text by PostgreSQL and decoded by the text
/// decoder, in `seq` order.
async fn decoded_as_text(db: &TestDb) -> Result<Vec<StoredEvent>> {
    let columns = [
        "id",
        "aggregatetype",
        "aggregateid",
        "type",
        "payload",
        "seq",
        "created_at",
        "tracingspancontext",
        "headers",
        "schema_version",
        "topic",
        "aggregate_seq",
    ];
    let select = columns
        .iter()
        .map(|c| format!("{c}::text"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {select} FROM outbox ORDER BY seq"
    )))
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            let values: Vec<Option<String>> = (0..columns.len())
                .map(|i| row.try_get(i))
                .collect::<Result<_, _>>()?;
            Ok(StoredEvent::from_text_columns(
                columns
                    .iter()
                    .copied()
                    .zip(values.iter().map(|v| v.as_deref())),
            )?)
        })
        .collect()
}

#[tokio::test]
async fn binary_columns_decode_to_the_event_the_text_decoder_reads() -> Result<()> {
    let db = TestDb::migrated("row_decoding").await?;
    let mut tx = db.pool.begin().await?;
    let events = vec![
        NewEvent::new(
            "acct",
            "42",
            "Opened",
            Some(json!({"owner": "ann", "n": [1, 2.5]})),
        )
        .with_header("tenant", "t1")
        .with_header("region", "eu")
        .with_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .with_schema_version(3)
        .with_topic("accounts.special")
        .with_aggregate_seq(7),
        NewEvent::new("acct", "43", "Closed", None),
    ];
    Outbox::default().publish_new(&mut tx, events).await?;
    tx.commit().await?;
    // Microseconds and an offset other than UTC in the session: the binary timestamp does not
    // depend on the session's time zone, the text one is printed in it.
    sqlx::query(
        "UPDATE outbox SET created_at = '2026-11-22 10:00:00.123456+00' WHERE aggregateid = '42'",
    )
    .execute(&db.pool)
    .await?;
    let expected = decoded_as_text(&db).await?;
    ensure!(expected.len() == 2, "{expected:?}");
    ensure!(
        expected[0].created_at.map(|t| t.to_rfc3339()).as_deref()
            == Some("2026-11-22T10:00:00.123456+00:00"),
        "{expected:?}"
    );
    ensure!(expected[0].headers.len() == 2 && expected[0].aggregate_seq == Some(7));
    ensure!(expected[1].payload.is_none() && expected[1].schema_version == 1);

    let table = OutboxTable::default();
    let mut conn = db.connect().await?;
    sqlx::query("SET TIME ZONE 'Asia/Kolkata'")
        .execute(&mut conn)
        .await?;
    let claimed: Vec<StoredEvent> = Claim::new(&table)
        .fetch(&mut conn, 1000, &[], i64::MAX, 0)
        .await?
        .into_iter()
        .collect::<Result<_, _>>()?;
    ensure!(
        claimed == expected,
        "claim {claimed:#?}\ntext {expected:#?}"
    );

    let page = unpublished_page(&mut conn, &table, 0, 1000, i64::MAX).await?;
    ensure!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>()
            == expected.iter().filter_map(|e| e.seq).collect::<Vec<_>>(),
        "{page:?}"
    );
    let paged: Vec<StoredEvent> = page
        .into_iter()
        .map(|r| r.event)
        .collect::<Result<_, _>>()?;
    ensure!(paged == expected, "page {paged:#?}");

    let replayed: Vec<StoredEvent> = replay_page(&mut conn, &table, &ReplayFilter::default(), 0)
        .await?
        .into_iter()
        .collect::<Result<_, _>>()?;
    ensure!(replayed == expected, "replay {replayed:#?}");
    Ok(())
}

#[tokio::test]
async fn a_hand_made_table_with_other_column_types_decodes_and_reports_bad_rows() -> Result<()> {
    let db = TestDb::create("row_decoding_types").await?;
    // Ids as varchar (an older Debezium table), `schema_version` as smallint, `created_at`
    // without a time zone: a type the decoder does not read, so it is absent, as the text
    // decoder leaves a timestamp without an offset.
    sqlx::query(
        "CREATE TABLE outbox (
             id varchar(64) PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
             aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb,
             seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE, created_at timestamp NOT NULL DEFAULT now(),
             tracingspancontext varchar(512), headers jsonb NOT NULL DEFAULT '{}',
             schema_version smallint NOT NULL DEFAULT 1, topic varchar(249), aggregate_seq int,
             published_at timestamptz)",
    )
    .execute(&db.pool)
    .await?;
    let good = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, schema_version, aggregate_seq)
         VALUES ($1, 'acct', '1', 'Opened', '{\"a\": 1}', 2, 5),
                ('not-a-uuid', 'acct', '2', 'Opened', '{}', 1, NULL),
                ($2, 'acct', '3', 'Opened', '{}', 0, NULL)",
    )
    .bind(good.to_string())
    .bind(uuid::Uuid::now_v7().to_string())
    .execute(&db.pool)
    .await?;

    let mut conn = db.connect().await?;
    let rows = Claim::new(&OutboxTable::default())
        .fetch(&mut conn, 1000, &[], i64::MAX, 0)
        .await?;
    ensure!(rows.len() == 3, "{rows:?}");
    let event = rows[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(event.id == good && event.aggregate_id == "1", "{event:?}");
    ensure!(event.schema_version == 2 && event.aggregate_seq == Some(5));
    ensure!(event.payload.as_deref() == Some(r#"{"a": 1}"#), "{event:?}");
    ensure!(
        event.created_at.is_none() && event.seq == Some(1),
        "{event:?}"
    );

    let bad_id = rows[1].as_ref().expect_err("an id that is not a uuid");
    ensure!(bad_id.reason.contains("not-a-uuid"), "{bad_id}");
    ensure!(bad_id.id.is_none() && bad_id.salvaged.aggregate_id == "2");
    let bad_version = rows[2].as_ref().expect_err("a schema_version below 1");
    ensure!(
        bad_version.reason.contains("schema_version 0"),
        "{bad_version}"
    );
    ensure!(bad_version.salvaged.seq == Some(3), "{bad_version:?}");
    Ok(())
}
