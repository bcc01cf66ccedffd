//! An order and its `OrderPlaced` event written in one sea-orm transaction: both commit, or
//! neither does.
//!
//! ```text
//! scripts/services.sh up && . .services/env
//! cargo run -p outbox-example-sea-orm
//! ```
//!
//! The example creates (or upgrades) the outbox table itself with [`Outbox::migrate_sea_orm`] —
//! the same migration, lock and history as `outbox-relay migrate` and the sqlx path, so whichever
//! runs first does the work; it stays out of the service's own `sea-orm-migration` history.
//!
//! The business write here is a raw statement to keep the example free of entity definitions;
//! an `ActiveModel::insert(&tx)` on the same [`sea_orm::DatabaseTransaction`] is the same thing.

use anyhow::{Context, Result};
use outbox_core::{Outbox, OutboxEvent};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement, TransactionTrait};
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
    let db = Database::connect(&url)
        .await
        .context("connecting to PostgreSQL")?;
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS orders (
             id uuid PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL)",
    )
    .await?;

    let outbox = Outbox::default();
    // At start-up, from every instance: concurrent calls apply each step once, later ones nothing.
    let migrated = outbox
        .migrate_sea_orm(&db)
        .await
        .context("creating the outbox table")?;
    println!(
        "outbox table at schema version {} (applied now: {:?})",
        migrated.version, migrated.applied
    );
    let (order_id, sku, quantity) = (Uuid::now_v7(), "BOOK-42".to_owned(), 2);

    let tx = db.begin().await?;
    tx.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO orders (id, sku, quantity) VALUES ($1, $2, $3)",
        [order_id.into(), sku.clone().into(), quantity.into()],
    ))
    .await?;
    let placed = OrderEvent::OrderPlaced {
        order_id,
        sku,
        quantity,
    };
    let event_id = outbox
        .publish_sea_orm(&tx, &placed)
        .await
        .context("writing the event")?;
    tx.commit().await?; // the order and its event, or neither

    println!(
        "order {order_id} committed with event {event_id}; the relay publishes it to outbox.event.order"
    );
    Ok(())
}
