//! An order and its `OrderPlaced` event written in one sqlx 0.8 transaction: both commit, or
//! neither does.
//!
//! ```text
//! scripts/services.sh up && . .services/env
//! cargo run -p outbox-example-sqlx-08
//! ```
//!
//! The service's sqlx is 0.8 (renamed `sqlx08` here only because this workspace also builds
//! sqlx 0.9; a service names it `sqlx` and enables `outbox-core`'s `sqlx-08` feature). The
//! example creates (or upgrades) the outbox table itself with [`Outbox::migrate_sqlx08`] — the
//! same migration, lock and history as `outbox-relay migrate` and the sqlx 0.9 path, so whichever
//! runs first does the work.

use anyhow::{Context, Result};
use outbox_core::{Outbox, OutboxEvent};
use sqlx08::PgPool;
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
    let pool = PgPool::connect(&url)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx08::query(
        "CREATE TABLE IF NOT EXISTS orders (
             id uuid PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL)",
    )
    .execute(&pool)
    .await?;

    let outbox = Outbox::default();
    // At start-up, from every instance: concurrent calls apply each step once, later ones nothing.
    let migrated = outbox
        .migrate_sqlx08(&mut *pool.acquire().await?)
        .await
        .context("creating the outbox table")?;
    println!(
        "outbox table at schema version {} (applied now: {:?})",
        migrated.version, migrated.applied
    );
    let (order_id, sku, quantity) = (Uuid::now_v7(), "BOOK-42".to_owned(), 2);

    let mut tx = pool.begin().await?;
    sqlx08::query("INSERT INTO orders (id, sku, quantity) VALUES ($1, $2, $3)")
        .bind(order_id)
        .bind(&sku)
        .bind(quantity)
        .execute(&mut *tx)
        .await?;
    let placed = OrderEvent::OrderPlaced {
        order_id,
        sku,
        quantity,
    };
    let event_id = outbox
        .publish_sqlx08(&mut tx, &placed)
        .await
        .context("writing the event")?;
    tx.commit().await?; // the order and its event, or neither

    println!(
        "order {order_id} committed with event {event_id}; the relay publishes it to outbox.event.order"
    );
    Ok(())
}
