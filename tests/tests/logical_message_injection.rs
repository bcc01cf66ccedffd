//! `pg_logical_emit_message` is executable by PUBLIC by default: any role that can connect can
//! write a transactional message with the outbox prefix. Outside the `logical_message` write
//! mode such a message must never be published; in that mode the relay (at start) and
//! `outbox-relay status` warn while PUBLIC can still execute it, and stop warning once the
//! documented REVOKE is applied.

mod logical_common;

use std::time::Duration;

use anyhow::Result;
use logical_common::*;
use outbox_core::{NewEvent, Outbox, WriteMode};
use outbox_tests::*;

const PUBLIC_WARNING: &str = "pg_logical_emit_message is executable by PUBLIC";

/// In `table` and `insert_delete` modes, a message emitted with the outbox prefix (here by an
/// unprivileged role, as an attacker would) is ignored with a warning naming its LSN; the real
/// events around it are published, the injected one never is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_outbox_messages_are_never_published_outside_logical_message_mode() -> Result<()> {
    for mode in [WriteMode::Table, WriteMode::InsertDelete] {
        let db = TestDb::migrated("logical_inject").await?;
        let slot = unique("lslot");
        let work = Workload::create(&db, "acct", 2, 1).await?;
        let owned = logical_env(mode, &slot);
        let mut env = env_refs(&owned);
        env.push(("OUTBOX_ADMIN_ADDR", "127.0.0.1:0"));
        let relay = start_streaming(&db, &slot, &env).await?;

        // An unprivileged role emits a well-formed event message for the workload's topic.
        let role = unique("intruder");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN")))
            .execute(&db.pool)
            .await?;
        let intruder_url =
            db.url
                .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
        assert_ne!(intruder_url, db.url, "the test URL names the postgres user");
        let intruder = sqlx::PgPool::connect(&intruder_url).await?;
        let injector = Outbox::default().with_write_mode(WriteMode::LogicalMessage);
        let mut tx = intruder.begin().await?;
        let injected = injector
            .publish_new(
                &mut tx,
                vec![NewEvent::new(
                    &work.aggregate_type,
                    "acct-0",
                    "Injected",
                    None,
                )],
            )
            .await?;
        tx.commit().await?;
        intruder.close().await;

        // Real events after it: once they are all read, the injected message was decoded too.
        work.write(mode, 1, 5).await?;
        let ledger = work.ledger();
        let records = work.consume(&ledger, QUIET, LONG).await?;
        let v = Verdict::check(&ledger, &records);
        v.assert_safe();
        assert!(
            !records.iter().any(|r| injected.contains(&r.event_id())),
            "{mode}: an injected logical message was published"
        );
        assert_eq!(records.len(), ledger.committed.len(), "{mode}: {v:?}");
        relay
            .wait_for_log(
                "ignoring a logical decoding message with the outbox prefix",
                QUIET,
            )
            .await?;
        // Operators see refusals on /metrics too, not only in the log.
        let addr = admin_addr(&relay.log()).expect("admin address logged");
        let (_, metrics) = http_get(&addr, "/metrics").await?;
        assert!(
            metrics
                .lines()
                .any(|l| l == "outbox_relay_logical_messages_refused_total 1"),
            "{mode}: one refused message counted\n{metrics}"
        );
        let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
        assert_eq!(code, 0, "{log}");
        assert!(
            !log.contains(PUBLIC_WARNING),
            "{mode}: the PUBLIC warning belongs to logical_message mode only\n{log}"
        );
        drop_slots(&db.pool, &slot).await?;
    }
    Ok(())
}

/// Runs `outbox-relay status` in logical_message mode.
async fn status(db: &TestDb, slot: &str) -> Result<String> {
    let env = logical_env(WriteMode::LogicalMessage, slot);
    let bootstrap = services().bootstrap;
    let mut all = vec![
        ("OUTBOX_DATABASE_URL", db.url.as_str()),
        ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
    ];
    all.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
    let out = relay_cli(&["status"], &all).await?;
    let text = out.text();
    assert_eq!(out.code, 0, "{text}");
    Ok(text)
}

/// `logical_message` mode: while PUBLIC can execute pg_logical_emit_message the relay warns at
/// start and `status` says so; after the REVOKE documented in docs/postgres.md (and the grant to
/// a writer role) both are quiet, the writer role still publishes and the relay (whose
/// heartbeats need EXECUTE) still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_message_mode_warns_while_public_can_emit_messages() -> Result<()> {
    let db = TestDb::migrated("logical_emit_grant").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 2, 1).await?;
    let env = logical_env(WriteMode::LogicalMessage, &slot);
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    relay.wait_for_log(PUBLIC_WARNING, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");
    let out = status(&db, &slot).await?;
    assert!(out.contains("WARNING: executable by PUBLIC"), "{out}");

    // The documented fix: no EXECUTE for PUBLIC on any overload, EXECUTE for the writers.
    let writer = unique("writer");
    for sql in [
        format!("CREATE ROLE {writer} LOGIN"),
        format!("GRANT SELECT, INSERT ON accounts TO {writer}"),
        "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text), \
         pg_catalog.pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC"
            .to_owned(),
        format!(
            "GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) \
             TO {writer}"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await?;
    }
    let relay = start_streaming(&db, &slot, &env_refs(&env)).await?;
    // The granted writer still writes events; an ungranted role cannot.
    let writer_url = db
        .url
        .replacen("postgres://postgres@", &format!("postgres://{writer}@"), 1);
    let writer_pool = sqlx::PgPool::connect(&writer_url).await?;
    let outbox = Outbox::default().with_write_mode(WriteMode::LogicalMessage);
    let mut tx = writer_pool.begin().await?;
    let ids = outbox
        .publish_new(
            &mut tx,
            vec![NewEvent::new(
                &work.aggregate_type,
                "acct-0",
                "Granted",
                None,
            )],
        )
        .await?;
    tx.commit().await?;
    writer_pool.close().await;
    let other = unique("other");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {other} LOGIN")))
        .execute(&db.pool)
        .await?;
    let other_pool = sqlx::PgPool::connect(&db.url.replacen(
        "postgres://postgres@",
        &format!("postgres://{other}@"),
        1,
    ))
    .await?;
    let mut tx = other_pool.begin().await?;
    let refused = outbox
        .publish_new(
            &mut tx,
            vec![NewEvent::new(
                &work.aggregate_type,
                "acct-1",
                "Refused",
                None,
            )],
        )
        .await;
    assert!(
        refused.is_err(),
        "a role without the grant could still emit messages"
    );
    drop(tx);
    other_pool.close().await;
    let records = consume(&[&work.topic], ids.len(), QUIET, LONG).await?;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].event_id(), ids[0]);
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains(PUBLIC_WARNING), "{log}");
    let out = status(&db, &slot).await?;
    assert!(out.contains("not executable by PUBLIC"), "{out}");
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}
