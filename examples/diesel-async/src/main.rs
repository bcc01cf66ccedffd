//! An order and its `OrderPlaced` event written in one diesel-async transaction: both commit, or
//! neither does.
//!
//! ```text
//! scripts/services.sh up && . .services/env
//! cargo run -p outbox-example-diesel-async
//! ```
//!
//! The example creates (or upgrades) the outbox table itself with
//! [`Outbox::migrate_diesel_async`] — the same migration, lock and history as
//! `outbox-relay migrate` and the sqlx path, so whichever runs first does the work.
//!
//! With diesel-async's pools (deadpool, bb8, mobc) the code is the same: a pooled connection
//! derefs to the `AsyncPgConnection` that [`Outbox::publish_diesel_async`] takes, inside the
//! transaction opened on it.

use anyhow::{Context, Result};
use diesel::sql_types::{Integer, Text, Uuid as PgUuid};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use outbox_core::{Outbox, OutboxEvent};
use uuid::Uuid;

/// The events of an order; `order_id` is the aggregate id (and so the Kafka key).
#[derive(Debug, OutboxEvent)]
#[outbox(aggregate_type = "order", aggregate_id = "order_id")]
enum OrderEvent {
    /// An order was placed.
    OrderPlaced {
        order_id: Uuid,
        sku: String,
        quantity: i32,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::var("DATABASE_URL")
        .context("set DATABASE_URL (scripts/services.sh up && . .services/env)")?;
    let mut conn = AsyncPgConnection::establish(&url)
        .await
        .context("connecting to PostgreSQL")?;
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS orders (
             id uuid PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL)",
    )
    .await?;

    let outbox = Outbox::default();
    // At start-up, from every instance: concurrent calls apply each step once, later ones nothing.
    let migrated = outbox
        .migrate_diesel_async(&mut conn)
        .await
        .context("creating the outbox table")?;
    println!(
        "outbox table at schema version {} (applied now: {:?})",
        migrated.version, migrated.applied
    );
    let (order_id, sku, quantity) = (Uuid::now_v7(), "BOOK-42".to_owned(), 2);

    let event_id = conn
        .transaction::<_, anyhow::Error, _>(async |conn| {
            diesel::sql_query("INSERT INTO orders (id, sku, quantity) VALUES ($1, $2, $3)")
                .bind::<PgUuid, _>(order_id)
                .bind::<Text, _>(&sku)
                .bind::<Integer, _>(quantity)
                .execute(conn)
                .await?;
            let placed = OrderEvent::OrderPlaced {
                order_id,
                sku: sku.clone(),
                quantity,
            };
            let event_id = outbox
                .publish_diesel_async(conn, &placed)
                .await
                .context("writing the event")?;
            Ok(event_id)
        })
        .await?; // the order and its event, or neither

    println!(
        "order {order_id} committed with event {event_id}; the relay publishes it to outbox.event.order"
    );
    Ok(())
}
