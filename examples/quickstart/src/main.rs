//! Quick start: a tiny service that writes typed events through the outbox in its own
//! transactions, with the relay embedded in the same process, and watches them arrive on Kafka.
//!
//! ```text
//! scripts/services.sh up && . .services/env
//! cargo run -p outbox-quickstart
//! ```
//!
//! It reads `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS`, creates a database of its own, writes
//! five events (one transaction is rolled back on purpose), and exits 0 once exactly the committed
//! events have been read back from the topic.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox_core::{DecodeEvent, Outbox, OutboxEvent};
use outbox_relay::{Relay, RelayConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The events of a shopping cart.
#[derive(Debug, Clone, PartialEq, OutboxEvent)]
#[outbox(
    aggregate_type = "cart",
    aggregate_id = "cart_id",
    sequence = "version"
)]
enum CartEvent {
    /// A cart was created.
    CartCreated { cart_id: Uuid, version: i64 },
    /// An item was added.
    ItemAdded {
        cart_id: Uuid,
        version: i64,
        sku: String,
        quantity: u32,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,rdkafka=warn".into()),
        )
        .init();
    let admin_url = std::env::var("DATABASE_URL")
        .context("set DATABASE_URL (scripts/services.sh up && . .services/env)")?;
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .context("set KAFKA_BOOTSTRAP_SERVERS (scripts/services.sh up && . .services/env)")?;

    // A database of our own, with the outbox table.
    let db = format!("quickstart_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await?;
    let url = format!(
        "{}/{db}",
        admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&admin_url)
    );
    let pool = PgPool::connect(&url).await?;
    let outbox = Outbox::default();
    outbox.migrate(&mut *pool.acquire().await?).await?;
    sqlx::query("CREATE TABLE carts (id uuid PRIMARY KEY, version bigint NOT NULL)")
        .execute(&pool)
        .await?;

    // The relay, embedded (a sidecar `outbox-relay run` works the same way).
    let mut config = RelayConfig::default();
    config.database_url = outbox_relay::config::Secret::new(url.clone());
    config.kafka.bootstrap_servers = bootstrap.clone();
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(Relay::new(config)?.run(shutdown.clone()));

    // Business transactions: state change and events commit together, or not at all.
    let cart_id = Uuid::now_v7();
    let mut committed = BTreeSet::new();
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO carts (id, version) VALUES ($1, 1)")
        .bind(cart_id)
        .execute(&mut *tx)
        .await?;
    committed.insert(
        outbox
            .publish(
                &mut tx,
                &CartEvent::CartCreated {
                    cart_id,
                    version: 1,
                },
            )
            .await?,
    );
    tx.commit().await?;
    for (version, sku) in [(2, "apple"), (3, "pear"), (4, "plum")] {
        let mut tx = pool.begin().await?;
        sqlx::query("UPDATE carts SET version = $2 WHERE id = $1")
            .bind(cart_id)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        let event = CartEvent::ItemAdded {
            cart_id,
            version,
            sku: sku.into(),
            quantity: 1,
        };
        committed.insert(outbox.publish(&mut tx, &event).await?);
        tx.commit().await?;
    }
    let mut tx = pool.begin().await?;
    let ghost = CartEvent::ItemAdded {
        cart_id,
        version: 5,
        sku: "ghost".into(),
        quantity: 9,
    };
    let rolled_back = outbox.publish(&mut tx, &ghost).await?;
    tx.rollback().await?; // never published
    println!(
        "wrote {} events in committed transactions, 1 rolled back",
        committed.len()
    );

    // Read them back from Kafka, decoded into the same enum.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("quickstart-{db}"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&["outbox.event.cart"])?;
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < committed.len() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let msg = match tokio::time::timeout(remaining, consumer.recv()).await {
            Ok(Ok(m)) => m,
            // The topic may not exist until the relay's first record creates it.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "consumer not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => bail!("only {} of {} events arrived", seen.len(), committed.len()),
        };
        let header = |name: &str| {
            msg.headers().and_then(|h| {
                h.iter()
                    .find(|x| x.key == name)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let id: Uuid = header("id")
            .context("record without an id header")?
            .parse()?;
        if !committed.contains(&id) {
            if id == rolled_back {
                bail!("a rolled-back event was published");
            }
            continue; // an event of another run of this example
        }
        let event_type = header("eventType").unwrap_or_default();
        let event = CartEvent::decode(&event_type, msg.payload().unwrap_or_default())?;
        println!(
            "  {} partition {} offset {}: {:?} (aggregate {})",
            msg.topic(),
            msg.partition(),
            msg.offset(),
            event,
            event.aggregate_id()
        );
        seen.insert(id);
    }
    shutdown.cancel();
    relay.await??;
    println!(
        "all {} committed events arrived; the rolled-back one did not",
        seen.len()
    );
    Ok(())
}
