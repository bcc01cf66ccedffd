//! The `consumer` section: `InboxConsumer` throughput on a pre-filled topic.
//!
//! Each run has its own database (inbox and a projection table) and its own topic of 1 or 8
//! partitions, filled before the consumer starts with relay-shaped records (id, event type and
//! sequence headers, ~200-byte JSON payload, keys over [`AGGREGATES`] aggregates). The consumer
//! takes every partition (`AllPartitions`: no group join in the figure), applies each event
//! through the inbox and a handler that upserts one projection row per aggregate, and the clock
//! runs from its start until its counters show every event applied. Runs: 1 and 8 partitions
//! at concurrency 1 and 8, one record per transaction; then 100-record batches at (1, 1) and
//! (8, 8).

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use outbox_core::consumer::{ConsumerConfig, InboxConsumer, PartitionAssignment};
use outbox_core::{EventHandler, EventMetadata, HandlerError, Inbox, InboxTable, OutboxEvent};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use sqlx::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use crate::db::{AGGREGATES, BenchDb, unique};
use crate::sections::{Ctx, per_sec};

/// The consumed event: a deposit, padded to a relay-like payload size.
#[derive(Debug, Clone, PartialEq, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account", sequence = "seq")]
enum Deposit {
    Deposited {
        account: String,
        seq: i64,
        amount: i64,
        note: String,
    },
}

/// Upserts the account's balance: one row write per event, in the inbox's transaction.
struct Balances;

impl EventHandler<Deposit> for Balances {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: Deposit,
        _meta: &EventMetadata,
    ) -> Result<(), HandlerError> {
        let Deposit::Deposited {
            account, amount, ..
        } = event;
        sqlx::query(
            "INSERT INTO balances (account, balance, events) VALUES ($1, $2, 1)
             ON CONFLICT (account) DO UPDATE
             SET balance = balances.balance + EXCLUDED.balance, events = balances.events + 1",
        )
        .bind(account)
        .bind(amount)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Topic partitions.
    pub partitions: i32,
    /// `ConsumerConfig::concurrency`.
    pub concurrency: usize,
    /// `ConsumerConfig::batch_size`.
    pub batch_size: usize,
    /// Events consumed.
    pub events: u64,
    /// From the consumer's start to the last event applied, seconds.
    pub seconds: f64,
    /// Events applied per second.
    pub events_per_sec: f64,
    /// Records the consumer received twice (the inbox dropped them); 0 unless something
    /// redelivered.
    pub duplicates: u64,
}

/// Runs the section: `(partitions, concurrency, batch)` per run.
pub async fn run(ctx: &mut Ctx) -> Result<Vec<Run>> {
    let events: u64 = if ctx.quick { 5_000 } else { 50_000 };
    let plan = [
        (1, 1, 1),
        (1, 8, 1),
        (8, 1, 1),
        (8, 8, 1),
        (1, 1, 100),
        (8, 8, 100),
    ];
    let mut runs = Vec::new();
    for (partitions, concurrency, batch) in plan {
        let r = one(ctx, partitions, concurrency, batch, events).await?;
        eprintln!(
            "bench: consumer: {} partition(s), concurrency {}, batch {}: {} events in {:.2} s = {:.0} events/s",
            r.partitions, r.concurrency, r.batch_size, r.events, r.seconds, r.events_per_sec
        );
        runs.push(r);
    }
    Ok(runs)
}

/// The section's results as a table.
pub fn table(runs: &[Run]) -> String {
    let mut out = String::from(
        "consumer (InboxConsumer, pre-filled topic)\n  partitions  concurrency  batch   events   seconds   events/s  duplicates\n",
    );
    for r in runs {
        out.push_str(&format!(
            "  {:>10}  {:>11}  {:>5}  {:>7}  {:>8.2}  {:>9.0}  {:>10}\n",
            r.partitions,
            r.concurrency,
            r.batch_size,
            r.events,
            r.seconds,
            r.events_per_sec,
            r.duplicates
        ));
    }
    out
}

async fn one(
    ctx: &mut Ctx,
    partitions: i32,
    concurrency: usize,
    batch: usize,
    events: u64,
) -> Result<Run> {
    let db = BenchDb::create(&ctx.admin_url, "consumer", &ctx.registry).await?;
    // Enough connections for every partition in flight, plus the purge-free consumer's needs.
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(concurrency)? + 2)
        .connect_with(PgConnectOptions::from_str(&db.url)?)
        .await?;
    sqlx::query(
        "CREATE TABLE balances (account text PRIMARY KEY, balance bigint NOT NULL, events bigint NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let inbox = Inbox::new(InboxTable::default(), "bench-balances")?;
    inbox.migrate(&mut *pool.acquire().await?).await?;
    let topic = unique("bench-consumer");
    outbox_tests::broker::create_topic_on(&ctx.bootstrap, &topic, partitions).await?;
    fill(&ctx.bootstrap, &topic, events).await?;

    let config = ConsumerConfig::new(ctx.bootstrap.clone(), unique("bench"), [topic.as_str()])
        .with_assignment(PartitionAssignment::AllPartitions)
        .with_concurrency(concurrency)
        .with_batch_size(batch);
    let consumer = InboxConsumer::new(config, inbox, pool.clone(), Balances);
    let stats = consumer.stats();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    let deadline = started + Duration::from_secs(600);
    let (seconds, duplicates) = loop {
        let s = stats.snapshot();
        if s.applied >= events {
            break (started.elapsed().as_secs_f64(), s.duplicates);
        }
        if task.is_finished() {
            bail!("the consumer stopped early: {:?}", task.await?);
        }
        if Instant::now() > deadline {
            bail!("the consumer did not apply {events} events in time: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    shutdown.cancel();
    task.await??;
    let applied: i64 = sqlx::query_scalar("SELECT coalesce(sum(events), 0)::bigint FROM balances")
        .fetch_one(&pool)
        .await?;
    if u64::try_from(applied)? != events {
        bail!("the projection holds {applied} events, expected {events}");
    }
    pool.close().await;
    db.drop().await?;
    Ok(Run {
        partitions,
        concurrency,
        batch_size: batch,
        events,
        seconds,
        events_per_sec: per_sec(events, Duration::from_secs_f64(seconds)),
        duplicates,
    })
}

/// Produces `n` relay-shaped deposits, keyed by account, and waits for every acknowledgement.
async fn fill(bootstrap: &str, topic: &str, n: u64) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let note = "x".repeat(120);
    let mut pending = Vec::with_capacity(usize::try_from(n)?);
    for i in 0..n {
        let account = format!("acct-{}", i % AGGREGATES);
        let seq = i64::try_from(i / AGGREGATES + 1)?;
        let event = Deposit::Deposited {
            account: account.clone(),
            seq,
            amount: i64::try_from(i % 997)?,
            note: note.clone(),
        };
        let payload = serde_json::to_vec(&event.to_payload()?)?;
        let id = Uuid::now_v7().to_string();
        let seq = seq.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "eventType",
                value: Some(event.event_type()),
            })
            .insert(Header {
                key: "outbox-aggregate-seq",
                value: Some(seq.as_str()),
            });
        let record = FutureRecord::to(topic)
            .key(account.as_str())
            .payload(payload.as_slice())
            .headers(headers);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}
