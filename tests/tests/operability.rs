//! The relay as operators run it: poison events parked per aggregate and retried, replay with
//! original ids, status, topic creation, and configuration checks.

use std::time::Duration;

use anyhow::Result;
use outbox_core::NewEvent;
use outbox_tests::writers::{commit_events, padded_event};
use outbox_tests::*;
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(60);

async fn cli(db: &TestDb, args: &[&str]) -> Result<(i32, String, String)> {
    let out = relay_cli_on(db, args, &[]).await?;
    Ok((out.code, out.stdout, out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_events_are_parked_per_aggregate_while_others_flow_and_replay_in_order_after_a_fix()
-> Result<()> {
    let db = TestDb::migrated("op_park").await?;
    let agg_type = unique("park");
    let topic = format!("outbox.event.{agg_type}");
    create_topic(&topic, 2).await?;
    let mut config = relay_config(&db);
    // A producer limit stands in for a broker that refuses large records.
    for (k, v) in [("message.max.bytes", "20000"), ("batch.size", "20000")] {
        config.kafka.properties.insert(k.into(), v.into());
    }
    let relay = InProcessRelay::start(config)?;

    // Aggregate A: A1 fine, A2 too large (poison), A3 held behind it. B and C flow. D's type
    // renders an illegal topic name.
    let a1 = commit_events(&db, vec![padded_event(&agg_type, "A", 1, 10)]).await?[0];
    let a2 = commit_events(&db, vec![padded_event(&agg_type, "A", 2, 30_000)]).await?[0];
    let a3 = commit_events(&db, vec![padded_event(&agg_type, "A", 3, 10)]).await?[0];
    let mut others = Vec::new();
    for i in 1..=5 {
        others.extend(
            commit_events(
                &db,
                vec![
                    padded_event(&agg_type, "B", i, 10),
                    padded_event(&agg_type, "C", i, 10),
                ],
            )
            .await?,
        );
    }
    let d1 = commit_events(&db, vec![NewEvent::new("orders/eu", "D", "Created", None)]).await?[0];
    wait_drained(&db.pool, LONG).await?;
    let a4 = commit_events(&db, vec![padded_event(&agg_type, "A", 4, 10)]).await?[0];
    wait_drained(&db.pool, LONG).await?;

    let records = consume(&[&topic], 11, QUIET, LONG).await?;
    let ids: Vec<Uuid> = records.iter().map(|r| r.event_id()).collect();
    assert!(ids.contains(&a1));
    for id in &others {
        assert!(ids.contains(id), "other aggregates must keep flowing");
    }
    for held in [a2, a3, a4] {
        assert!(
            !ids.contains(&held),
            "A's events after the poison one must be held"
        );
    }
    assert_eq!(records.len(), 11, "{ids:?}");

    let (code, out, err) = cli(&db, &["parked", "list", "--json"]).await?;
    assert_eq!(code, 0, "{err}");
    let parked: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let parked_ids: Vec<String> = parked
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        parked_ids,
        vec![
            a2.to_string(),
            a3.to_string(),
            d1.to_string(),
            a4.to_string()
        ],
        "{out}"
    );
    assert!(
        parked[0]["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("too large"),
        "{out}"
    );
    assert_eq!(parked[1]["blocked_by"], a2.to_string());
    assert!(
        parked[2]["reason"]
            .as_str()
            .unwrap()
            .contains("not a legal Kafka topic name"),
        "{out}"
    );

    // Retrying with the same limit fails and keeps everything parked.
    let (code, _, err) = cli(
        &db,
        &[
            "parked",
            "retry",
            "--all",
            "--kafka-property",
            "message.max.bytes=20000",
            "--kafka-property",
            "batch.size=20000",
        ],
    )
    .await?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("still cannot be published"), "{err}");
    // After the limit is raised, A's events go out in order and A is unblocked; D stays parked.
    let (code, out, err) = cli(&db, &["parked", "retry", &a2.to_string()]).await?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("republished 3 parked events"), "{out}");
    let a5 = commit_events(&db, vec![padded_event(&agg_type, "A", 5, 10)]).await?[0];
    wait_drained(&db.pool, LONG).await?;
    let records = consume(&[&topic], 15, QUIET, LONG).await?;
    relay.stop().await?;
    let a_order: Vec<Uuid> = records
        .iter()
        .filter(|r| r.key.as_deref() == Some("A"))
        .map(|r| r.event_id())
        .collect();
    assert_eq!(
        a_order,
        vec![a1, a2, a3, a4, a5],
        "A's order survives parking"
    );
    let (_, out, _) = cli(&db, &["parked", "list", "--json"]).await?;
    let left: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], d1.to_string());
    let (code, out, _) = cli(&db, &["parked", "drop", &d1.to_string()]).await?;
    assert_eq!(code, 0);
    assert!(out.contains("dropped 1"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_a_range_with_the_original_ids_and_status_reports_the_backlog()
-> Result<()> {
    let db = TestDb::migrated("op_replay").await?;
    let agg_type = unique("rp");
    let topic = format!("outbox.event.{agg_type}");
    let mut ids = Vec::new();
    for i in 0..10 {
        let kind = if i % 2 == 0 { "Even" } else { "Odd" };
        ids.extend(
            commit_events(
                &db,
                vec![NewEvent::new(&agg_type, "k", kind, None).with_aggregate_seq(i)],
            )
            .await?,
        );
    }
    let (code, out, err) = cli(&db, &["status", "--json"]).await?;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(status["pending_events"], 10);
    assert_eq!(status["leader_present"], false);

    let relay = InProcessRelay::start(relay_config(&db))?;
    wait_drained(&db.pool, LONG).await?;
    let (_, out, _) = cli(&db, &["status", "--json"]).await?;
    let status: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(status["pending_events"], 0);
    assert_eq!(status["leader_present"], true);
    assert_eq!(status["last_published"]["id"], ids[9].to_string());
    relay.stop().await?;

    let (code, out, err) = cli(&db, &["replay", "--type", "Odd", "--from", "1h"]).await?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 5 events"), "{out}");
    let records = consume(&[&topic], 15, QUIET, LONG).await?;
    assert_eq!(records.len(), 15);
    let replayed: Vec<Uuid> = records[10..].iter().map(|r| r.event_id()).collect();
    let odd: Vec<Uuid> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(replayed, odd, "original ids, original order");
    let (code, _, err) = cli(&db, &["replay"]).await?;
    assert_eq!(code, 2, "a replay without a range is refused: {err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_ensure_creates_the_routed_topics() -> Result<()> {
    let db = TestDb::migrated("op_topics").await?;
    let agg_type = unique("tp");
    commit_events(&db, vec![NewEvent::new(&agg_type, "1", "X", None)]).await?;
    let dlq = unique("dlq");
    let (code, out, err) = cli(
        &db,
        &[
            "topics",
            "ensure",
            "--partitions",
            "3",
            "--replication-factor",
            "1",
            "--set",
            &format!("dead_letter_topic={dlq}"),
        ],
    )
    .await?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("created  outbox.event.{agg_type}")),
        "{out}"
    );
    assert!(out.contains(&format!("created  {dlq}")), "{out}");
    let (code, out, _) = cli(&db, &["topics", "ensure", "--replication-factor", "1"]).await?;
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("exists   outbox.event.{agg_type}")),
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn config_validate_names_the_bad_key_and_print_redacts_secrets() -> Result<()> {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir)?;
    let bad = dir.join("relay.toml");
    std::fs::write(
        &bad,
        "batch_size = 10\n[kafka]\ndelivery_timeout = \"soon\"\n",
    )?;
    let out = relay_cli(
        &["config", "validate", "--config", bad.to_str().unwrap()],
        &[],
    )
    .await?;
    let err = &out.stderr;
    assert_eq!(out.code, 2, "{err}");
    assert!(err.contains("kafka.delivery_timeout"), "{err}");
    assert!(err.contains("relay.toml"), "{err}");

    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "source = \"polling\"\n[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n",
    )?;
    let secret = dir.join("db-url");
    std::fs::write(&secret, "postgres://relay:s3cr3t@db/app")?;
    let out = relay_cli(
        &[
            "config",
            "print",
            "--config",
            good.to_str().unwrap(),
            "--batch-size",
            "77",
        ],
        &[
            ("OUTBOX_DATABASE_URL_FILE", secret.to_str().unwrap()),
            ("OUTBOX_RETENTION", "2h"),
        ],
    )
    .await?;
    let printed = &out.stdout;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(printed.contains("batch_size = 77"), "{printed}");
    assert!(printed.contains("retention = \"2h\""), "{printed}");
    assert!(
        !printed.contains("s3cr3t") && !printed.contains("hunter2"),
        "{printed}"
    );
    assert!(printed.contains("<redacted>"), "{printed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_and_the_counters_move_while_events_flow() -> Result<()> {
    let db = TestDb::migrated("op_admin").await?;
    let env = [("OUTBOX_ADMIN_ADDR", "127.0.0.1:0"), ("RUST_LOG", "info")];
    let active = RelayProcess::start(&db, &["--log-format", "pretty"], &env).await?;
    active.wait_for_log("this relay is active", LONG).await?;
    let standby = RelayProcess::start(&db, &[], &env).await?;
    standby.wait_for_log("standing by", LONG).await?;
    let addr = admin_addr(&active.log()).expect("admin address logged");
    let standby_addr = admin_addr(&standby.log()).expect("admin address logged");

    assert_eq!(http_get(&addr, "/healthz").await?.0, 200);
    let (code, body) = http_get(&addr, "/readyz").await?;
    assert_eq!((code, body.trim()), (200, "ready (active)"));
    let (code, body) = http_get(&standby_addr, "/readyz").await?;
    assert_eq!(
        (code, body.trim()),
        (200, "ready (standby)"),
        "a standby is ready: it is doing its job"
    );

    let (_, before) = http_get(&addr, "/metrics").await?;
    assert_eq!(
        metric(&before, "outbox_relay_events_published_total"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(metric(&before, "outbox_relay_leader"), Some(1.0));
    let agg_type = unique("adm");
    for i in 0..20 {
        commit_events(
            &db,
            vec![NewEvent::new(&agg_type, format!("k{}", i % 4), "E", None)],
        )
        .await?;
    }
    wait_drained(&db.pool, LONG).await?;
    let (code, after) = http_get(&addr, "/metrics").await?;
    assert_eq!(code, 200);
    assert_eq!(
        metric(&after, "outbox_relay_events_published_total"),
        Some(20.0),
        "{after}"
    );
    assert_eq!(metric(&after, "outbox_relay_events_read_total"), Some(20.0));
    assert_eq!(
        metric(&after, "outbox_relay_commit_to_ack_seconds_count"),
        Some(20.0)
    );
    assert_eq!(metric(&after, "outbox_relay_pending_events"), Some(0.0));
    assert_eq!(metric(&after, "outbox_relay_database_up"), Some(1.0));
    assert!(metric(&after, "outbox_relay_seconds_since_last_event").is_some());
    assert!(
        !after.contains("k0") && !after.contains(&agg_type),
        "no aggregate ids or types as labels"
    );
    let (_, standby_metrics) = http_get(&standby_addr, "/metrics").await?;
    assert_eq!(metric(&standby_metrics, "outbox_relay_leader"), Some(0.0));

    let (code, body) = http_get(&addr, "/status").await?;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(status["role"], "active");
    assert_eq!(status["pending_events"], 0);
    assert_eq!(status["leader_present"], true);

    let (code, log) = active.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    standby.wait_for_log("this relay is active", LONG).await?;
    let (code, _) = standby.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0);
    Ok(())
}

/// Polls `/readyz` until `want(status, body)` holds; returns how long it took.
async fn until_readyz(
    addr: &str,
    want: impl Fn(u16, &str) -> bool,
    timeout: Duration,
) -> Result<Duration> {
    let started = std::time::Instant::now();
    loop {
        let (code, body) = http_get(addr, "/readyz").await?;
        if want(code, &body) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "/readyz still answers {code} {body:?} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_notices_a_broker_outage_while_idle_and_recovers_when_it_returns() -> Result<()> {
    use rdkafka::mocking::MockCluster;
    let db = TestDb::migrated("op_ready").await?;
    let mock = MockCluster::new(1)?;
    let topic = unique("ready");
    mock.create_topic(&topic, 1, 1)?;
    let relay = RelayProcess::start(
        &db,
        &["--log-format", "json"],
        &[
            ("OUTBOX_ADMIN_ADDR", "127.0.0.1:0"),
            ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", &mock.bootstrap_servers()),
            ("OUTBOX_TOPIC", &topic),
        ],
    )
    .await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let addr = admin_addr(&relay.log()).expect("admin address logged");
    until_readyz(&addr, |c, b| c == 200 && b.trim() == "ready (active)", LONG).await?;

    // No events flow: only the idle probe can notice the broker is gone.
    mock.broker_down(1)?;
    let noticed = until_readyz(
        &addr,
        |c, b| c == 503 && b.contains("Kafka brokers do not answer"),
        Duration::from_secs(10),
    )
    .await?;
    let (_, scrape) = http_get(&addr, "/metrics").await?;
    assert_eq!(metric(&scrape, "outbox_relay_sink_connected"), Some(0.0));
    assert_eq!(metric(&scrape, "outbox_relay_kafka_connected"), Some(0.0));

    mock.broker_up(1)?;
    let recovered = until_readyz(&addr, |c, _| c == 200, Duration::from_secs(10)).await?;
    eprintln!(
        "not ready {noticed:?} after the broker went down, ready {recovered:?} after it came back"
    );
    // And it still publishes.
    commit_events(&db, vec![NewEvent::new("acct", "1", "Opened", None)]).await?;
    wait_drained(&db.pool, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("Kafka brokers do not answer") && log.contains("Kafka brokers answer again"),
        "{log}"
    );
    Ok(())
}
