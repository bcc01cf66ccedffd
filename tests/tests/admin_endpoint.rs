//! The admin endpoint under an adversarial operator's eye: `/status` behind a bearer token
//! (probes stay open), a bounded number of database readings whatever the request rate, and
//! status queries that never scan the whole outbox table.

mod logical_common;

use std::time::{Duration, Instant};

use anyhow::Result;
use outbox_core::OutboxTable;
use outbox_tests::*;

const LONG: Duration = Duration::from_secs(60);

async fn start(db: &TestDb, env: &[(&str, &str)]) -> Result<(RelayProcess, String)> {
    let mut all = vec![("OUTBOX_ADMIN_ADDR", "127.0.0.1:0")];
    all.extend_from_slice(env);
    let relay = RelayProcess::start(db, &[], &all).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let addr = admin_addr(&relay.log()).expect("admin address logged");
    Ok((relay, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_requires_the_bearer_token_while_probes_stay_open() -> Result<()> {
    let db = TestDb::migrated("adm_auth").await?;
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let (relay, addr) = start(&db, &[("OUTBOX_ADMIN__TOKEN", &token)]).await?;

    assert_eq!(
        http_get_with_token(&addr, "/status", None).await?.0,
        401,
        "no token"
    );
    assert_eq!(
        http_get_with_token(&addr, "/status", Some("wrong-token-of-some-length"))
            .await?
            .0,
        401,
        "wrong token"
    );
    let (code, body) = http_get_with_token(&addr, "/status", Some(&token)).await?;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(status["role"], "active");
    assert_eq!(status["pending_events"], 0);
    assert_eq!(
        http_get_with_token(&addr, "/healthz", None).await?.0,
        200,
        "liveness is open"
    );
    assert_eq!(
        wait_for_status(&addr, "/readyz", 200, LONG).await?,
        200,
        "readiness is open"
    );
    let (code, metrics) = http_get_with_token(&addr, "/metrics", None).await?;
    assert_eq!(code, 200, "metrics stay open unless admin.metrics_auth");
    assert!(metric(&metrics, "outbox_relay_pending_events").is_some());
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");

    let (relay, addr) = start(
        &db,
        &[
            ("OUTBOX_ADMIN__TOKEN", &token),
            ("OUTBOX_ADMIN__METRICS_AUTH", "true"),
        ],
    )
    .await?;
    assert_eq!(http_get_with_token(&addr, "/metrics", None).await?.0, 401);
    assert_eq!(
        http_get_with_token(&addr, "/metrics", Some(&token))
            .await?
            .0,
        200
    );
    assert_eq!(wait_for_status(&addr, "/readyz", 200, LONG).await?, 200);
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");

    // A token too short to resist guessing is refused at start, naming the setting.
    let relay = RelayProcess::start(
        &db,
        &[],
        &[
            ("OUTBOX_ADMIN_ADDR", "127.0.0.1:0"),
            ("OUTBOX_ADMIN__TOKEN", "short"),
        ],
    )
    .await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0);
    assert!(log.contains("admin.token"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_one_status_reading_per_interval() -> Result<()> {
    let db = TestDb::migrated("adm_cache").await?;
    let refresh = Duration::from_secs(2);
    let (relay, addr) = start(&db, &[("OUTBOX_ADMIN__STATUS_REFRESH", "2s")]).await?;

    let started = Instant::now();
    request_waves(&addr, 6).await?;
    let served = 300;
    let (_, scrape) = http_get_with_token(&addr, "/metrics", None).await?;
    let elapsed = started.elapsed();
    let readings = metric(&scrape, "outbox_relay_admin_status_queries_total")
        .expect("the readings counter is exported");
    let bound = 1.0 + (elapsed.as_secs_f64() / refresh.as_secs_f64()).ceil();
    assert!(
        readings <= bound,
        "{served} requests in {elapsed:?} took {readings} database readings (at most {bound} with a {refresh:?} refresh)"
    );
    assert!(readings >= 1.0);
    let age = metric(&scrape, "outbox_relay_admin_status_age_seconds").expect("age exported");
    assert!(age <= refresh.as_secs_f64() + 3.5, "stale reading: {age}s");
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    Ok(())
}

/// `waves` waves of 50 concurrent requests (`/status` and `/metrics` mixed); the time they took.
async fn request_waves(addr: &str, waves: usize) -> Result<Duration> {
    let started = Instant::now();
    for wave in 0..waves {
        let requests = (0..50).map(|i| {
            let addr = addr.to_owned();
            let path = if (i + wave) % 2 == 0 {
                "/status"
            } else {
                "/metrics"
            };
            tokio::spawn(async move { http_get_with_token(&addr, path, None).await })
        });
        for r in futures::future::join_all(requests).await {
            let (code, body) = r??;
            assert_eq!(code, 200, "{body}");
        }
    }
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_sees_one_status_query_per_interval_in_pg_stat_statements() -> Result<()> {
    // The server's own count, independent of the relay's counter.
    let cluster = logical_common::TempCluster::start(
        "logical",
        "shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\n",
    )?;
    let db = cluster.test_db().await?;
    db.migrate().await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&db.pool)
        .await?;
    let refresh = Duration::from_secs(2);
    let (relay, addr) = start(&db, &[("OUTBOX_ADMIN__STATUS_REFRESH", "2s")]).await?;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&db.pool)
        .await?;
    let elapsed = request_waves(&addr, 6).await?;
    // The status page's count of pending events, whatever else its statement says.
    let calls: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements
         WHERE query LIKE 'SELECT count(*)%' AND query LIKE '%outbox%'
           AND query LIKE '%WHERE published_at IS NULL%'",
    )
    .fetch_one(&db.pool)
    .await?;
    let bound = 1 + (elapsed.as_secs_f64() / refresh.as_secs_f64()).ceil() as i64;
    assert!(
        (1..=bound).contains(&calls),
        "300 admin requests in {elapsed:?} ran the status count {calls} times (expected 1 to {bound})"
    );
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_queries_use_the_seq_indexes_not_a_scan_of_the_table() -> Result<()> {
    let db = TestDb::migrated("adm_index").await?;
    // 300k rows, the first 250k published: a realistic marked table with a backlog.
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
         SELECT gen_random_uuid(), 'acct', (i % 1000)::text, 'Opened', '{}'::jsonb
         FROM generate_series(1, 300000) i",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query("UPDATE outbox SET published_at = now() WHERE seq <= 250000")
        .execute(&db.pool)
        .await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;

    let plan = |sql: String| {
        let pool = db.pool.clone();
        async move {
            let lines: Vec<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
                    .fetch_all(&pool)
                    .await?;
            anyhow::Ok(lines.join("\n"))
        }
    };
    // The check can fail: the query status.rs ran before (newest by the unindexed column).
    let before = plan(
        "SELECT id, type, published_at FROM outbox WHERE published_at IS NOT NULL
         ORDER BY published_at DESC LIMIT 1"
            .to_owned(),
    )
    .await?;
    assert!(before.contains("Seq Scan on outbox"), "{before}");

    // Planned as the status reading runs them (no whole-table scan where an index can serve).
    let plan_as_status = |sql: String| {
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            sqlx::query(outbox_relay::status::STATUS_PLANNER_SETTING)
                .execute(&mut *tx)
                .await?;
            let lines: Vec<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
                    .fetch_all(&mut *tx)
                    .await?;
            anyhow::Ok(lines.join("\n"))
        }
    };
    for sql in outbox_relay::status::table_queries(&OutboxTable::default()) {
        let p = plan_as_status(sql.clone()).await?;
        assert!(p.contains("Index"), "not index-backed:\n{sql}\n{p}");
        assert!(
            !p.contains("Seq Scan on outbox"),
            "a status query scans the whole table:\n{sql}\n{p}"
        );
    }
    // And they answer right.
    let mut conn = db.connect().await?;
    let mut config = RelayConfig::default();
    config.database_url = outbox_relay::config::Secret::new(db.url.clone());
    let status = outbox_relay::status::read(&mut conn, &config, &OutboxTable::default()).await?;
    assert_eq!(status.pending_events, 50_000);
    assert!(status.oldest_pending_age_seconds.is_some());
    let last = status.last_published.expect("a published event");
    let last_seq: i64 = sqlx::query_scalar("SELECT seq FROM outbox WHERE id = $1")
        .bind(last.id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(
        last_seq, 250_000,
        "the event published just before the backlog"
    );
    Ok(())
}
