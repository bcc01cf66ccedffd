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
    assert_eq!(report.applied, vec![1]);
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
