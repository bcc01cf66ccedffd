//! The consumer side of outbox-core: the inbox applies each event once, reports sequence gaps and
//! reordering, rolls back with a failing handler, and the rdkafka consumer loop survives malformed
//! records and offset resets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use outbox_core::consumer::{ConsumerConfig, ConsumerStats, InboxConsumer, StatsSnapshot};
use outbox_core::{
    Delivered, EventHandler, EventMetadata, HandlerError, Inbox, InboxTable, IncomingRecord,
    MalformedPolicy, OutboxEvent, SequenceCheck,
};
use outbox_tests::{TestDb, create_topic, services, unique};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The test's event type: deliberately non-idempotent effects (a counter), so a double apply shows.
#[derive(Debug, Clone, PartialEq, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "counter", aggregate_id = "counter", sequence = "seq")]
enum CounterEvent {
    Incremented { counter: String, seq: i64, by: i64 },
}

struct Counter {
    calls: Arc<AtomicUsize>,
    fail_first: Arc<AtomicUsize>,
}

impl Counter {
    fn new() -> Self {
        Self {
            calls: Arc::default(),
            fail_first: Arc::default(),
        }
    }
}

impl EventHandler<CounterEvent> for Counter {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: CounterEvent,
        _meta: &EventMetadata,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let CounterEvent::Incremented { counter, by, .. } = event;
        sqlx::query(
            "INSERT INTO counters (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = counters.value + EXCLUDED.value",
        )
        .bind(&counter)
        .bind(by)
        .execute(&mut *conn)
        .await?;
        if self
            .fail_first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("injected handler failure".into());
        }
        Ok(())
    }
}

async fn setup(prefix: &str) -> Result<(TestDb, Inbox)> {
    let db = TestDb::create(prefix).await?;
    sqlx::query("CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL)")
        .execute(&db.pool)
        .await?;
    let inbox = Inbox::new(InboxTable::parse("consumer.inbox")?, "counter-consumer")?;
    let mut conn = db.pool.acquire().await?;
    let report = inbox.migrate(&mut conn).await?;
    assert_eq!(report.applied, vec![1, 2]);
    // Idempotent.
    assert!(inbox.migrate(&mut conn).await?.applied.is_empty());
    Ok((db, inbox))
}

fn relay_like_record(event: &CounterEvent, id: Uuid, offset: i64) -> IncomingRecord {
    let payload = serde_json::to_vec(&event.to_payload().unwrap()).unwrap();
    let mut headers = vec![
        ("id".to_owned(), Some(id.to_string().into_bytes())),
        (
            "eventType".to_owned(),
            Some(event.event_type().as_bytes().to_vec()),
        ),
        ("schemaVersion".to_owned(), Some(b"1".to_vec())),
    ];
    if let Some(seq) = event.aggregate_sequence() {
        headers.push((
            "outbox-aggregate-seq".to_owned(),
            Some(seq.to_string().into_bytes()),
        ));
    }
    IncomingRecord {
        topic: "counters".into(),
        partition: 0,
        offset,
        key: Some(event.aggregate_id().into_bytes()),
        payload: Some(payload),
        headers,
    }
}

fn inc(counter: &str, seq: i64, by: i64) -> CounterEvent {
    CounterEvent::Incremented {
        counter: counter.into(),
        seq,
        by,
    }
}

async fn counter_value(db: &TestDb, name: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar::<_, Option<i64>>("SELECT value FROM counters WHERE name = $1")
            .bind(name)
            .fetch_optional(&db.pool)
            .await?
            .flatten()
            .unwrap_or(0),
    )
}

#[tokio::test]
async fn a_redelivered_event_is_applied_once_and_reported_as_duplicate() -> Result<()> {
    let (db, inbox) = setup("inbox_dup").await?;
    let handler = Counter::new();
    let record = relay_like_record(&inc("a", 1, 5), Uuid::now_v7(), 0);
    let first = inbox.deliver(&db.pool, &record, &handler).await?;
    assert!(
        matches!(
            first,
            Delivered::Applied {
                sequence: SequenceCheck::First { seq: 1 },
                ..
            }
        ),
        "{first:?}"
    );
    for _ in 0..3 {
        let again = inbox.deliver(&db.pool, &record, &handler).await?;
        assert!(matches!(again, Delivered::Duplicate { .. }), "{again:?}");
    }
    assert_eq!(counter_value(&db, "a").await?, 5, "applied exactly once");
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        1,
        "handler never saw the duplicates"
    );
    let mut conn = db.pool.acquire().await?;
    assert!(inbox.is_recorded(&mut conn, record_id(&record)).await?);
    // Another consumer name sharing the inbox table has its own "applied" set.
    let other = Inbox::new(InboxTable::parse("consumer.inbox")?, "another-consumer")?;
    assert!(matches!(
        other.deliver(&db.pool, &record, &handler).await?,
        Delivered::Applied { .. }
    ));
    assert_eq!(counter_value(&db, "a").await?, 10);
    Ok(())
}

fn record_id(record: &IncomingRecord) -> Uuid {
    EventMetadata::from_record(record).unwrap().event_id
}

#[tokio::test]
async fn sequence_gaps_and_out_of_order_deliveries_are_reported() -> Result<()> {
    let (db, inbox) = setup("inbox_seq").await?;
    let handler = Counter::new();
    let mut outcomes = Vec::new();
    for (offset, seq) in [(0, 1), (1, 3), (2, 2), (3, 4)] {
        let record = relay_like_record(&inc("agg", seq, 1), Uuid::now_v7(), offset);
        match inbox.deliver(&db.pool, &record, &handler).await? {
            Delivered::Applied { sequence, .. } => outcomes.push(sequence),
            other => bail!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        outcomes,
        vec![
            SequenceCheck::First { seq: 1 },
            SequenceCheck::Gap {
                expected: 2,
                got: 3
            },
            SequenceCheck::OutOfOrder { last: 3, got: 2 },
            SequenceCheck::InOrder,
        ]
    );
    let (last, gaps, ooo): (i64, i64, i64) = sqlx::query_as(
        "SELECT last_seq, gaps, out_of_order FROM consumer.inbox_sequences WHERE aggregate_id = 'agg'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        (last, gaps, ooo),
        (4, 1, 1),
        "the report is persisted per aggregate"
    );
    // A record without a sequence header is applied and reported as unsequenced.
    let mut record = relay_like_record(&inc("agg", 9, 1), Uuid::now_v7(), 4);
    record.headers.retain(|(n, _)| n != "outbox-aggregate-seq");
    assert!(matches!(
        inbox.deliver(&db.pool, &record, &handler).await?,
        Delivered::Applied {
            sequence: SequenceCheck::Unsequenced,
            ..
        }
    ));
    Ok(())
}

#[tokio::test]
async fn a_failing_handler_rolls_back_its_changes_and_the_inbox_row() -> Result<()> {
    let (db, inbox) = setup("inbox_fail").await?;
    let handler = Counter::new();
    handler.fail_first.store(1, Ordering::SeqCst);
    let record = relay_like_record(&inc("f", 1, 7), Uuid::now_v7(), 0);
    let err = inbox
        .deliver(&db.pool, &record, &handler)
        .await
        .expect_err("the handler fails");
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("injected handler failure"),
        "{err}"
    );
    let mut conn = db.pool.acquire().await?;
    assert!(!inbox.is_recorded(&mut conn, record_id(&record)).await?);
    assert_eq!(
        counter_value(&db, "f").await?,
        0,
        "the handler's write was rolled back"
    );
    // Delivered again, it applies once.
    assert!(matches!(
        inbox.deliver(&db.pool, &record, &handler).await?,
        Delivered::Applied { .. }
    ));
    assert_eq!(counter_value(&db, "f").await?, 7);
    Ok(())
}

#[tokio::test]
async fn malformed_records_are_parked_or_skipped_never_applied() -> Result<()> {
    let (db, inbox) = setup("inbox_malformed").await?;
    let handler = Counter::new();
    let good = relay_like_record(&inc("m", 1, 1), Uuid::now_v7(), 0);
    let mut no_id = good.clone();
    no_id.offset = 1;
    no_id.headers.retain(|(n, _)| n != "id");
    let mut bad_json = relay_like_record(&inc("m", 2, 1), Uuid::now_v7(), 2);
    bad_json.payload = Some(b"{not json".to_vec());
    let mut unknown = relay_like_record(&inc("m", 3, 1), Uuid::now_v7(), 3);
    unknown
        .headers
        .push(("eventType".into(), Some(b"Decremented".to_vec())));
    for record in [&no_id, &bad_json, &unknown] {
        let outcome = inbox.deliver(&db.pool, record, &handler).await?;
        assert!(
            matches!(outcome, Delivered::Malformed { parked: true, .. }),
            "{outcome:?}"
        );
        // Parking is idempotent per record position.
        inbox.deliver(&db.pool, record, &handler).await?;
    }
    let mut conn = db.pool.acquire().await?;
    let parked = inbox.parked(&mut conn).await?;
    assert_eq!(parked.len(), 3);
    assert!(
        parked[0].reason.contains("no `id` header"),
        "{}",
        parked[0].reason
    );
    assert!(
        parked[1].reason.contains("does not match"),
        "{}",
        parked[1].reason
    );
    assert_eq!(parked[1].payload.as_deref(), Some(&b"{not json"[..]));
    assert!(
        parked[2]
            .reason
            .contains("unknown event type `Decremented`"),
        "{}",
        parked[2].reason
    );
    assert_eq!(handler.calls.load(Ordering::SeqCst), 0);
    // With the skip policy nothing is kept; with ignore-unknown, unknown types are ignored.
    let skipping = inbox.clone().with_malformed_policy(MalformedPolicy::Skip);
    let mut other = bad_json.clone();
    other.offset = 10;
    assert!(matches!(
        skipping.deliver(&db.pool, &other, &handler).await?,
        Delivered::Malformed { parked: false, .. }
    ));
    assert_eq!(inbox.parked(&mut conn).await?.len(), 3);
    let ignoring = inbox.clone().ignoring_unknown_event_types(true);
    assert!(matches!(
        ignoring.deliver(&db.pool, &unknown, &handler).await?,
        Delivered::Ignored { .. }
    ));
    // And the good record still applies.
    assert!(matches!(
        inbox.deliver(&db.pool, &good, &handler).await?,
        Delivered::Applied { .. }
    ));
    Ok(())
}

async fn sequences_and_parked(db: &TestDb) -> Result<(Vec<(String, String, i64, i64, i64)>, i64)> {
    let sequences = sqlx::query_as(
        "SELECT consumer, aggregate_id, last_seq, gaps, out_of_order
         FROM consumer.inbox_sequences ORDER BY consumer, aggregate_id",
    )
    .fetch_all(&db.pool)
    .await?;
    let parked = sqlx::query_scalar("SELECT count(*) FROM consumer.inbox_parked")
        .fetch_one(&db.pool)
        .await?;
    Ok((sequences, parked))
}

#[tokio::test]
async fn purge_deletes_only_this_consumers_rows_older_than_the_age() -> Result<()> {
    let (db, inbox) = setup("inbox_purge").await?;
    let other = Inbox::new(inbox.table().clone(), "other-consumer")?;
    let handler = Counter::new();
    let (old_ids, young_ids): (Vec<_>, Vec<_>) = (
        (0..3).map(|_| Uuid::now_v7()).collect(),
        (0..2).map(|_| Uuid::now_v7()).collect(),
    );
    for (i, id) in old_ids.iter().chain(&young_ids).enumerate() {
        let seq = i as i64 + 1;
        let record = relay_like_record(&inc("p", seq, 1), *id, seq);
        assert!(matches!(
            inbox.deliver(&db.pool, &record, &handler).await?,
            Delivered::Applied { .. }
        ));
        // The other consumer applies the same events; its rows are all old.
        assert!(matches!(
            other.deliver(&db.pool, &record, &handler).await?,
            Delivered::Applied { .. }
        ));
    }
    for id in &old_ids {
        age_row_of(&db, "counter-consumer", *id, 3).await?;
    }
    for id in old_ids.iter().chain(&young_ids) {
        age_row_of(&db, "other-consumer", *id, 3).await?;
    }
    // A parked record, as old as the purged rows.
    let mut garbage = relay_like_record(&inc("p", 99, 1), Uuid::now_v7(), 100);
    garbage.payload = Some(b"not json".to_vec());
    inbox.deliver(&db.pool, &garbage, &handler).await?;
    sqlx::query("UPDATE consumer.inbox_parked SET parked_at = now() - interval '3 hours'")
        .execute(&db.pool)
        .await?;
    // Many more old rows than one purge statement deletes.
    sqlx::query(
        "INSERT INTO consumer.inbox (consumer, event_id, event_type, topic, kafka_partition,
                                     kafka_offset, processed_at)
         SELECT 'counter-consumer', gen_random_uuid(), 'Incremented', 'bulk', 0, n,
                now() - interval '2 hours'
         FROM generate_series(1, 25000) AS n",
    )
    .execute(&db.pool)
    .await?;
    let before = sequences_and_parked(&db).await?;

    let mut conn = db.pool.acquire().await?;
    let deleted = inbox
        .purge_older_than(&mut conn, Duration::from_secs(3600))
        .await?;
    assert_eq!(
        deleted, 25_003,
        "the 3 aged events and the 25 000 bulk rows, in batches"
    );
    for id in &old_ids {
        assert!(
            !inbox.is_recorded(&mut conn, *id).await?,
            "old row {id} purged"
        );
        assert!(
            other.is_recorded(&mut conn, *id).await?,
            "other consumer's row {id} kept"
        );
    }
    for id in &young_ids {
        assert!(
            inbox.is_recorded(&mut conn, *id).await?,
            "young row {id} kept"
        );
    }
    assert_eq!(inbox.applied_count(&mut conn).await?, 2);
    assert_eq!(other.applied_count(&mut conn).await?, 5);
    assert_eq!(
        sequences_and_parked(&db).await?,
        before,
        "sequences and parked records untouched"
    );
    assert_eq!(before.1, 1);
    // Nothing left to purge; a purge by an age beyond all rows deletes nothing.
    assert_eq!(
        inbox
            .purge_older_than(&mut conn, Duration::from_secs(3600))
            .await?,
        0
    );
    assert_eq!(
        other
            .purge_older_than(&mut conn, Duration::from_secs(4 * 3600))
            .await?,
        0
    );
    assert_eq!(other.purge_older_than(&mut conn, Duration::MAX).await?, 0);
    assert_eq!(
        other
            .purge_older_than(&mut conn, Duration::from_secs(2 * 3600))
            .await?,
        5
    );
    Ok(())
}

/// Ages `event_id`'s inbox row of `consumer` to `hours` hours ago.
async fn age_row_of(db: &TestDb, consumer: &str, event_id: Uuid, hours: i32) -> Result<()> {
    let n = sqlx::query(
        "UPDATE consumer.inbox SET processed_at = now() - make_interval(hours => $3)
         WHERE consumer = $1 AND event_id = $2",
    )
    .bind(consumer)
    .bind(event_id)
    .bind(hours)
    .execute(&db.pool)
    .await?
    .rows_affected();
    assert_eq!(n, 1, "event {event_id} has one inbox row for {consumer}");
    Ok(())
}

#[tokio::test]
async fn after_a_purge_stale_sequenced_redeliveries_are_still_skipped() -> Result<()> {
    let (db, inbox) = setup("inbox_purge_seq").await?;
    let handler = Counter::new();
    let records: Vec<_> = (1..=3)
        .map(|seq| relay_like_record(&inc("s", seq, 10), Uuid::now_v7(), seq))
        .collect();
    for record in &records {
        inbox.deliver(&db.pool, record, &handler).await?;
    }
    // An unsequenced event: after a purge only its id protected it.
    let mut unsequenced = relay_like_record(&inc("u", 1, 1), Uuid::now_v7(), 10);
    unsequenced
        .headers
        .retain(|(n, _)| n != "outbox-aggregate-seq");
    inbox.deliver(&db.pool, &unsequenced, &handler).await?;
    sqlx::query("UPDATE consumer.inbox SET processed_at = now() - interval '2 hours' WHERE aggregate_seq IS DISTINCT FROM 3")
        .execute(&db.pool)
        .await?;
    let mut conn = db.pool.acquire().await?;
    assert_eq!(
        inbox
            .purge_older_than(&mut conn, Duration::from_secs(3600))
            .await?,
        3
    );
    assert_eq!(counter_value(&db, "s").await?, 30);

    // Seqs 1 and 2 lost their inbox rows; 3 still has its own. All three are still skipped.
    for record in &records {
        let outcome = inbox.deliver(&db.pool, record, &handler).await?;
        assert!(
            matches!(outcome, Delivered::Duplicate { .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(
        counter_value(&db, "s").await?,
        30,
        "no stale redelivery applied again"
    );
    let (last, ooo): (i64, i64) = sqlx::query_as(
        "SELECT last_seq, out_of_order FROM consumer.inbox_sequences WHERE aggregate_id = 's'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        (last, ooo),
        (3, 0),
        "skipped redeliveries are not counted as reordering"
    );
    // The aggregate goes on in order.
    let next = relay_like_record(&inc("s", 4, 10), Uuid::now_v7(), 4);
    assert_eq!(
        inbox.deliver(&db.pool, &next, &handler).await?,
        Delivered::Applied {
            event_id: next_id(&next),
            sequence: SequenceCheck::InOrder
        }
    );
    // The documented limit: an unsequenced event older than the age is applied again.
    assert!(matches!(
        inbox.deliver(&db.pool, &unsequenced, &handler).await?,
        Delivered::Applied {
            sequence: SequenceCheck::Unsequenced,
            ..
        }
    ));
    assert_eq!(counter_value(&db, "u").await?, 2);
    Ok(())
}

fn next_id(record: &IncomingRecord) -> Uuid {
    EventMetadata::from_record(record).unwrap().event_id
}

#[tokio::test]
async fn a_version_1_inbox_upgrades_in_place_and_can_be_purged() -> Result<()> {
    let (db, inbox) = setup("inbox_purge_upgrade").await?;
    let handler = Counter::new();
    let records: Vec<_> = (1..=2)
        .map(|seq| relay_like_record(&inc("v", seq, 1), Uuid::now_v7(), seq))
        .collect();
    for record in &records {
        inbox.deliver(&db.pool, record, &handler).await?;
    }
    // Back to exactly what version 1 created, with its rows in place.
    for statement in [
        "DROP INDEX consumer.inbox_purge_idx",
        "ALTER TABLE consumer.inbox_sequences DROP COLUMN purged_seq",
        "DELETE FROM consumer._outbox_inbox_migrations WHERE version = 2",
        "UPDATE consumer.inbox SET processed_at = now() - interval '2 days'",
    ] {
        sqlx::query(statement).execute(&db.pool).await?;
    }
    let mut conn = db.pool.acquire().await?;
    let report = inbox.migrate(&mut conn).await?;
    assert_eq!((report.applied, report.version), (vec![2], 2));
    let index: String = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'consumer' AND indexname = 'inbox_purge_idx'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(index.contains("(consumer, processed_at)"), "{index}");

    assert_eq!(
        inbox
            .purge_older_than(&mut conn, Duration::from_secs(86_400))
            .await?,
        2
    );
    for record in &records {
        assert!(matches!(
            inbox.deliver(&db.pool, record, &handler).await?,
            Delivered::Duplicate { .. }
        ));
    }
    assert_eq!(counter_value(&db, "v").await?, 2);
    Ok(())
}

async fn produce(topic: &str, records: &[IncomingRecord]) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", services().bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &r.headers {
            headers = headers.insert(Header {
                key: name,
                value: value.as_deref(),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &r.payload {
            record = record.payload(p.as_slice());
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Runs an inbox consumer until `done(stats)` or a timeout; returns the final counters.
async fn consume_until(
    topic: &str,
    group: &str,
    inbox: &Inbox,
    db: &TestDb,
    done: impl Fn(&StatsSnapshot) -> bool,
) -> Result<StatsSnapshot> {
    let consumer = InboxConsumer::new(
        ConsumerConfig::new(services().bootstrap, group, [topic]),
        inbox.clone(),
        db.pool.clone(),
        Counter::new(),
    );
    let stats: Arc<ConsumerStats> = consumer.stats();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = stats.snapshot();
        if done(&now) {
            break;
        }
        if task.is_finished() {
            bail!("the consumer stopped on its own: {:?}", task.await?);
        }
        if Instant::now() > deadline {
            bail!("consumer did not get there: {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing more arrives after the condition (no late double-apply).
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    task.await??;
    Ok(stats.snapshot())
}

#[tokio::test]
async fn kafka_consumer_applies_once_survives_garbage_and_offset_resets() -> Result<()> {
    let (db, inbox) = setup("inbox_kafka").await?;
    let topic = unique("inbox-consumer");
    create_topic(&topic, 2).await?;
    let mut records = Vec::new();
    for seq in 1..=20 {
        let counter = if seq % 2 == 0 { "even" } else { "odd" };
        records.push(relay_like_record(&inc(counter, seq, 1), Uuid::now_v7(), 0));
    }
    // Garbage on the topic, as anyone with write access could produce it.
    let garbage = vec![
        IncomingRecord {
            key: Some(b"odd".to_vec()),
            payload: Some(b"\x00\xffnot an event".to_vec()),
            ..Default::default()
        },
        {
            let mut r = relay_like_record(&inc("odd", 99, 1), Uuid::now_v7(), 0);
            r.payload = Some(b"[1,2,3]".to_vec());
            r
        },
    ];
    // The relay replays a record (as after a crash before its acknowledgement).
    let replay = records[3].clone();
    let mut all = records[..10].to_vec();
    all.extend(garbage.clone());
    all.extend(records[10..].iter().cloned());
    all.push(replay);
    produce(&topic, &all).await?;
    let total = all.len() as u64;

    let first = consume_until(&topic, &unique("g1"), &inbox, &db, |s| s.records() >= total).await?;
    assert_eq!(first.applied, 20, "{first:?}");
    assert_eq!(
        first.duplicates, 1,
        "the replayed record is recognised: {first:?}"
    );
    assert_eq!(first.malformed, 2, "{first:?}");
    assert_eq!(first.parked, 2, "{first:?}");
    assert_eq!(counter_value(&db, "odd").await?, 10);
    assert_eq!(counter_value(&db, "even").await?, 10);

    // A new group reads everything again (offsets reset): nothing changes, all duplicates.
    let second =
        consume_until(&topic, &unique("g2"), &inbox, &db, |s| s.records() >= total).await?;
    assert_eq!(second.applied, 0, "{second:?}");
    assert_eq!(second.duplicates, 21, "{second:?}");
    assert_eq!(counter_value(&db, "odd").await?, 10);
    assert_eq!(counter_value(&db, "even").await?, 10);
    let mut conn = db.pool.acquire().await?;
    assert_eq!(
        inbox.parked(&mut conn).await?.len(),
        2,
        "parking is idempotent"
    );
    Ok(())
}

#[tokio::test]
async fn kafka_consumer_resumes_from_committed_offsets_after_restart() -> Result<()> {
    let (db, inbox) = setup("inbox_resume").await?;
    let topic = unique("inbox-resume");
    create_topic(&topic, 1).await?;
    let group = unique("g");
    let first: Vec<_> = (1..=5)
        .map(|s| relay_like_record(&inc("r", s, 1), Uuid::now_v7(), 0))
        .collect();
    produce(&topic, &first).await?;
    let a = consume_until(&topic, &group, &inbox, &db, |s| s.applied >= 5).await?;
    assert_eq!((a.applied, a.duplicates), (5, 0));
    let second: Vec<_> = (6..=8)
        .map(|s| relay_like_record(&inc("r", s, 1), Uuid::now_v7(), 0))
        .collect();
    produce(&topic, &second).await?;
    // Same group: the committed offsets say where to resume, so only the new records arrive.
    let b = consume_until(&topic, &group, &inbox, &db, |s| s.applied >= 3).await?;
    assert_eq!((b.applied, b.duplicates, b.gaps), (3, 0, 0), "{b:?}");
    assert_eq!(counter_value(&db, "r").await?, 8);
    Ok(())
}
