//! The relay's pipeline under faults of its own making: what happens to the in-flight window when
//! the source fails, when the relay is asked to stop under load, and when the broker refuses
//! records (librdkafka's mock cluster injects the broker faults; PostgreSQL is real).

use std::time::Duration;

use anyhow::Result;
use outbox_core::{NewEvent, Outbox};
use outbox_tests::*;

const QUIET: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(60);

/// Publishes one event per transaction and records it in the ledger.
async fn publish(db: &TestDb, ledger: &mut Ledger, event: NewEvent) -> Result<uuid::Uuid> {
    let mut tx = db.pool.begin().await?;
    let ids = Outbox::default().publish_new(&mut tx, vec![event]).await?;
    tx.commit().await?;
    ledger.committed.extend(ids.iter().copied());
    Ok(ids[0])
}

/// Waits until the sequence `name` has been advanced at least `n` times.
async fn wait_sequence(db: &TestDb, name: &str, n: i64) -> Result<()> {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let (value, called): (i64, bool) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT last_value, is_called FROM {name}"
        )))
        .fetch_one(&db.pool)
        .await?;
        if called && value >= n {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the sequence {name} reached only {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Item 13 of issue 11: a retryable source error ends the pump while later batches of the window
/// are still queued in the producer. The relay gives up its source (and its leader lock) and
/// resumes from the durable position; the abandoned copies must not be delivered as well.
///
/// The window is held in the producer by a broker that is down; the source error is a failing
/// park statement (a trigger refuses inserts into the park table) for a poison event that heads
/// the window, so each retry round re-claims the same events, deterministically.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_error_drops_the_producers_window_before_the_relay_resumes() -> Result<()> {
    use rdkafka::mocking::MockCluster;
    let db = TestDb::create("pipe_fence").await?;
    db.migrate().await?;
    let mock = MockCluster::new(1)?;
    let topic = unique("fence");
    mock.create_topic(&topic, 1, 1)?;
    let mut config = relay_config(&db);
    config.kafka.bootstrap_servers = mock.bootstrap_servers();
    config.kafka.delivery_timeout = Duration::from_secs(120);
    config
        .kafka
        .properties
        .insert("message.max.bytes".into(), "10000".into());
    config.route.topic = topic.clone();
    config.batch_size = 1;
    config.max_in_flight_batches = 4;
    let relay = InProcessRelay::start(config)?;

    let mut ledger = Ledger::default();
    publish(&db, &mut ledger, NewEvent::new("acct", "warm", "E", None)).await?;
    wait_drained(&db.pool, LONG).await?;

    let parked = outbox_core::OutboxTable::default().parked_qualified();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SEQUENCE park_refusals;
         CREATE FUNCTION refuse_park() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM nextval('park_refusals'); RAISE EXCEPTION 'park refused by the test'; END $$;
         CREATE TRIGGER refuse_park BEFORE INSERT ON {parked}
           FOR EACH STATEMENT EXECUTE FUNCTION refuse_park();"
    )))
    .execute(&db.pool)
    .await?;
    mock.broker_down(1)?;
    // A poison event (larger than `message.max.bytes`: refused when it is enqueued, parked,
    // never sent), then healthy events of other aggregates: with one event per batch they are produced (and held by the dead broker)
    // while the poison's park fails.
    let mut poison_ledger = Ledger::default();
    publish(
        &db,
        &mut poison_ledger,
        NewEvent::new(
            "acct",
            "poison",
            "E",
            Some(serde_json::json!({ "blob": "x".repeat(20_000) })),
        ),
    )
    .await?;
    for i in 0..3 {
        publish(
            &db,
            &mut ledger,
            NewEvent::new("acct", format!("a{i}"), "E", None),
        )
        .await?;
    }
    // Three rounds: claim, produce the healthy events, fail to park, back off, claim again.
    wait_sequence(&db, "park_refusals", 3).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TRIGGER refuse_park ON {parked}"
    )))
    .execute(&db.pool)
    .await?;
    mock.broker_up(1)?;
    wait_drained(&db.pool, LONG).await?;
    let records = consume_from(
        &mock.bootstrap_servers(),
        &[&topic],
        ledger.committed.len(),
        QUIET,
        LONG,
    )
    .await?;
    relay.stop().await?;
    let v = Verdict::check(&ledger, &records);
    assert_eq!((v.lost, v.phantom, v.inversions), (0, 0, 0), "{v:?}");
    assert_eq!(
        v.duplicates, 0,
        "copies of an abandoned window were delivered after the relay resumed: {v:?}"
    );
    Ok(())
}
