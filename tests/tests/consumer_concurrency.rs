//! `InboxConsumer` across partitions: several partitions processed at once with each partition's
//! order kept, offsets committed up to the finished records and no further, a stop on one
//! partition that a restart resumes from without loss or double apply, and the periodic inbox
//! purge. Real PostgreSQL, real broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outbox_core::consumer::{
    ConsumerConfig, ConsumerError, ConsumerStats, HandlerFailurePolicy, InboxConsumer,
    PartitionAssignment,
};
use outbox_core::{
    EventHandler, EventMetadata, HandlerError, Inbox, InboxError, InboxTable, OutboxEvent,
};
use outbox_tests::{TestDb, create_topic, services, unique};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PARTITIONS: i32 = 8;
/// The advisory lock a blocking handler waits on while the test holds it.
const BLOCK_LOCK: i64 = 0x0b10c4;

#[derive(Debug, Clone, PartialEq, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "order", aggregate_id = "order", sequence = "seq")]
enum OrderEvent {
    Stepped { order: String, seq: i64 },
}

/// Records every applied event in `applied`, in apply order (an identity column), with where it
/// was read. Optionally blocks on [`BLOCK_LOCK`] for one event, or fails one event while
/// `failing` is set.
#[derive(Clone, Default)]
struct Recorder {
    block_at: Option<(String, i64)>,
    fail_at: Option<(String, i64)>,
    failing: Arc<AtomicBool>,
}

impl EventHandler<OrderEvent> for Recorder {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: OrderEvent,
        meta: &EventMetadata,
    ) -> Result<(), HandlerError> {
        let OrderEvent::Stepped { order, seq } = event;
        let this = Some((order.clone(), seq));
        if this == self.block_at {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(BLOCK_LOCK)
                .execute(&mut *conn)
                .await?;
        }
        if this == self.fail_at && self.failing.load(Ordering::SeqCst) {
            return Err(format!("injected failure at {order}/{seq}").into());
        }
        sqlx::query(
            "INSERT INTO applied (aggregate, seq, event_id, kafka_partition, kafka_offset)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&order)
        .bind(seq)
        .bind(meta.event_id)
        .bind(meta.partition)
        .bind(meta.offset)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

async fn setup(prefix: &str) -> Result<(TestDb, Inbox)> {
    let db = TestDb::create(prefix).await?;
    sqlx::query(
        "CREATE TABLE applied (
             n               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             aggregate       text   NOT NULL,
             seq             bigint NOT NULL,
             event_id        uuid   NOT NULL,
             kafka_partition int    NOT NULL,
             kafka_offset    bigint NOT NULL
         )",
    )
    .execute(&db.pool)
    .await?;
    let inbox = Inbox::new(InboxTable::default(), "orders")?;
    inbox.migrate(&mut *db.pool.acquire().await?).await?;
    Ok((db, inbox))
}

/// One produced event and where the broker put it.
#[derive(Debug, Clone)]
struct Produced {
    order: String,
    seq: i64,
    partition: i32,
    offset: i64,
}

/// Produces `seqs` events for each of `aggregates` orders (`o0`, `o1`, …), order `oi` on
/// partition `i % PARTITIONS`, interleaved across orders; returns what the broker acknowledged.
async fn produce(topic: &str, aggregates: usize, seqs: i64) -> Result<Vec<Produced>> {
    produce_seqs(topic, aggregates, 1, seqs).await
}

/// [`produce`] for sequences `first..=last`.
async fn produce_seqs(
    topic: &str,
    aggregates: usize,
    first: i64,
    last: i64,
) -> Result<Vec<Produced>> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", services().bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let mut pending = Vec::new();
    for seq in first..=last {
        for a in 0..aggregates {
            let order = format!("o{a}");
            let event = OrderEvent::Stepped {
                order: order.clone(),
                seq,
            };
            let payload = serde_json::to_vec(&event.to_payload()?)?;
            let id = Uuid::now_v7().to_string();
            let seq_text = seq.to_string();
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
                    value: Some(seq_text.as_str()),
                });
            let partition = i32::try_from(a)? % PARTITIONS;
            let record = FutureRecord::to(topic)
                .partition(partition)
                .key(order.as_str())
                .payload(payload.as_slice())
                .headers(headers);
            let delivery = producer.send_result(record).map_err(|(e, _)| e)?;
            pending.push((order, seq, delivery));
        }
    }
    let mut produced = Vec::with_capacity(pending.len());
    for (order, seq, delivery) in pending {
        let delivered = delivery.await?.map_err(|(e, _)| e)?;
        produced.push(Produced {
            order,
            seq,
            partition: delivered.partition,
            offset: delivered.offset,
        });
    }
    Ok(produced)
}

/// Per partition, the offset after the last produced record: where a consumer that finished
/// everything has committed.
fn ends(produced: &[Produced]) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for p in produced {
        let end = ends.entry(p.partition).or_insert(0);
        *end = (*end).max(p.offset + 1);
    }
    ends
}

/// The group's committed offsets per partition (-1: none).
fn committed(group: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", services().bootstrap)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => o,
                _ => -1,
            };
            (e.partition(), offset)
        })
        .collect())
}

/// Each aggregate's sequences in the order the handler applied them.
async fn apply_order(db: &TestDb) -> Result<BTreeMap<String, Vec<i64>>> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT aggregate, seq FROM applied ORDER BY n")
        .fetch_all(&db.pool)
        .await?;
    let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (aggregate, seq) in rows {
        order.entry(aggregate).or_default().push(seq);
    }
    Ok(order)
}

/// Every event applied exactly once: as many handler rows as distinct event ids as expected.
async fn assert_applied_once(db: &TestDb, expected: usize) -> Result<()> {
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM applied")
            .fetch_one(&db.pool)
            .await?;
    ensure!(
        rows == distinct && usize::try_from(rows)? == expected,
        "expected {expected} events applied once, got {rows} rows for {distinct} events"
    );
    Ok(())
}

fn config(topic: &str, group: &str, concurrency: usize) -> ConsumerConfig {
    ConsumerConfig::new(services().bootstrap, group, [topic])
        .with_concurrency(concurrency)
        .with_assignment(PartitionAssignment::AllPartitions)
}

struct Running {
    stats: Arc<ConsumerStats>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ConsumerError>>,
}

fn start(config: ConsumerConfig, inbox: &Inbox, db: &TestDb, handler: Recorder) -> Running {
    let consumer = InboxConsumer::new(config, inbox.clone(), db.pool.clone(), handler);
    let stats = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    Running {
        stats,
        shutdown,
        task,
    }
}

impl Running {
    /// Polls `done` until it holds; fails when the consumer stops first or after 60 s.
    async fn until(&self, what: &str, mut done: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if done().await? {
                return Ok(());
            }
            if self.task.is_finished() {
                bail!("the consumer stopped before {what}");
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}: {:?}", self.stats.snapshot());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

async fn applied_count(db: &TestDb) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM applied")
        .fetch_one(&db.pool)
        .await?)
}

#[tokio::test]
async fn eight_partitions_at_once_apply_every_record_once_in_order_and_commit_to_the_end()
-> Result<()> {
    let (db, inbox) = setup("cc_all").await?;
    let topic = unique("cc-all");
    create_topic(&topic, PARTITIONS).await?;
    let produced = produce(&topic, 32, 40).await?;
    let total = produced.len();
    let group = unique("g");
    // The group protocol (subscribe), so the assignment goes through the rebalance callback;
    // short group timeouts make the broker's join seconds, not tens of seconds.
    let config = config(&topic, &group, 8)
        .with_assignment(PartitionAssignment::Subscribe)
        .with_property("session.timeout.ms", "6000")
        .with_property("max.poll.interval.ms", "8000");
    let running = start(config, &inbox, &db, Recorder::default());
    let stats = running.stats.clone();
    running
        .until("every record applied", async || {
            Ok(stats.snapshot().records() >= total as u64)
        })
        .await?;
    running.stop().await?;

    let s = stats.snapshot();
    assert_eq!(
        (s.applied, s.duplicates, s.gaps, s.out_of_order),
        (total as u64, 0, 0, 0),
        "{s:?}"
    );
    assert_applied_once(&db, total).await?;
    let order = apply_order(&db).await?;
    assert_eq!(order.len(), 32);
    for (aggregate, seqs) in &order {
        assert_eq!(
            seqs,
            &(1..=40).collect::<Vec<i64>>(),
            "apply order of {aggregate}"
        );
    }
    // Every partition committed exactly up to its last record.
    let expected = ends(&produced);
    assert_eq!(expected.len(), PARTITIONS as usize);
    assert_eq!(committed(&group, &topic)?, expected);
    Ok(())
}

#[tokio::test]
async fn a_blocked_partition_does_not_hold_back_the_others_and_keeps_its_own_order() -> Result<()> {
    let (db, inbox) = setup("cc_block").await?;
    let topic = unique("cc-block");
    create_topic(&topic, PARTITIONS).await?;
    // o0 alone on partition 0, o1 on partition 1, …
    let produced = produce(&topic, PARTITIONS as usize, 10).await?;
    let mut holder = db.connect().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(BLOCK_LOCK)
        .execute(&mut holder)
        .await?;
    let handler = Recorder {
        block_at: Some(("o0".into(), 3)),
        ..Recorder::default()
    };
    let running = start(config(&topic, &unique("g"), 8), &inbox, &db, handler);
    // o0's third event waits on the lock the test holds (visible in pg_locks) …
    running
        .until("o0/3 waiting on the lock", async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&db.pool)
            .await?;
            Ok(waiting == 1)
        })
        .await?;
    // … while every other partition's records are applied.
    running
        .until("the other partitions applied", async || {
            let others: i64 =
                sqlx::query_scalar("SELECT count(*) FROM applied WHERE aggregate <> 'o0'")
                    .fetch_one(&db.pool)
                    .await?;
            Ok(others == 70)
        })
        .await?;
    let order = apply_order(&db).await?;
    assert_eq!(
        order.get("o0"),
        Some(&vec![1, 2]),
        "partition 0 stays at its blocked record: nothing after it is applied"
    );
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(BLOCK_LOCK)
        .execute(&mut holder)
        .await?;
    running
        .until("everything applied", async || {
            Ok(applied_count(&db).await? == produced.len() as i64)
        })
        .await?;
    running.stop().await?;
    assert_applied_once(&db, produced.len()).await?;
    for (aggregate, seqs) in apply_order(&db).await? {
        assert_eq!(
            seqs,
            (1..=10).collect::<Vec<i64>>(),
            "apply order of {aggregate}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_stop_on_one_partition_commits_finished_work_and_a_restart_resumes_exactly() -> Result<()>
{
    let (db, inbox) = setup("cc_stop").await?;
    let topic = unique("cc-stop");
    create_topic(&topic, PARTITIONS).await?;
    // 16 orders, two per partition; o3 and o11 share partition 3.
    let produced = produce(&topic, 16, 20).await?;
    let group = unique("g");
    let failing = Arc::new(AtomicBool::new(true));
    let handler = Recorder {
        fail_at: Some(("o3".into(), 10)),
        failing: failing.clone(),
        ..Recorder::default()
    };
    let config = config(&topic, &group, 8)
        .with_retries(2, Duration::from_millis(10))
        .with_handler_failure(HandlerFailurePolicy::Stop);
    let running = start(config.clone(), &inbox, &db, handler.clone());
    let outcome = tokio::time::timeout(Duration::from_secs(60), running.task)
        .await
        .context("the consumer did not stop")??;
    match outcome {
        Err(ConsumerError::Inbox(InboxError::Handler { source, .. })) => {
            assert!(source.to_string().contains("o3/10"), "{source}");
        }
        other => bail!("expected the handler failure to stop the consumer, got {other:?}"),
    }
    let order = apply_order(&db).await?;
    assert_eq!(
        order.get("o3"),
        Some(&(1..=9).collect::<Vec<i64>>()),
        "o3 applied up to its failing event, nothing after it"
    );
    // Offsets: every partition committed exactly up to what it finished — its last applied
    // record — and partition 3 exactly up to the failing record, not past it.
    let applied_ends: BTreeMap<i32, i64> = sqlx::query_as(
        "SELECT kafka_partition, max(kafka_offset) + 1 FROM applied GROUP BY kafka_partition",
    )
    .fetch_all(&db.pool)
    .await?
    .into_iter()
    .collect();
    let failed_at = produced
        .iter()
        .find(|p| p.order == "o3" && p.seq == 10)
        .map(|p| p.offset)
        .context("o3/10 produced")?;
    let commits = committed(&group, &topic)?;
    assert_eq!(commits.get(&3), Some(&failed_at), "{commits:?}");
    for (partition, end) in &commits {
        let applied_end = applied_ends.get(partition).copied().unwrap_or(-1);
        assert_eq!(*end, applied_end, "partition {partition}: {commits:?}");
    }

    // The failure is gone; the same group resumes where each partition stopped.
    failing.store(false, Ordering::SeqCst);
    let running = start(config, &inbox, &db, handler);
    running
        .until("everything applied", async || {
            Ok(applied_count(&db).await? == produced.len() as i64)
        })
        .await?;
    let stats = running.stats.clone();
    running.stop().await?;
    let s = stats.snapshot();
    assert_eq!(
        s.duplicates, 0,
        "the restart redelivered nothing already applied: {s:?}"
    );
    assert_applied_once(&db, produced.len()).await?;
    for (aggregate, seqs) in apply_order(&db).await? {
        assert_eq!(
            seqs,
            (1..=20).collect::<Vec<i64>>(),
            "apply order of {aggregate}"
        );
    }
    assert_eq!(committed(&group, &topic)?, ends(&produced));
    Ok(())
}

#[tokio::test]
async fn batches_apply_several_records_per_transaction_and_fall_back_one_by_one() -> Result<()> {
    let (db, inbox) = setup("cc_batch").await?;
    let topic = unique("cc-batch");
    create_topic(&topic, PARTITIONS).await?;
    let produced = produce(&topic, 16, 25).await?;
    let group = unique("g");
    // One event fails once: its batch rolls back and is delivered again record by record.
    let failing = Arc::new(AtomicBool::new(true));
    let handler = Recorder {
        fail_at: Some(("o5".into(), 7)),
        failing: failing.clone(),
        ..Recorder::default()
    };
    let config = config(&topic, &group, 4)
        .with_batch_size(50)
        .with_retries(20, Duration::from_millis(50));
    let running = start(config, &inbox, &db, handler);
    let stats = running.stats.clone();
    running
        .until("the failing event retried", async || {
            Ok(stats.snapshot().retries >= 1)
        })
        .await?;
    failing.store(false, Ordering::SeqCst);
    running
        .until("everything applied", async || {
            Ok(applied_count(&db).await? == produced.len() as i64)
        })
        .await?;
    running.stop().await?;
    assert_applied_once(&db, produced.len()).await?;
    for (aggregate, seqs) in apply_order(&db).await? {
        assert_eq!(
            seqs,
            (1..=25).collect::<Vec<i64>>(),
            "apply order of {aggregate}"
        );
    }
    // Batched: far fewer transactions than records committed the inbox rows (rows committed
    // together share their transaction id).
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xmin::text) FROM inbox WHERE consumer = 'orders'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(
        transactions < produced.len() as i64 / 2,
        "{transactions} transactions for {} records",
        produced.len()
    );
    assert_eq!(committed(&group, &topic)?, ends(&produced));
    Ok(())
}

#[tokio::test]
async fn the_consumer_purges_old_inbox_rows_periodically() -> Result<()> {
    let (db, inbox) = setup("cc_purge").await?;
    let topic = unique("cc-purge");
    create_topic(&topic, PARTITIONS).await?;
    let produced = produce(&topic, 4, 5).await?;
    let config = config(&topic, &unique("g"), 2)
        .with_purge(Duration::from_secs(3600), Duration::from_millis(100));
    let running = start(config, &inbox, &db, Recorder::default());
    let stats = running.stats.clone();
    running
        .until("everything applied and a purge ran", async || {
            Ok(applied_count(&db).await? == produced.len() as i64 && stats.purge_runs() >= 1)
        })
        .await?;
    assert_eq!(stats.purged_rows(), 0, "nothing is old yet");
    // Half the rows become two hours old; a later period of the running consumer deletes them.
    let aged = sqlx::query(
        "UPDATE inbox SET processed_at = now() - interval '2 hours'
         WHERE event_id IN (SELECT event_id FROM inbox ORDER BY event_id LIMIT 10)",
    )
    .execute(&db.pool)
    .await?
    .rows_affected();
    assert_eq!(aged, 10);
    running
        .until(
            "the old rows purged",
            async || Ok(stats.purged_rows() == 10),
        )
        .await?;
    running.stop().await?;
    let left: HashMap<String, i64> = sqlx::query_as(
        "SELECT (processed_at > now() - interval '1 hour')::text, count(*) FROM inbox GROUP BY 1",
    )
    .fetch_all(&db.pool)
    .await?
    .into_iter()
    .collect();
    assert_eq!(
        left,
        HashMap::from([("true".to_owned(), 10)]),
        "only the young rows are left"
    );
    Ok(())
}

#[tokio::test]
async fn a_deep_partition_is_paused_and_resumed_without_loss_or_redelivery() -> Result<()> {
    let (db, inbox) = setup("cc_deep").await?;
    let topic = unique("cc-deep");
    create_topic(&topic, PARTITIONS).await?;
    // One order, so one partition, with more records than the consumer buffers per partition:
    // it pauses fetching that partition and resumes as the buffer drains.
    let produced = produce(&topic, 1, 6000).await?;
    let group = unique("g");
    let running = start(config(&topic, &group, 8), &inbox, &db, Recorder::default());
    let stats = running.stats.clone();
    running
        .until("everything applied", async || {
            Ok(stats.snapshot().records() >= produced.len() as u64)
        })
        .await?;
    running.stop().await?;
    let s = stats.snapshot();
    assert_eq!(
        (s.applied, s.duplicates),
        (produced.len() as u64, 0),
        "pausing and resuming redelivers nothing: {s:?}"
    );
    assert_applied_once(&db, produced.len()).await?;
    assert_eq!(
        apply_order(&db).await?.get("o0"),
        Some(&(1..=6000).collect::<Vec<i64>>())
    );
    assert_eq!(committed(&group, &topic)?.get(&0), ends(&produced).get(&0));
    Ok(())
}

#[tokio::test]
async fn a_rebalance_between_two_instances_loses_nothing_and_keeps_each_aggregates_order()
-> Result<()> {
    let (db, inbox) = setup("cc_rebalance").await?;
    let topic = unique("cc-rebalance");
    create_topic(&topic, PARTITIONS).await?;
    let mut produced = produce(&topic, 16, 30).await?;
    let group = unique("g");
    // Short group timeouts: the broker completes a rebalance within the rebalance timeout
    // (librdkafka sends `max.poll.interval.ms`), instead of the default minutes.
    let subscribe = config(&topic, &group, 8)
        .with_assignment(PartitionAssignment::Subscribe)
        .with_property("session.timeout.ms", "6000")
        .with_property("max.poll.interval.ms", "8000");
    let first = start(subscribe.clone(), &inbox, &db, Recorder::default());
    first
        .until("the first instance applying", async || {
            Ok(first.stats.snapshot().applied > 0)
        })
        .await?;
    // A second instance joins: the group takes partitions from the first and hands them over.
    // Events keep coming until the second instance has applied some (so it owns partitions).
    let second = start(subscribe, &inbox, &db, Recorder::default());
    let mut last = 30;
    let deadline = Instant::now() + Duration::from_secs(60);
    while second.stats.snapshot().records() == 0 {
        ensure!(
            Instant::now() < deadline,
            "the second instance never got records"
        );
        ensure!(
            !first.task.is_finished() && !second.task.is_finished(),
            "an instance stopped"
        );
        produced.extend(produce_seqs(&topic, 16, last + 1, last + 2).await?);
        last += 2;
    }
    produced.extend(produce_seqs(&topic, 16, last + 1, last + 30).await?);
    last += 30;
    let until = second
        .until("everything applied", async || {
            Ok(applied_count(&db).await? == produced.len() as i64)
        })
        .await;
    let (a, b) = (first.stats.clone(), second.stats.clone());
    until.with_context(|| format!("first {:?}", a.snapshot()))?;
    first.stop().await?;
    second.stop().await?;
    let (a, b) = (a.snapshot(), b.snapshot());
    assert_eq!(
        a.applied + b.applied,
        produced.len() as u64,
        "every event applied by exactly one instance: {a:?} {b:?}"
    );
    assert!(a.applied > 0 && b.applied > 0, "both applied: {a:?} {b:?}");
    assert_applied_once(&db, produced.len()).await?;
    for (aggregate, seqs) in apply_order(&db).await? {
        assert_eq!(
            seqs,
            (1..=last).collect::<Vec<i64>>(),
            "apply order of {aggregate}"
        );
    }
    assert_eq!(committed(&group, &topic)?, ends(&produced));
    Ok(())
}
