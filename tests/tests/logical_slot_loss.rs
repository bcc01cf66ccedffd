//! A replication slot that disappears after the relay streamed from it — dropped while the relay
//! is stopped or running, invalidated, or missing on a promoted standby — must never be mistaken
//! for a first start: in `insert_delete` and `logical_message` modes the relay exits non-zero
//! naming the loss and the operator's options, on every restart, and creates nothing; in `table`
//! mode it recovers from the table. `outbox-relay slot drop` is how an operator accepts the loss.

mod logical_common;

use std::time::Duration;

use anyhow::Result;
use logical_common::*;
use outbox_core::WriteMode;
use outbox_tests::*;

/// Runs an `outbox-relay` one-shot command against `db` with `env`.
async fn cli(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String)> {
    let out = relay_cli_on(db, args, env).await?;
    Ok((out.code, out.text()))
}

/// Starts a relay that must refuse to start: exits non-zero within 30 s naming the lost slot
/// and `outbox-relay slot drop`, and leaves no slot behind.
async fn assert_refuses(db: &TestDb, slot: &str, env: &[(&str, &str)], what: &str) -> Result<()> {
    let relay = RelayProcess::start(db, &[], env).await?;
    let (code, log) = relay.wait_exit(Duration::from_secs(30)).await?;
    assert_ne!(code, 0, "{what}: the relay must exit non-zero\n{log}");
    assert!(
        log.contains("REPLICATION SLOT LOST") && log.contains("is LOST"),
        "{what}: the loss must be named\n{log}"
    );
    assert!(
        log.contains(&format!("outbox-relay slot drop {slot}"))
            && log.contains("no table to recover from"),
        "{what}: the operator's options must be named\n{log}"
    );
    assert!(
        !slot_exists(db, slot).await?,
        "{what}: a new slot was silently created"
    );
    Ok(())
}

/// In `insert_delete` and `logical_message` modes: a slot dropped while the relay is stopped,
/// and one dropped while it runs, make every later start exit non-zero (a crash loop stays
/// loud) without creating a slot; `outbox-relay slot drop` accepts the loss and the next start
/// streams again from a new slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_lost_slot_is_a_loud_exit_on_every_start_in_non_table_modes() -> Result<()> {
    for mode in [WriteMode::InsertDelete, WriteMode::LogicalMessage] {
        let db = TestDb::create("logical_slot_loss").await?;
        if mode != WriteMode::LogicalMessage {
            db.migrate().await?;
        }
        let slot = unique("lslot");
        let work = Workload::create(&db, "acct", 4, 1).await?;
        let env = logical_env(mode, &slot);
        let env = env_refs(&env);

        // A first-ever start creates the slot and streams.
        let relay = RelayProcess::start(&db, &[], &env).await?;
        wait_slot_active(&db.pool, &slot, LONG).await?;
        work.write(mode, 2, 5).await?;
        let ledger = work.ledger();
        let records = work.consume(&ledger, QUIET, LONG).await?;
        Verdict::check(&ledger, &records).assert_safe();
        let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
        assert_eq!(code, 0, "{log}");
        // A graceful stop records the confirmed position it made durable on the slot.
        let recorded: Option<i64> = sqlx::query_scalar(
            "SELECT (confirmed_lsn - '0/0'::pg_lsn)::int8 FROM outbox_relay_state WHERE slot_name = $1",
        )
        .bind(&slot)
        .fetch_optional(&db.pool)
        .await?;
        let at_slot = confirmed_flush(&db.pool, &slot).await?;
        assert_eq!(
            recorded.map(|l| l as u64),
            at_slot,
            "{mode}: the state row must hold the slot's position after a graceful stop"
        );

        // Dropped while the relay is stopped; events committed meanwhile cannot be streamed.
        drop_slots(&db.pool, &slot).await?;
        work.write(mode, 1, 3).await?;
        assert_refuses(&db, &slot, &env, &format!("{mode}: dropped while stopped")).await?;
        // A supervisor restarting it: still loud, still nothing created.
        assert_refuses(&db, &slot, &env, &format!("{mode}: restart after the loss")).await?;

        // The operator accepts the loss: the next start is a first start again.
        let (code, out) = cli(&db, &["slot", "drop", &slot], &env).await?;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("forgot"), "{out}");
        let relay = start_streaming(&db, &slot, &env).await?;

        // Dropped while the relay runs: it exits non-zero, and so does every restart.
        kill_and_drop_slot(&db.pool, &slot).await?;
        let (code, log) = relay.wait_exit(Duration::from_secs(60)).await?;
        assert_ne!(code, 0, "{mode}: dropped while running\n{log}");
        assert!(
            log.contains("REPLICATION SLOT LOST")
                && log.contains(&format!("outbox-relay slot drop {slot}")),
            "{log}"
        );
        assert!(!slot_exists(&db, &slot).await?, "{mode}: slot re-created");
        assert_refuses(
            &db,
            &slot,
            &env,
            &format!("{mode}: restart after a drop while running"),
        )
        .await?;
        drop_slots(&db.pool, &slot).await?;
    }
    Ok(())
}

/// `table` mode: a slot dropped while the relay is stopped is reported as lost (the state table
/// remembers it) and recovered from the table — every committed event published, the relay keeps
/// running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_lost_slot_in_table_mode_is_reported_and_recovered() -> Result<()> {
    let db = TestDb::migrated("logical_slot_loss_table").await?;
    let slot = unique("lslot");
    let work = Workload::create(&db, "acct", 4, 1).await?;
    let env = logical_env(WriteMode::Table, &slot);
    let env = env_refs(&env);
    let relay = RelayProcess::start(&db, &[], &env).await?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    work.write(WriteMode::Table, 2, 5).await?;
    wait_drained(&db.pool, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");
    drop_slots(&db.pool, &slot).await?;
    work.write(WriteMode::Table, 2, 5).await?;
    for round in 0..2 {
        let relay = RelayProcess::start(&db, &[], &env).await?;
        wait_drained(&db.pool, LONG).await?;
        let ledger = work.ledger();
        let records = work.consume(&ledger, QUIET, LONG).await?;
        let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
        assert_eq!(code, 0, "{log}");
        Verdict::check(&ledger, &records).assert_safe();
        if round == 0 {
            assert!(log.contains("REPLICATION SLOT LOST"), "{log}");
            assert!(log.contains("outbox_relay_state"), "{log}");
            assert!(log.contains("re-publishing unpublished rows"), "{log}");
            // Dropped again for the second round: still recovered.
            drop_slots(&db.pool, &slot).await?;
        }
    }
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}

/// A least-privilege relay role (REPLICATION, no CREATE on the schema) cannot create the state
/// table: the relay refuses to start and prints the statement. After the owner runs
/// `outbox-relay migrate --source logical` and grants the documented rights, the same role
/// streams and records its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_least_privilege_relay_uses_the_state_table_migrate_created() -> Result<()> {
    let db = TestDb::migrated("logical_state_grants").await?;
    let slot = unique("lslot");
    let role = unique("relay");
    for sql in [
        format!("CREATE ROLE {role} LOGIN REPLICATION"),
        format!("GRANT CONNECT ON DATABASE \"{}\" TO {role}", db.name),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT, DELETE ON public.outbox TO {role}"),
        format!("GRANT UPDATE (published_at) ON public.outbox TO {role}"),
        format!("GRANT SELECT, INSERT, DELETE ON public.outbox_parked TO {role}"),
        format!("GRANT SELECT ON public._outbox_migrations TO {role}"),
        format!("CREATE PUBLICATION {slot}_pub FOR TABLE public.outbox WITH (publish = 'insert')"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&db.pool)
            .await?;
    }
    let work = Workload::create(&db, "acct", 2, 1).await?;
    let relay_url = db
        .url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    let mut env = logical_env(WriteMode::InsertDelete, &slot);
    env.push(("OUTBOX_DATABASE_URL", relay_url));
    let env = env_refs(&env);

    let relay = RelayProcess::start(&db, &[], &env).await?;
    let (code, log) = relay.wait_exit(Duration::from_secs(30)).await?;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("the right to create the relay's state table")
            && log.contains("CREATE TABLE IF NOT EXISTS"),
        "{log}"
    );
    assert!(!slot_exists(&db, &slot).await?, "no slot before the record");

    let (code, out) = cli(&db, &["migrate"], &[("OUTBOX_SOURCE", "logical")]).await?;
    assert_eq!(code, 0, "{out}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON public.outbox_relay_state TO {role}"
    )))
    .execute(&db.pool)
    .await?;

    let relay = start_streaming(&db, &slot, &env).await?;
    work.write(WriteMode::InsertDelete, 1, 5).await?;
    let ledger = work.ledger();
    let records = work.consume(&ledger, QUIET, LONG).await?;
    Verdict::check(&ledger, &records).assert_safe();
    let (code, log) = relay.terminate(Duration::from_secs(20)).await?;
    assert_eq!(code, 0, "{log}");
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT write_mode FROM outbox_relay_state WHERE slot_name = $1")
            .bind(&slot)
            .fetch_optional(&db.pool)
            .await?;
    assert_eq!(recorded.as_deref(), Some("insert_delete"));
    drop_slots(&db.pool, &slot).await?;
    Ok(())
}
