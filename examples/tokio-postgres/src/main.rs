//! An order and its `OrderPlaced` event written in one `tokio-postgres` transaction: both commit,
//! or neither does.
//!
//! ```text
//! scripts/services.sh up && . .services/env
//! cargo run -p outbox-example-tokio-postgres
//! ```
//!
//! The example creates (or upgrades) the outbox table itself with
//! [`Outbox::migrate_tokio_postgres`] — the same migration, lock and history as
//! `outbox-relay migrate` and the sqlx path, so whichever runs first does the work.
//!
//! With deadpool-postgres or bb8-postgres the code is the same: their pooled clients deref to a
//! `tokio_postgres::Client`, and the transaction they open is (or derefs to) a
//! `tokio_postgres::Transaction`, which is what [`Outbox::publish_tokio_postgres`] takes.

use anyhow::{Context, Result};
use outbox_core::{Outbox, OutboxEvent};
use tokio_postgres::NoTls;
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
    let (mut client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!("PostgreSQL connection ended: {error}");
        }
    });
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS orders (
                 id uuid PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL)",
        )
        .await?;

    let outbox = Outbox::default();
    // At start-up, from every instance: concurrent calls apply each step once, later ones nothing.
    let migrated = outbox
        .migrate_tokio_postgres(&mut client)
        .await
        .context("creating the outbox table")?;
    println!(
        "outbox table at schema version {} (applied now: {:?})",
        migrated.version, migrated.applied
    );
    let (order_id, sku, quantity) = (Uuid::now_v7(), "BOOK-42".to_owned(), 2);

    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO orders (id, sku, quantity) VALUES ($1, $2, $3)",
        &[&order_id, &sku, &quantity],
    )
    .await?;
    let placed = OrderEvent::OrderPlaced {
        order_id,
        sku,
        quantity,
    };
    let event_id = outbox
        .publish_tokio_postgres(&tx, &placed)
        .await
        .context("writing the event")?;
    tx.commit().await?; // the order and its event, or neither

    println!(
        "order {order_id} committed with event {event_id}; the relay publishes it to outbox.event.order"
    );
    Ok(())
}
