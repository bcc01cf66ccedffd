//! Row acknowledgements beside the pipeline (`outbox_relay::source::row_marks`), against a real
//! PostgreSQL: a batch's tag comes back only once its rows are marked, tags come back in order,
//! and a failed mark is reported with none of the later tags released.

use std::time::Duration;

use anyhow::Result;
use outbox_core::{NewEvent, Outbox, OutboxTable, StoredEvent};
use outbox_relay::config::RowAcknowledgement;
use outbox_relay::failure::Report;
use outbox_relay::leader::Lease;
use outbox_relay::source::row_marks::{MAX_PENDING_ACKNOWLEDGEMENTS, RowMarks};
use outbox_tests::*;
use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;

/// Writes `n` events and returns them as the relay reads them (`seq` included).
async fn write(db: &TestDb, n: usize) -> Result<Vec<StoredEvent>> {
    let mut tx = db.pool.begin().await?;
    let events = (0..n)
        .map(|i| NewEvent::new("acct", format!("{}", i % 7), "Touched", None))
        .collect();
    Outbox::default().publish_new(&mut tx, events).await?;
    tx.commit().await?;
    let rows: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT id, seq FROM outbox WHERE published_at IS NULL ORDER BY seq")
            .fetch_all(&db.pool)
            .await?;
    Ok(rows.into_iter().map(|(id, seq)| stored(id, seq)).collect())
}

/// An event as the relay holds it; only `id` and `seq` matter to an acknowledgement.
fn stored(id: uuid::Uuid, seq: i64) -> StoredEvent {
    StoredEvent {
        seq: Some(seq),
        ..StoredEvent::new(id, "acct", "", "Touched")
    }
}

async fn marked(db: &TestDb, events: &[StoredEvent]) -> Result<i64> {
    let seqs: Vec<i64> = events.iter().filter_map(|e| e.seq).collect();
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE seq = ANY($1) AND published_at IS NOT NULL",
    )
    .bind(&seqs)
    .fetch_one(&db.pool)
    .await?)
}

fn row_marks(db: &TestDb, lease: Option<Lease>) -> Result<RowMarks<usize>> {
    let pool = PgPoolOptions::new()
        .max_connections(MAX_PENDING_ACKNOWLEDGEMENTS as u32)
        .connect_lazy(&db.url)?;
    Ok(RowMarks::new(
        pool,
        OutboxTable::default(),
        RowAcknowledgement::Mark,
        lease,
    ))
}

#[tokio::test]
async fn tags_come_back_in_order_once_their_rows_are_marked() -> Result<()> {
    let db = TestDb::migrated("row_marks").await?;
    let events = write(&db, 500).await?;
    let batches: Vec<&[StoredEvent]> = events.chunks(50).collect();
    let mut marks = row_marks(&db, None)?;
    let mut released = Vec::new();
    for (i, batch) in batches.iter().enumerate() {
        for tag in marks.submit(batch.iter(), i).await? {
            // Released: every row of that batch and of all batches before it is marked.
            let upto: Vec<StoredEvent> = batches[..=tag].concat();
            assert_eq!(marked(&db, &upto).await?, upto.len() as i64);
            released.push(tag);
        }
    }
    released.extend(marks.finish().await?);
    assert!(marks.is_empty());
    assert_eq!(released, (0..batches.len()).collect::<Vec<_>>());
    assert_eq!(marked(&db, &events).await?, events.len() as i64);
    Ok(())
}

#[tokio::test]
async fn a_failed_mark_is_reported_and_releases_nothing_after_it() -> Result<()> {
    let db = TestDb::migrated("row_marks_fail").await?;
    let events = write(&db, 20).await?;
    // The lease ran out: the mark must not run, and must say why.
    let lease = Lease::new(Duration::from_secs(10), std::time::Instant::now());
    lease.lose("test: another relay took over");
    let mut marks = row_marks(&db, Some(lease))?;
    let first = marks.submit(events[..10].iter(), 0).await;
    let outcome = match first {
        Ok(done) if done.is_empty() => marks.finish().await,
        other => other,
    };
    let err = outcome.expect_err("a mark without the lease must fail");
    let chain = Report(&err).to_string();
    assert!(chain.contains("another relay took over"), "{chain}");
    assert!(marks.is_empty());
    assert_eq!(
        marked(&db, &events).await?,
        0,
        "nothing marked without the lease"
    );

    // A database failure: the table is gone. The error names the statement's failure.
    let mut marks = row_marks(&db, None)?;
    sqlx::query("DROP TABLE outbox CASCADE")
        .execute(&db.pool)
        .await?;
    let _ = marks.submit(events[..10].iter(), 0).await;
    let _ = marks.submit(events[10..].iter(), 1).await;
    let err = marks
        .finish()
        .await
        .expect_err("marking a dropped table fails");
    let chain = Report(&err).to_string();
    assert!(chain.contains("outbox"), "{chain}");
    assert!(marks.is_empty(), "nothing keeps running after a failure");
    Ok(())
}

/// The logical source can receive a transaction before it is visible to other sessions (the
/// commit record is flushed, and decodable, before the committing session publishes its
/// visibility). An acknowledgement that arrives in that gap waits for the row instead of
/// leaving it unpublished.
#[tokio::test]
async fn a_row_committed_after_its_acknowledgement_started_is_still_marked() -> Result<()> {
    let db = TestDb::migrated("row_marks_late").await?;
    let mut tx = db.pool.begin().await?;
    let id = Outbox::default()
        .publish_new(&mut tx, vec![NewEvent::new("acct", "1", "Late", None)])
        .await?[0];
    let seq: i64 = sqlx::query_scalar("SELECT seq FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    let event = stored(id, seq);
    let url = db.url.clone();
    let marking = tokio::spawn(async move {
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        outbox_relay::source::row_marks::acknowledge_rows(
            &mut conn,
            &OutboxTable::default(),
            RowAcknowledgement::Mark,
            [&event],
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await?;
    let affected = marking.await??;
    assert_eq!(
        affected, 1,
        "the late row was marked once it became visible"
    );
    let published: bool =
        sqlx::query_scalar("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await?;
    assert!(published);
    Ok(())
}
