//! The park store (`outbox_relay::park::ParkStore`) against a real PostgreSQL: it parks through
//! the leader lock's session, reports the aggregates parked events hold, refuses loudly when the
//! parked-events table was never migrated, and stops working once the leadership is dropped —
//! without keeping the lock alive.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Result, ensure};
use outbox_core::{OutboxTable, StoredEvent};
use outbox_relay::leader::Leadership;
use outbox_relay::park::{ParkError, ParkRequest, ParkStore};
use outbox_tests::*;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn lead(db: &TestDb) -> Result<Leadership> {
    let options = PgConnectOptions::from_str(&db.url)?;
    Leadership::acquire(
        &options,
        &OutboxTable::default(),
        Duration::from_millis(50),
        Duration::from_secs(10),
        &CancellationToken::new(),
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("no leadership"))
}

fn request(aggregate_id: &str, blocked_by: Option<Uuid>) -> ParkRequest {
    ParkRequest {
        event: StoredEvent {
            payload: Some("{\"n\": 1}".into()),
            seq: Some(1),
            ..StoredEvent::new(Uuid::now_v7(), "acct", aggregate_id, "Touched")
        },
        reason: "too large".into(),
        blocked_by,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parks_through_the_leader_session_and_reports_held_aggregates() -> Result<()> {
    let db = TestDb::migrated("park_store").await?;
    let leader = lead(&db).await?;
    let mut store = ParkStore::new(OutboxTable::default(), leader.session());
    ensure!(store.blocked_aggregates().await?.is_empty());

    let poison = request("1", None);
    let held = request("1", Some(poison.event.id));
    let other = request("2", None);
    store
        .park(&[poison.clone(), held.clone(), other.clone()])
        .await?;
    let blocked = store.blocked_aggregates().await?;
    ensure!(blocked.len() == 2, "{blocked:?}");
    ensure!(blocked[&("acct".into(), "1".into())] == poison.event.id);
    ensure!(blocked[&("acct".into(), "2".into())] == other.event.id);
    // Parking again is idempotent.
    store.park(std::slice::from_ref(&poison)).await?;
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_parked")
        .fetch_one(&db.pool)
        .await?;
    ensure!(parked == 3, "{parked}");

    // Once the leadership is dropped, nothing more is written through the store, and the store
    // does not keep the session (and with it the lock) alive: another relay takes over.
    drop(leader);
    let err = store.park(&[request("3", None)]).await.unwrap_err();
    ensure!(matches!(err, ParkError::LeadershipEnded(_)), "{err}");
    let err = store.blocked_aggregates().await.unwrap_err();
    ensure!(matches!(err, ParkError::LeadershipEnded(_)), "{err}");
    let next = tokio::time::timeout(Duration::from_secs(10), lead(&db)).await??;
    drop(next);
    drop(store);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_without_the_parked_table_names_the_migration() -> Result<()> {
    let db = TestDb::create("park_store_none").await?;
    let leader = lead(&db).await?;
    let mut store = ParkStore::new(OutboxTable::default(), leader.session());
    ensure!(store.blocked_aggregates().await?.is_empty());
    let err = store.park(&[request("1", None)]).await.unwrap_err();
    ensure!(!err.kind().restarts_source(), "{err}");
    let message = err.to_string();
    ensure!(
        message.contains("does not exist") && message.contains("outbox-relay migrate"),
        "{message}"
    );
    // Parking nothing needs no table.
    store.park(&[]).await?;
    Ok(())
}
