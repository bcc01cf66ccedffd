//! End-to-end tests of the polling relay against a real PostgreSQL and a real Kafka-protocol
//! broker: every committed event once, none from rolled-back transactions, per-aggregate order,
//! late commits, restarts, standby takeover and failing fast on bad settings.

use std::time::Duration;

use anyhow::{Context, Result};
use outbox_core::{NewEvent, Outbox, WriteMode};
use outbox_tests::writers::Workload;
use outbox_tests::*;
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_with_late_commits_and_rollbacks_deliver_every_committed_event_once_in_order()
-> Result<()> {
    let db = TestDb::migrated("poll_concurrent").await?;
    let work = Workload::create(&db, "acct", 12, 3).await?;
    // Small batches, several in flight: late commits must be claimed while earlier batches are
    // still being produced.
    let mut config = relay_config(&db);
    config.batch_size = 25;
    config.max_in_flight_batches = 4;
    let relay = InProcessRelay::start(config)?;

    // A long-open transaction takes its seq first and commits after everything else.
    let held = work.spawn_long_open_tx(Duration::from_secs(3)).await?;
    work.write(WriteMode::Table, 8, 40).await?;
    held.await??;

    wait_drained(&db.pool, LONG).await?;
    let ledger = work.ledger();
    assert!(
        ledger.committed.len() > 300,
        "workload too small: {}",
        ledger.committed.len()
    );
    assert!(!ledger.rolled_back.is_empty(), "workload had no rollbacks");
    let records = work.consume(&ledger, QUIET, LONG).await?;
    relay.stop().await?;
    let v = Verdict::check(&ledger, &records);
    v.assert_exactly_once(&ledger);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lower_seq_committing_after_a_higher_one_is_still_published() -> Result<()> {
    let db = TestDb::migrated("poll_late").await?;
    let aggregate_type = unique("late");
    let topic = format!("outbox.event.{aggregate_type}");
    let relay = InProcessRelay::start(relay_config(&db))?;
    let outbox = Outbox::default();

    // T1 inserts first (lower seq) and stays open.
    let mut t1 = db.pool.begin().await?;
    let low = outbox
        .publish_new(
            &mut t1,
            vec![NewEvent::new(&aggregate_type, "a", "Low", None)],
        )
        .await?[0];
    // T2 inserts later (higher seq) and commits first.
    let mut t2 = db.pool.begin().await?;
    let high = outbox
        .publish_new(
            &mut t2,
            vec![NewEvent::new(&aggregate_type, "b", "High", None)],
        )
        .await?[0];
    t2.commit().await?;
    // Wait until the relay has published T2's event: a cursor relay would now be past T1's seq.
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let published: Option<bool> =
            sqlx::query_scalar("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1")
                .bind(high)
                .fetch_optional(&db.pool)
                .await?;
        if published == Some(true) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "T2's event never published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let low_seq: i64 = sqlx::query_scalar("SELECT seq FROM outbox WHERE id = $1")
        .bind(low)
        .fetch_one(&db.pool)
        .await
        .unwrap_or(-1);
    assert_eq!(
        low_seq, -1,
        "T1's row must not be visible before it commits"
    );
    t1.commit().await?;
    wait_drained(&db.pool, LONG).await?;
    let records = consume(&[&topic], 2, QUIET, LONG).await?;
    relay.stop().await?;
    let ids: Vec<Uuid> = records.iter().map(|r| r.event_id()).collect();
    assert!(
        ids.contains(&low),
        "the late-committing lower-seq event was skipped"
    );
    assert!(ids.contains(&high));
    assert_eq!(ids.len(), 2, "{records:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_sql_five_column_row_is_relayed_with_debezium_routing() -> Result<()> {
    let db = TestDb::migrated("poll_plain").await?;
    let aggregate_type = unique("Order");
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
         VALUES ($1, $2, 'order-7', 'OrderCreated', '{\"total\":10,\"currency\":\"EUR\",\"lines\":[1,2]}')",
    )
    .bind(id)
    .bind(&aggregate_type)
    .execute(&db.pool)
    .await?;
    let relay = InProcessRelay::start(relay_config(&db))?;
    let topic = format!("outbox.event.{aggregate_type}");
    let records = consume(&[&topic], 1, QUIET, LONG).await?;
    relay.stop().await?;
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(
        r.topic, topic,
        "Debezium topic outbox.event.<aggregatetype>, case kept"
    );
    assert_eq!(r.key.as_deref(), Some("order-7"), "key = aggregateid");
    // The value is the jsonb text exactly as PostgreSQL renders it, like Debezium's router.
    let rendered: String = sqlx::query_scalar("SELECT payload::text FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(r.value.as_deref(), Some(rendered.as_str()));
    assert_eq!(
        rendered,
        r#"{"lines": [1, 2], "total": 10, "currency": "EUR"}"#
    );
    assert_eq!(
        r.header("id"),
        Some(id.to_string().as_str()),
        "header id = event id"
    );
    assert_eq!(r.header("eventType"), Some("OrderCreated"));
    assert_eq!(r.header("ce_type"), Some("OrderCreated"));
    assert_eq!(r.header("ce_id"), Some(id.to_string().as_str()));
    assert_eq!(r.header("ce_subject"), Some("order-7"));
    assert_eq!(r.header("ce_specversion"), Some("1.0"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("schemaVersion"), Some("1"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_templates_and_per_type_routes_apply_and_trace_context_travels_within_allowed_topics()
-> Result<()> {
    let db = TestDb::migrated("poll_routes").await?;
    let prefix = unique("svc");
    let mut config = relay_config(&db);
    config.route.topic = format!("{prefix}.{{aggregatetype}}.{{type}}");
    config
        .route
        .routes
        .insert("AccountClosed".into(), format!("{prefix}.closures"));
    // The `topic` column may pick only topics in the allow-list.
    config.route.allowed_topics = vec![format!("{prefix}.*")];
    let relay = InProcessRelay::start(config)?;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let outbox = Outbox::default().with_trace_context(move || Some(tp.to_owned()));
    let mut tx = db.pool.begin().await?;
    outbox
        .publish_new(
            &mut tx,
            vec![
                NewEvent::new(
                    "account",
                    "1",
                    "AccountOpened",
                    Some(serde_json::json!({"a": 1})),
                )
                .with_header("tenant", "t-9"),
                NewEvent::new("account", "1", "AccountClosed", None),
                NewEvent::new("account", "1", "Pinned", None)
                    .with_topic(format!("{prefix}.pinned")),
                NewEvent::new("account", "2", "Injected", None).with_topic("payments.commands"),
            ],
        )
        .await?;
    tx.commit().await?;
    wait_drained(&db.pool, LONG).await?;
    let (parked_id, reason): (String, String) =
        sqlx::query_as("SELECT aggregateid, reason FROM outbox_parked")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        parked_id, "2",
        "only the event outside the allow-list is parked"
    );
    assert!(
        reason.contains("`payments.commands` is not allowed"),
        "{reason}"
    );
    let opened = consume(
        &[&format!("{prefix}.account.AccountOpened")],
        1,
        QUIET,
        LONG,
    )
    .await?;
    let closed = consume(&[&format!("{prefix}.closures")], 1, QUIET, LONG).await?;
    let pinned = consume(&[&format!("{prefix}.pinned")], 1, QUIET, LONG).await?;
    relay.stop().await?;
    assert_eq!((opened.len(), closed.len(), pinned.len()), (1, 1, 1));
    assert_eq!(opened[0].header("traceparent"), Some(tp));
    assert_eq!(opened[0].header("tenant"), Some("t-9"));
    assert_eq!(closed[0].value, None, "a NULL payload is a null value");
    assert_eq!(closed[0].key.as_deref(), Some("1"));
    Ok(())
}

/// When the row `id` was marked published, polling the table every 10 ms up to `timeout`.
async fn wait_published(db: &TestDb, id: Uuid, timeout: Duration) -> Result<std::time::Instant> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let published: Option<bool> =
            sqlx::query_scalar("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await?;
        if published == Some(true) {
            return Ok(std::time::Instant::now());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "event {id} not published within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_with_default_settings_delivers_an_event_written_while_idle_without_notify()
-> Result<()> {
    let db = TestDb::migrated("poll_idle").await?;
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(triggers, 0, "the migrated table has no wake-up trigger");
    let defaults = RelayConfig::default();
    let mut config = RelayConfig::default();
    config.database_url = outbox_relay::config::Secret::new(db.url.clone());
    config.kafka.bootstrap_servers = services().bootstrap;
    let relay = InProcessRelay::start(config)?;
    let aggregate_type = unique("idle");
    let topic = format!("outbox.event.{aggregate_type}");
    let outbox = Outbox::default();
    let write = |event_type: &'static str| {
        let outbox = outbox.clone();
        let aggregate_type = aggregate_type.clone();
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            let id = outbox
                .publish_new(
                    &mut tx,
                    vec![NewEvent::new(&aggregate_type, "a", event_type, None)],
                )
                .await?[0];
            tx.commit().await?;
            anyhow::Ok(id)
        }
    };

    // A first event shows the relay is up; then it stays idle long enough for its polls to relax
    // all the way to the poll interval.
    let first = write("First").await?;
    wait_published(&db, first, LONG).await?;
    tokio::time::sleep(defaults.poll_interval * 8).await;

    let second = write("WhileIdle").await?;
    let written = std::time::Instant::now();
    // Nothing wakes the relay: it finds the row at its next poll, at most a poll interval away
    // (plus slack for a loaded machine). A relay that waited for a notification would not.
    let bound = defaults.poll_interval + Duration::from_secs(3);
    let published = wait_published(&db, second, bound).await?;
    eprintln!(
        "written while idle, published after {:?}",
        published - written
    );
    let records = consume(&[&topic], 2, QUIET, LONG).await?;
    relay.stop().await?;
    let ids: Vec<Uuid> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(ids, [first, second]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_restart_mid_stream_loses_nothing_and_duplicates_nothing() -> Result<()> {
    let db = TestDb::migrated("poll_restart").await?;
    let work = Workload::create(&db, "rst", 10, 2).await?;

    let relay = RelayProcess::start(&db, &["--batch-size", "50"], &[]).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let writers = work.spawn_writers(WriteMode::Table, 4, 150);
    // Stop the relay while events are flowing, then start a new one.
    let deadline = std::time::Instant::now() + LONG;
    while work.ledger.lock().unwrap().committed.len() < 200 {
        assert!(std::time::Instant::now() < deadline, "writers stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "graceful stop must exit 0; log:\n{log}");
    assert!(log.contains("relay stopped"), "{log}");
    let relay = RelayProcess::start(&db, &["--batch-size", "50"], &[]).await?;
    writers.await??;
    wait_drained(&db.pool, LONG).await?;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    v.assert_exactly_once(&ledger);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_relay_waits_and_takes_over_when_the_active_one_is_killed() -> Result<()> {
    let db = TestDb::migrated("poll_standby").await?;
    // The optional wake-up trigger: the standby below polls too rarely to be seen otherwise.
    sqlx::query(sqlx::AssertSqlSafe(outbox_core::notify_trigger_sql(
        &outbox_core::OutboxTable::default(),
    )))
    .execute(&db.pool)
    .await?;
    let work = Workload::create(&db, "ha", 5, 1).await?;

    let first = RelayProcess::start(&db, &[], &[]).await?;
    first.wait_for_log("this relay is active", LONG).await?;
    // Another spelling of the same table contends for the same lock, and (with a poll interval
    // far beyond this test) is woken by the same NOTIFY channel once active.
    let second = RelayProcess::start(
        &db,
        &["--table", "public.outbox", "--poll-interval", "10m"],
        &[],
    )
    .await?;
    second.wait_for_log("standing by", LONG).await?;
    work.write(WriteMode::Table, 2, 30).await?;
    wait_drained(&db.pool, LONG).await?;
    assert!(
        !second.log().contains("this relay is active"),
        "the standby became active while the first relay was alive:\n{}",
        second.log()
    );

    let log = first.kill9().await?;
    assert!(log.contains("this relay is active"));
    second
        .wait_for_log("this relay is active", Duration::from_secs(20))
        .await?;
    work.write(WriteMode::Table, 2, 30).await?;
    wait_drained(&db.pool, Duration::from_secs(20))
        .await
        .context("the new active relay was not woken by the insert trigger's NOTIFY")?;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    let (code, log) = second.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    // The first relay was killed while idle (everything acknowledged), so nothing repeats.
    v.assert_exactly_once(&ledger);
    Ok(())
}

async fn expect_failure(
    db: &TestDb,
    args: &[&str],
    env: &[(&str, &str)],
    code: i32,
    needle: &str,
) -> Result<()> {
    let relay = RelayProcess::start(db, args, env).await?;
    let (got, log) = relay.wait_exit(Duration::from_secs(40)).await?;
    assert_eq!(
        got, code,
        "args {args:?} env {env:?}: wrong exit code; log:\n{log}"
    );
    assert!(
        log.contains(needle),
        "args {args:?} env {env:?}: log lacks `{needle}`:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_fail_fast_with_a_clear_error_and_a_non_zero_exit() -> Result<()> {
    let db = TestDb::create("poll_bad").await?;
    // No migration yet: the relay must say so.
    expect_failure(&db, &[], &[], 1, "run `outbox-relay migrate` first").await?;
    db.migrate().await?;
    // Unreachable database (nothing listens on port 1); the password must not be printed.
    expect_failure(
        &db,
        &["--connect-timeout", "3s"],
        &[(
            "OUTBOX_DATABASE_URL",
            "postgres://relay:hunter2@127.0.0.1:1/app",
        )],
        1,
        "cannot connect to PostgreSQL at postgres://relay:***@127.0.0.1:1/app",
    )
    .await?;
    let relay = RelayProcess::start(
        &db,
        &["--connect-timeout", "3s"],
        &[(
            "OUTBOX_DATABASE_URL",
            "postgres://relay:hunter2@127.0.0.1:1/app",
        )],
    )
    .await?;
    let (_, log) = relay.wait_exit(Duration::from_secs(40)).await?;
    assert!(!log.contains("hunter2"), "a secret was logged:\n{log}");
    // Unreachable broker.
    expect_failure(
        &db,
        &[
            "--connect-timeout",
            "2s",
            "--kafka-bootstrap-servers",
            "127.0.0.1:1",
        ],
        &[],
        1,
        "Kafka at `127.0.0.1:1` is unreachable",
    )
    .await?;
    // Invalid topic template, unknown placeholder, unknown source, weakened producer.
    expect_failure(
        &db,
        &["--topic", "events/{aggregatetype}"],
        &[],
        2,
        "invalid setting `route.topic`",
    )
    .await?;
    expect_failure(
        &db,
        &["--topic", "events.{tenant}"],
        &[],
        2,
        "unknown placeholder `{tenant}`",
    )
    .await?;
    expect_failure(
        &db,
        &["--source", "kafka"],
        &[],
        2,
        "invalid setting `source`: unknown variant: found `kafka`",
    )
    .await?;
    expect_failure(
        &db,
        &["--kafka-property", "enable.idempotence=false"],
        &[],
        2,
        "the relay requires idempotence",
    )
    .await?;
    // TLS and SASL misconfiguration: a clear error, no secret in the log.
    expect_failure(
        &db,
        &[
            "--kafka-property",
            "security.protocol=ssl,ssl.ca.location=/nonexistent/ca.pem",
        ],
        &[],
        1,
        "ssl.ca.location",
    )
    .await?;
    let sasl = RelayProcess::start(
        &db,
        &[
            "--connect-timeout",
            "3s",
            "--kafka-property",
            "security.protocol=sasl_plaintext,sasl.mechanism=SCRAM-SHA-256,sasl.username=relay,sasl.password=hunter2",
        ],
        &[],
    )
    .await?;
    let (code, log) = sasl.wait_exit(Duration::from_secs(40)).await?;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("is unreachable"), "{log}");
    assert!(
        !log.contains("hunter2"),
        "a SASL password was logged:\n{log}"
    );
    expect_failure(
        &db,
        &["--table", "outbox;drop table x"],
        &[],
        2,
        "invalid setting `table`",
    )
    .await?;
    expect_failure(
        &db,
        &["--write-mode", "insert_delete"],
        &[],
        2,
        "use source = \"logical\"",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_command_creates_the_table_and_is_idempotent() -> Result<()> {
    let db = TestDb::create("poll_migrate").await?;
    for _ in 0..2 {
        let out = relay_cli(
            &["migrate", "--table", "relay.events"],
            &[("OUTBOX_DATABASE_URL", &db.url)],
        )
        .await?;
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM relay._outbox_migrations WHERE table_name = 'events'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        n,
        i64::from(outbox_core::SCHEMA_VERSION),
        "each version recorded once"
    );
    let cols: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = 'relay' AND table_name = 'events' ORDER BY ordinal_position",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        &cols[..5],
        ["id", "aggregatetype", "aggregateid", "type", "payload"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_failure_recreates_the_producer_and_resumes_in_order() -> Result<()> {
    use rdkafka::mocking::MockCluster;
    let db = TestDb::migrated("poll_fault").await?;
    let mock = MockCluster::new(1)?;
    let topic = unique("fault");
    mock.create_topic(&topic, 2, 1)?;
    let mut config = relay_config(&db);
    config.kafka.bootstrap_servers = mock.bootstrap_servers();
    config.kafka.delivery_timeout = Duration::from_millis(1500);
    config.route.topic = topic.clone();
    config.batch_size = 20;
    let relay = InProcessRelay::start(config)?;
    let outbox = Outbox::default();
    let mut ledger = Ledger::default();
    let write = async |from: i64, to: i64, ledger: &mut Ledger| -> Result<()> {
        for seq in from..to {
            let mut tx = db.pool.begin().await?;
            let ids = outbox
                .publish_new(
                    &mut tx,
                    vec![
                        NewEvent::new("acct", format!("a{}", seq % 3), "E", None)
                            .with_aggregate_seq(seq),
                    ],
                )
                .await?;
            tx.commit().await?;
            ledger.committed.extend(ids);
        }
        Ok(())
    };
    write(0, 30, &mut ledger).await?;
    wait_drained(&db.pool, LONG).await?;
    // The broker goes away: deliveries time out, the relay must drop its window and retry.
    mock.broker_down(1)?;
    write(30, 90, &mut ledger).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        unpublished(&db.pool).await? > 0,
        "nothing can be published while the broker is down"
    );
    mock.broker_up(1)?;
    wait_drained(&db.pool, LONG).await?;
    let records =
        consume_committed(&mock.bootstrap_servers(), &[&topic], &ledger, QUIET, LONG).await?;
    relay.stop().await?;
    let v = Verdict::check(&ledger, &records);
    v.assert_safe();
    // The mock cluster does not deduplicate idempotent retries without a transactional id;
    // duplicates are bounded by what was in flight.
    assert!(v.duplicates <= 60, "{v:?}");
    Ok(())
}

/// A typed event, as a service would declare it.
#[derive(
    Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent,
)]
#[outbox(
    aggregate_type = "typed_account",
    aggregate_id = "account_id",
    sequence = "version"
)]
enum AccountEvent {
    Opened {
        account_id: Uuid,
        version: i64,
        email: String,
    },
    #[outbox(event_type = "EmailChanged", schema_version = 2)]
    ChangedEmail {
        account_id: Uuid,
        version: i64,
        email: String,
    },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derived_event_written_in_a_transaction_arrives_and_decodes_back() -> Result<()> {
    use outbox_core::DecodeEvent;
    let db = TestDb::migrated("poll_typed").await?;
    let prefix = unique("typed");
    let mut config = relay_config(&db);
    config.route.topic = format!("{prefix}.{{aggregatetype}}");
    let relay = InProcessRelay::start(config)?;
    let account_id = Uuid::now_v7();
    let events = vec![
        AccountEvent::Opened {
            account_id,
            version: 1,
            email: "a@example.com".into(),
        },
        AccountEvent::ChangedEmail {
            account_id,
            version: 2,
            email: "b@example.com".into(),
        },
    ];
    let mut tx = db.pool.begin().await?;
    let ids = Outbox::default().publish_all(&mut tx, &events).await?;
    tx.commit().await?;
    let records = consume(&[&format!("{prefix}.typed_account")], 2, QUIET, LONG).await?;
    relay.stop().await?;
    assert_eq!(records.len(), 2);
    for ((record, id), event) in records.iter().zip(&ids).zip(&events) {
        assert_eq!(record.event_id(), *id);
        assert_eq!(record.key.as_deref(), Some(account_id.to_string().as_str()));
        let decoded = AccountEvent::decode(
            record.header("eventType").unwrap(),
            record.value.as_deref().unwrap().as_bytes(),
        )?;
        assert_eq!(&decoded, event);
    }
    assert_eq!(records[1].header("eventType"), Some("EmailChanged"));
    assert_eq!(records[1].header("schemaVersion"), Some("2"));
    assert_eq!(records[1].header("outbox-aggregate-seq"), Some("2"));
    Ok(())
}
