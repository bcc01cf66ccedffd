//! What only the Redis Streams sink has, against real Redis servers: the dedupe on the event id
//! (a re-sent batch appends nothing), a refused record never overtaken by a later one of its key
//! in the same pipeline, the loud stops (a non-stream key under the destination's name, wrong
//! credentials), connections cut from the server side and the server SIGKILLed mid-run,
//! `WAIT` holding deliveries until a replica has them, and a TLS-only server with a private CA
//! (`redis.ca_path`) and a password. The guarantees every sink shares run in
//! `sink_guarantees.rs`.

mod logical_common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use logical_common::{LONG, QUIET, drop_slots, env_refs, logical_env};
use outbox_core::WriteMode;
use outbox_relay::config::{RedisSettings, Secret};
use outbox_relay::route::OutboundRecord;
use outbox_relay::sink::Outcome;
use outbox_relay::sink::redis::{RedisSink, SendError};
use outbox_tests::certs;
use outbox_tests::sinks::redis::{self as broker, PrivateRedis, PrivateTls};
use outbox_tests::writers::Workload;
use outbox_tests::*;
use uuid::Uuid;

/// Sink settings for the shared test server, with dedupe keys of this test's own.
fn settings(url: String) -> RedisSettings {
    RedisSettings {
        url: Secret::new(url),
        dedupe_prefix: unique("test:dedupe"),
        delivery_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn record(stream: &str, key: &str, n: usize) -> (Uuid, OutboundRecord) {
    let id = Uuid::new_v4();
    let r = OutboundRecord {
        topic: stream.to_owned(),
        key: key.to_owned(),
        payload: Some(format!("{{\"n\":{n}}}").into_bytes()),
        headers: vec![
            ("id".into(), id.to_string().into_bytes()),
            ("eventType".into(), b"Changed".to_vec()),
            ("outbox-aggregate-seq".into(), n.to_string().into_bytes()),
        ],
        timestamp_ms: Some(1_733_450_000_000 + n as i64),
    };
    (id, r)
}

#[tokio::test]
async fn a_resent_batch_appends_nothing_and_reports_the_earlier_entries() -> Result<()> {
    let stream = unique("outbox.event.redis_dedupe");
    let sink = RedisSink::new(settings(broker::url()))?;
    sink.check_connection().await?;
    let (ids, records): (Vec<Uuid>, Vec<OutboundRecord>) =
        (0..5).map(|n| record(&stream, "acct-1", n)).unzip();
    let first = sink.enqueue(&records).await.wait().await;
    let again = sink.enqueue(&records).await.wait().await;
    sink.recreate();
    let after_recreate = sink.enqueue(&records).await.wait().await;
    let offsets = |outcomes: &[Outcome<SendError>]| -> Vec<i64> {
        outcomes
            .iter()
            .map(|o| match o {
                Outcome::Delivered(d) => d.offset,
                other => panic!("not delivered: {other:?}"),
            })
            .collect()
    };
    assert_eq!(offsets(&first), offsets(&again), "the earlier entries");
    assert_eq!(offsets(&first), offsets(&after_recreate));
    let read = broker::read_all(&broker::url(), &stream).await?;
    let read_ids: Vec<Uuid> = read.iter().map(Consumed::event_id).collect();
    assert_eq!(read_ids, ids, "each event once, in order");
    let r = &read[2];
    assert_eq!(r.key.as_deref(), Some("acct-1"));
    assert_eq!(r.value.as_deref(), Some("{\"n\":2}"));
    assert_eq!(r.timestamp_ms, Some(1_733_450_000_002));
    assert_eq!(r.header("eventType"), Some("Changed"));
    Ok(())
}

#[tokio::test]
async fn a_refused_record_is_not_overtaken_by_a_later_one_of_its_key() -> Result<()> {
    let stream = unique("outbox.event.redis_gap");
    let s = settings(broker::url());
    let prefix = s.dedupe_prefix.clone();
    let sink = RedisSink::new(s)?;
    let (a1, r1) = record(&stream, "A", 1);
    let (a2, r2) = record(&stream, "A", 2);
    let (_, r3) = record(&stream, "A", 3);
    let (b1, r4) = record(&stream, "B", 1);
    // The server refuses A2 alone: its dedupe key holds a hash, so the script's GET fails.
    // Redis goes on with the rest of the pipeline; A3 must not be appended without A2.
    let mut conn = broker::connection().await?;
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{prefix}:{a2}"))
        .arg("x")
        .arg("y")
        .query_async(&mut conn)
        .await?;
    let out = sink.enqueue(&[r1, r2, r3, r4]).await.wait().await;
    assert!(matches!(out[0], Outcome::Delivered(_)), "{out:?}");
    assert!(
        matches!(&out[1], Outcome::Failed(SendError::Server { code, .. }) if code == "WRONGTYPE"),
        "{out:?}"
    );
    assert!(
        matches!(&out[2], Outcome::Failed(SendError::Server { code, .. }) if code == "OUTBOXGAP"),
        "{out:?}"
    );
    assert!(
        matches!(out[3], Outcome::Delivered(_)),
        "another key flows: {out:?}"
    );
    let read: Vec<Uuid> = broker::read_all(&broker::url(), &stream)
        .await?
        .iter()
        .map(Consumed::event_id)
        .collect();
    assert_eq!(read, [a1, b1]);
    // Nothing further goes out on that connection until the sink is recreated.
    let (_, later) = record(&stream, "C", 1);
    let out = sink
        .enqueue(std::slice::from_ref(&later))
        .await
        .wait()
        .await;
    assert!(
        matches!(&out[0], Outcome::Failed(SendError::NotSent(_))),
        "{out:?}"
    );
    sink.recreate();
    let out = sink.enqueue(&[later]).await.wait().await;
    assert!(matches!(out[0], Outcome::Delivered(_)), "{out:?}");
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{prefix}:{a2}"))
        .query_async(&mut conn)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_stream_key_under_the_destination_stops_the_relay_with_the_fix() -> Result<()> {
    let db = TestDb::migrated("redis_wrongtype").await?;
    let work = Workload::create(&db, "redis_wrongtype", 2, 1).await?;
    let mut conn = broker::connection().await?;
    let _: () = redis::cmd("SET")
        .arg(&work.topic)
        .arg("not a stream")
        .query_async(&mut conn)
        .await?;
    work.write(WriteMode::Table, 1, 10).await?;
    let env = broker::relay_env();
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("WRONGTYPE"), "{log}");
    assert!(log.contains("not a stream"), "the operator's fix: {log}");
    assert!(
        unpublished(&db.pool).await? > 0,
        "nothing acknowledged without Redis taking it"
    );
    let _: i64 = redis::cmd("DEL")
        .arg(&work.topic)
        .query_async(&mut conn)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_stop_the_relay_at_start_with_the_fix_and_never_show_the_password()
-> Result<()> {
    let db = TestDb::migrated("redis_auth").await?;
    let env = [
        ("OUTBOX_SINK", "redis".to_owned()),
        (
            "OUTBOX_REDIS_URL",
            broker::url().replace("redis://", "redis://nobody-here:Pw5ecret9@"),
        ),
    ];
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("WRONGPASS") || log.contains("AUTH"),
        "the server's refusal: {log}"
    );
    assert!(log.contains("redis.url"), "the operator's fix: {log}");
    assert!(!log.contains("Pw5ecret9"), "the password leaked: {log}");
    Ok(())
}

async fn connections_cut(logical: bool) -> Result<()> {
    let db = TestDb::migrated("redis_cut").await?;
    let work = Workload::create(&db, "redis_cut", 8, 1).await?;
    let mut env = broker::relay_env();
    env.push(("OUTBOX_BATCH_SIZE", "20".to_owned()));
    let slot = unique("rcut");
    if logical {
        env.extend(logical_env(WriteMode::Table, &slot));
    }
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let writers = work.spawn_writers(WriteMode::Table, 4, 150);
    // Cut until the writers are done, and at least three times.
    let mut cuts = 0;
    let deadline = Instant::now() + LONG;
    while (!writers.is_finished() || cuts < 3) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(150)).await;
        cuts += broker::kill_relay_connections(relay.child.pid()).await?;
    }
    writers.await??;
    ensure!(cuts >= 3, "only {cuts} connections were cut");
    let ledger = work.ledger();
    let records = broker::consume(&work.topic, ledger.committed.len(), QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("Redis connections cut {cuts} times (logical: {logical}): {v:?}");
    v.assert_safe();
    // Every re-sent record within the duplicate window is dropped by the dedupe check.
    assert_eq!(v.duplicates, 0, "{v:?}");
    if logical {
        drop_slots(&db.pool, &slot).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polling_connections_cut_by_the_server_lose_nothing_and_duplicate_nothing() -> Result<()> {
    connections_cut(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_connections_cut_by_the_server_lose_nothing_and_duplicate_nothing() -> Result<()> {
    connections_cut(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_sigkilled_mid_run_with_appendfsync_always_loses_nothing() -> Result<()> {
    let mut server =
        PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"]).await?;
    let db = TestDb::migrated("redis_crash").await?;
    let work = Workload::create(&db, "redis_crash", 8, 1).await?;
    let env = [
        ("OUTBOX_SINK", "redis".to_owned()),
        ("OUTBOX_REDIS_URL", server.url()),
        ("OUTBOX_BATCH_SIZE", "20".to_owned()),
        ("OUTBOX_REDIS__DELIVERY_TIMEOUT", "2s".to_owned()),
    ];
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let writers = work.spawn_writers(WriteMode::Table, 4, 80);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.kill9().await?;
        // Events committed while the server is down, so the relay has something to deliver to
        // it then (the background writers may already be done on a fast machine).
        work.write(WriteMode::Table, 2, 10).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.restart().await?;
    }
    writers.await??;
    let ledger = work.ledger();
    wait_drained(&db.pool, LONG).await?;
    let records = broker::consume_at(
        &server.url(),
        &work.topic,
        ledger.committed.len(),
        QUIET,
        LONG,
    )
    .await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("delivery failed"),
        "the relay saw the server go: {log}"
    );
    let v = Verdict::check(&ledger, &records);
    println!("Redis SIGKILLed twice: {v:?}");
    v.assert_safe();
    assert_eq!(
        v.duplicates, 0,
        "the dedupe keys survive with the entries: {v:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_replicas_holds_every_delivery_until_a_replica_has_it() -> Result<()> {
    let primary = PrivateRedis::start(&[]).await?;
    let db = TestDb::migrated("redis_wait").await?;
    let work = Workload::create(&db, "redis_wait", 4, 1).await?;
    let env = [
        ("OUTBOX_SINK", "redis".to_owned()),
        ("OUTBOX_REDIS_URL", primary.url()),
        ("OUTBOX_REDIS__WAIT_REPLICAS", "1".to_owned()),
        ("OUTBOX_REDIS__WAIT_TIMEOUT", "200ms".to_owned()),
    ];
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    work.write(WriteMode::Table, 2, 10).await?;
    let committed = work.ledger().committed.len();
    // No replica: Redis appends, WAIT reports 0, nothing counts as delivered.
    relay
        .wait_for_log("replicas (redis.wait_replicas) acknowledged", LONG)
        .await
        .context("the relay never reported missing replicas")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        usize::try_from(unpublished(&db.pool).await?)?,
        committed,
        "an event was acknowledged without a replica"
    );
    let primary_port = primary.port.to_string();
    let _replica =
        PrivateRedis::start(&["--replicaof", "127.0.0.1", primary_port.as_str()]).await?;
    let started = Instant::now();
    wait_drained(&db.pool, LONG).await?;
    println!("drained {:?} after the replica came", started.elapsed());
    let ledger = work.ledger();
    let records = broker::consume_at(
        &primary.url(),
        &work.topic,
        ledger.committed.len(),
        QUIET,
        LONG,
    )
    .await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("Redis WAIT: {v:?}");
    // Every retry re-sent records Redis had appended already: all dropped by the dedupe check.
    v.assert_exactly_once(&ledger);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_ensure_creates_nothing_and_reports_a_name_held_by_another_key() -> Result<()> {
    let db = TestDb::migrated("redis_topics").await?;
    let work = Workload::create(&db, "redis_topics", 1, 1).await?;
    // One committed event routes to the workload's destination.
    let mut tx = db.pool.begin().await?;
    outbox_core::Outbox::default()
        .publish_new(
            &mut tx,
            vec![outbox_core::NewEvent::new(
                &work.aggregate_type,
                "a",
                "Opened",
                None,
            )],
        )
        .await?;
    tx.commit().await?;
    let env = broker::relay_env();
    let env = env_refs(&env);
    let out = relay_cli_on(&db, &["topics", "ensure"], &env).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout
            .contains(&format!("nothing to create for {}", work.topic)),
        "{}",
        out.text()
    );
    let mut conn = broker::connection().await?;
    let _: () = redis::cmd("SET")
        .arg(&work.topic)
        .arg("not a stream")
        .query_async(&mut conn)
        .await?;
    let out = relay_cli_on(&db, &["topics", "ensure"], &env).await?;
    let _: i64 = redis::cmd("DEL")
        .arg(&work.topic)
        .query_async(&mut conn)
        .await?;
    assert_ne!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout.contains(&format!(
            "FAILED   {}: a Redis key of type string",
            work.topic
        )),
        "{}",
        out.text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tls_only_server_with_a_private_ca_gets_every_event_and_a_wrong_ca_stops_the_relay()
-> Result<()> {
    let pki = std::env::temp_dir().join(unique("redis-tls"));
    std::fs::create_dir_all(&pki)?;
    certs::make_ca(&pki, "redis")?;
    certs::make_ca(&pki, "other")?;
    certs::make_cert(
        &pki,
        "redis",
        "server",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    let password = format!("pw{}", Uuid::new_v4().simple());
    let server = PrivateRedis::start_tls(PrivateTls {
        cert: pki.join("server.crt"),
        key: pki.join("server.key"),
        ca: pki.join("redis-ca.crt"),
        password: password.clone(),
    })
    .await?;
    let url = format!("rediss://:{password}@127.0.0.1:{}", server.port);
    let db = TestDb::migrated("redis_tls").await?;
    let work = Workload::create(&db, "redis_tls", 3, 1).await?;
    let env_with = |ca: &str| {
        [
            ("OUTBOX_SINK", "redis".to_owned()),
            ("OUTBOX_REDIS_URL", url.clone()),
            (
                "OUTBOX_REDIS__CA_PATH",
                pki.join(format!("{ca}-ca.crt")).display().to_string(),
            ),
            ("OUTBOX_REDIS__CONNECT_TIMEOUT", "5s".to_owned()),
        ]
    };

    // A certificate the configured CA did not sign: the relay stops at start, with the reason.
    let env = env_with("other");
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0, "an unknown CA stops the relay: {log}");
    assert!(
        log.to_lowercase().contains("certificate"),
        "the stop names the certificate failure: {log}"
    );
    assert!(!log.contains(&password), "the password leaked: {log}");

    // The right CA: every event exactly once, over TLS.
    work.write(WriteMode::Table, 3, 10).await?;
    let env = env_with("redis");
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let ledger = work.ledger();
    wait_drained(&db.pool, LONG).await?;
    let records = broker::consume_at(
        &server.url(),
        &work.topic,
        ledger.committed.len(),
        QUIET,
        LONG,
    )
    .await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains(&password), "the password leaked: {log}");
    let v = Verdict::check(&ledger, &records);
    println!("Redis over TLS: {v:?}");
    v.assert_exactly_once(&ledger);
    let _ = std::fs::remove_dir_all(&pki);
    Ok(())
}
