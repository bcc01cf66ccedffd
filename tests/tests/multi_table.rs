//! Many outbox tables in one relay process (`[[outbox]]` sections, the `tables` pattern): each
//! table relayed by its own pipeline with its own routing, a new tenant's table picked up without
//! a restart, a busy table not starving a quiet one, per-table metrics and status, and the
//! configuration errors. See `outbox_relay::relay::group` and docs/operations.md, "Many tables
//! per relay". Every test has its own database, schemas and topics.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outbox_core::{NewEvent, Outbox, OutboxTable};
use outbox_tests::tables::*;
use outbox_tests::writers::padded_event;
use outbox_tests::*;
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(1500);

/// (a) and (d): three `[[outbox]]` tables with different routes and one with its own dead-letter
/// topic; every event of each reaches that table's topic exactly once and in per-aggregate order;
/// `/metrics`, `/status`, `/readyz` and `outbox-relay status` show every table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_tables_each_reach_their_own_topic_in_order_and_are_reported_per_table() -> Result<()>
{
    let db = TestDb::create("mt_list").await?;
    let tag = unique("mt");
    let tables = ["billing.outbox", "shipping.outbox", "audit_outbox"];
    for t in tables {
        migrate_table(&db, t).await?;
    }
    let topics: Vec<String> = ["billing", "shipping", "audit"]
        .iter()
        .map(|t| format!("{tag}.{t}.Acct"))
        .collect();
    for t in &topics {
        create_topic(t, 3).await?;
    }
    let (relay, addr, config) = start_relay(
        &db,
        &format!(
            r#"
        [[outbox]]
        table = "billing.outbox"
        [outbox.route]
        topic = "{tag}.billing.{{aggregatetype}}"

        [[outbox]]
        table = "shipping.outbox"
        dead_letter_topic = "{tag}.shipping.parked"
        [outbox.route]
        topic = "{tag}.shipping.{{aggregatetype}}"

        [[outbox]]
        table = "audit_outbox"
        [outbox.route]
        topic = "{tag}.audit.{{aggregatetype}}"
        "#
        ),
        &[("OUTBOX_BATCH_SIZE", "50")],
    )
    .await?;

    let mut written = Vec::new();
    for t in tables {
        written.push(write_events(&db, t, "Acct", 10, 20).await?);
    }
    for t in tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    for (i, topic) in topics.iter().enumerate() {
        let records = consume(&[topic.as_str()], 200, QUIET, LONG).await?;
        check_exact_and_ordered(&records, &written[i], topic)?;
    }

    // (d) Per-table figures: one labelled series per table, no unlabelled one.
    let (code, scrape) = http_get(&addr, "/metrics").await?;
    assert_eq!(code, 200, "{scrape}");
    for t in tables {
        assert_eq!(
            table_metric(&scrape, "outbox_relay_events_published_total", t),
            Some(200.0),
            "{t}\n{scrape}"
        );
        assert_eq!(
            table_metric(&scrape, "outbox_relay_leader", t),
            Some(1.0),
            "{t}"
        );
        assert_eq!(
            table_metric(&scrape, "outbox_relay_pending_events", t),
            Some(0.0),
            "{t}"
        );
    }
    assert_eq!(metric(&scrape, "outbox_relay_events_published_total"), None);
    assert_eq!(
        scrape
            .matches("# TYPE outbox_relay_events_published_total ")
            .count(),
        1,
        "each name described once:\n{scrape}"
    );

    let (code, body) = http_get(&addr, "/status").await?;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let listed: BTreeSet<&str> = status["tables"]
        .as_array()
        .context("a tables list")?
        .iter()
        .filter_map(|t| t["table"].as_str())
        .collect();
    assert_eq!(listed.len(), 3, "{body}");
    for t in status["tables"].as_array().unwrap() {
        assert_eq!(t["role"], "active", "{body}");
        assert_eq!(t["pending_events"], 0, "{body}");
        assert_eq!(t["published_by_this_instance"], 200, "{body}");
    }
    assert_eq!(wait_for_status(&addr, "/readyz", 200, LONG).await?, 200);

    let path = config.to_str().unwrap();
    let out = relay_cli_on(&db, &["status", "--json", "--config", path], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    let cli: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(
        cli["tables"].as_array().map(Vec::len),
        Some(3),
        "{}",
        out.stdout
    );
    let out = relay_cli_on(&db, &["status", "--config", path], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    for t in tables {
        assert!(out.stdout.contains(t), "{t} in\n{}", out.stdout);
    }

    let log = stop_cleanly(relay).await?;
    for t in tables {
        assert!(
            log.contains(&format!("table={t}")) || log.contains(&format!("table=\"{t}\"")),
            "the log names {t}"
        );
    }
    Ok(())
}

/// (b): a relay on `tenant_*.outbox` relays the migrated tenants' tables, ignores a table outside
/// the pattern and one not migrated, picks up a tenant created while it runs, and stops a dropped
/// tenant's pipeline without stopping the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_picks_up_a_new_tenant_without_a_restart_and_lets_a_dropped_one_go() -> Result<()>
{
    let db = TestDb::create("mt_pattern").await?;
    let tag = unique("mtp");
    for t in ["tenant_a.outbox", "tenant_b.outbox", "other.outbox"] {
        migrate_table(&db, t).await?;
    }
    // Named like the pattern but not an outbox yet (no schema version).
    for sql in [
        "CREATE SCHEMA tenant_c",
        "CREATE TABLE tenant_c.outbox (id int)",
    ] {
        sqlx::query(sql).execute(&db.pool).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 3).await?;
    let config = config_file(&format!(
        "tables = \"tenant_*.outbox\"\ntables_rescan_interval = \"1s\"\n[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n"
    ))?;
    let relay = start_with_config(&db, &config, &[]).await?;
    relay
        .wait_for_log("relaying the tables matching the pattern", LONG)
        .await?;

    let a = write_events(&db, "tenant_a.outbox", "Acct", 3, 5).await?;
    let b = write_events(&db, "tenant_b.outbox", "Acct", 3, 5).await?;
    write_events(&db, "other.outbox", "Acct", 1, 3).await?;
    wait_table_drained(&db, "tenant_a.outbox", LONG).await?;
    wait_table_drained(&db, "tenant_b.outbox", LONG).await?;

    // A tenant created and migrated while the relay runs.
    migrate_table(&db, "tenant_new.outbox").await?;
    relay
        .wait_for_log("table=tenant_new.outbox", LONG)
        .await
        .context("the new tenant's pipeline never started")?;
    let new = write_events(&db, "tenant_new.outbox", "Acct", 3, 5).await?;
    wait_table_drained(&db, "tenant_new.outbox", LONG).await?;

    let mut all: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for (prefix, written) in [("a", &a), ("b", &b), ("new", &new)] {
        for (k, v) in written {
            all.insert(format!("{prefix}/{k}"), v.clone());
        }
    }
    let records = consume(&[topic.as_str()], 45, QUIET, LONG).await?;
    let ids: BTreeSet<Uuid> = records.iter().map(Consumed::event_id).collect();
    let expected: BTreeSet<Uuid> = all.values().flatten().copied().collect();
    assert_eq!(ids, expected, "exactly the tenants' events");
    assert_eq!(records.len(), 45, "no duplicates");
    assert_eq!(
        pending(&db, "other.outbox").await?,
        3,
        "outside the pattern"
    );
    assert!(
        !relay.log().contains("table=tenant_c.outbox"),
        "not migrated"
    );

    // A dropped tenant: its pipeline stops, the others go on.
    sqlx::query("DROP SCHEMA tenant_b CASCADE")
        .execute(&db.pool)
        .await?;
    relay
        .wait_for_log("no longer matches the pattern", LONG)
        .await?;
    let more = write_events(&db, "tenant_a.outbox", "Acct", 1, 3).await?;
    wait_table_drained(&db, "tenant_a.outbox", LONG).await?;
    assert_eq!(more.values().map(Vec::len).sum::<usize>(), 3);
    stop_cleanly(relay).await?;
    Ok(())
}

/// Each table has its own leadership: a second relay with the same tables stands by for each
/// of them (and is ready), and takes every table over when the first is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relay_takes_over_every_table_of_a_killed_one() -> Result<()> {
    let db = TestDb::create("mt_standby").await?;
    let tag = unique("mts");
    let tables = ["t_one.outbox", "t_two.outbox"];
    for t in tables {
        migrate_table(&db, t).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 3).await?;
    let config = config_file(&format!(
        "tables = \"t_*.outbox\"\n[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n"
    ))?;
    let env = [("OUTBOX_LEADER_LEASE", "2s")];
    let first = start_with_config(&db, &config, &env).await?;
    let first_addr = wait_admin(&first).await?;
    wait_roles(&first_addr, "active", 2).await?;
    let second = start_with_config(&db, &config, &env).await?;
    let second_addr = wait_admin(&second).await?;
    wait_roles(&second_addr, "standby", 2).await?;
    // Ready once its pipelines passed their start-up checks, while standing by.
    assert_eq!(
        wait_for_status(&second_addr, "/readyz", 200, LONG).await?,
        200
    );
    let (_, body) = http_get(&second_addr, "/readyz").await?;
    assert!(body.contains("2 tables, 0 active"), "{body}");

    first.kill9().await?;
    let mut written = BTreeMap::new();
    for (i, t) in tables.iter().enumerate() {
        for (k, v) in write_events(&db, t, "Acct", 2, 5).await? {
            written.insert(format!("{i}/{k}"), v);
        }
    }
    for t in tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    wait_roles(&second_addr, "active", 2).await?;
    let records = consume(&[topic.as_str()], 20, QUIET, LONG).await?;
    let ids: BTreeSet<Uuid> = records.iter().map(Consumed::event_id).collect();
    let expected: BTreeSet<Uuid> = written.values().flatten().copied().collect();
    assert_eq!(ids, expected);
    stop_cleanly(second).await?;
    Ok(())
}

/// Waits until `/status` lists `count` tables, every one with `role`.
async fn wait_roles(addr: &str, role: &str, count: usize) -> Result<()> {
    let deadline = Instant::now() + LONG;
    loop {
        let (code, body) = http_get(addr, "/status").await?;
        if code == 200 {
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let roles: Vec<&str> = v["tables"]
                .as_array()
                .map(|t| t.iter().filter_map(|t| t["role"].as_str()).collect())
                .unwrap_or_default();
            if roles.len() == count && roles.iter().all(|r| *r == role) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{addr}: never {count} tables {role}: {code} {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (c): one table with a backlog of 20,000 events and one with a few: the few are published
/// while the backlog is still being drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_table_does_not_starve_a_quiet_one() -> Result<()> {
    let db = TestDb::create("mt_fair").await?;
    let tag = unique("mtf");
    migrate_table(&db, "big.outbox").await?;
    migrate_table(&db, "small.outbox").await?;
    create_topic(&format!("{tag}.Bulk"), 3).await?;
    create_topic(&format!("{tag}.Few"), 1).await?;
    for _ in 0..20 {
        write_events(&db, "big.outbox", "Bulk", 1000, 1).await?;
    }
    let config = config_file(&format!(
        "[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n[[outbox]]\ntable = \"big.outbox\"\n[[outbox]]\ntable = \"small.outbox\"\n"
    ))?;
    let relay = start_with_config(&db, &config, &[("OUTBOX_BATCH_SIZE", "100")]).await?;
    // The backlog is being drained…
    let deadline = Instant::now() + LONG;
    while pending(&db, "big.outbox").await? == 20_000 {
        ensure!(
            Instant::now() < deadline,
            "the backlog never started draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // …when a few events arrive in the other table.
    write_events(&db, "small.outbox", "Few", 5, 1).await?;
    wait_table_drained(&db, "small.outbox", LONG).await?;
    let backlog_left = pending(&db, "big.outbox").await?;
    assert!(
        backlog_left > 0,
        "the quiet table's events waited for the whole backlog"
    );
    eprintln!("quiet table drained with {backlog_left} backlog events left");
    wait_table_drained(&db, "big.outbox", LONG).await?;
    stop_cleanly(relay).await?;
    Ok(())
}

/// A listed table that cannot be relayed (missing) stops the relay loudly, naming the table,
/// after the other pipelines drained, and `migrate` with the same configuration creates it; a
/// pattern matching more tables than `max_tables` stops the relay naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelayable_table_and_too_many_matches_stop_the_relay_naming_them() -> Result<()> {
    let db = TestDb::create("mt_fail").await?;
    migrate_table(&db, "good.outbox").await?;
    let config =
        config_file("[[outbox]]\ntable = \"good.outbox\"\n[[outbox]]\ntable = \"late_outbox\"\n")?;
    let relay = start_with_config(&db, &config, &[]).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("outbox table late_outbox"), "{log}");
    assert!(
        log.contains("relay stopped: a table's pipeline failed"),
        "{log}"
    );

    // `migrate` with the same configuration migrates every listed table; then both relay.
    let path = config.to_str().context("a UTF-8 path")?;
    let out = relay_cli_on(&db, &["migrate", "--config", path], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    let relay = start_with_config(&db, &config, &[]).await?;
    let late = write_events(&db, "late_outbox", "Late", 2, 2).await?;
    wait_table_drained(&db, "late_outbox", LONG).await?;
    assert_eq!(late.values().map(Vec::len).sum::<usize>(), 4);
    stop_cleanly(relay).await?;

    for t in ["t_1.outbox", "t_2.outbox", "t_3.outbox"] {
        migrate_table(&db, t).await?;
    }
    let config = config_file("tables = \"t_*.outbox\"\nmax_tables = 2\n")?;
    let relay = start_with_config(&db, &config, &[]).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("max_tables"), "{log}");
    Ok(())
}

/// (e): configuration errors name the key and exit with 2 before anything connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_name_the_key() -> Result<()> {
    let cases = [
        (
            "[[outbox]]\ntable = \"a.outbox\"\n[[outbox]]\ntable = \"b.outbox\"\n[[outbox]]\ntable = \"a.outbox\"\n",
            "outbox[2].table",
            "already listed",
        ),
        (
            "[[outbox]]\ntable = \"a.outbox\"\n[[outbox]]\ntable = \"b.out-box\"\n",
            "outbox[1].table",
            "",
        ),
        (
            "max_tables = 2\n[[outbox]]\ntable = \"a\"\n[[outbox]]\ntable = \"b\"\n[[outbox]]\ntable = \"c\"\n",
            "max_tables",
            "max_tables = 2",
        ),
        // Several tables share one slot with the logical source (tests/tests/multi_table_logical.rs);
        // only events written as logical messages cannot.
        (
            "source = \"logical\"\n[[outbox]]\ntable = \"a\"\n[[outbox]]\ntable = \"b\"\nwrite_mode = \"logical_message\"\n",
            "outbox[1].write_mode",
            "names no table",
        ),
        (
            "source = \"logical\"\nwrite_mode = \"logical_message\"\ntables = \"tenant_*.outbox\"\n",
            "write_mode",
            "names no table",
        ),
        ("tables = \"tenant_*\"\n", "tables", "<schema glob>.<table>"),
        (
            "[[outbox]]\ntable = \"a\"\nwrite_mode = \"insert_delete\"\n",
            "outbox[0].write_mode",
            "logical",
        ),
        (
            "table = \"x\"\n[[outbox]]\ntable = \"a\"\n",
            "table",
            "not both",
        ),
    ];
    for (text, key, says) in cases {
        let path = config_file(text)?;
        let out = relay_cli(
            &["config", "validate", "--config", path.to_str().unwrap()],
            &[],
        )
        .await?;
        assert_eq!(out.code, 2, "{text}: {}", out.text());
        assert!(
            out.stderr.contains(&format!("`{key}`")),
            "{text}: wanted `{key}` in {}",
            out.stderr
        );
        assert!(out.stderr.contains(says), "{text}: {}", out.stderr);
    }
    // Commands that act on one table need --table with several, instead of acting on the
    // default `outbox`; refused before anything connects.
    for args in [
        &["replay", "--from", "1h"][..],
        &["parked", "retry", "--all"],
        &["parked", "drop", "--all"],
    ] {
        let out = relay_cli(args, &[("OUTBOX_TABLES", "tenant_*.outbox")]).await?;
        assert_eq!(out.code, 2, "{args:?}: {}", out.text());
        assert!(
            out.stderr.contains("pass --table") && out.stderr.contains("`tenant_*.outbox`"),
            "{args:?}: {}",
            out.stderr
        );
    }
    let out = relay_cli(
        &["config", "validate"],
        &[("OUTBOX_TABLES", "tenant_*.out;box")],
    )
    .await?;
    assert_eq!(out.code, 2, "{}", out.text());
    assert!(out.stderr.contains("`tables`"), "{}", out.stderr);
    Ok(())
}

/// Commits `events` into `table` in one transaction; their ids.
async fn commit_into(db: &TestDb, table: &str, events: Vec<NewEvent>) -> Result<Vec<Uuid>> {
    let outbox = Outbox::new(OutboxTable::parse(table)?);
    let mut tx = db.pool.begin().await?;
    let ids = outbox.publish_new(&mut tx, events).await?;
    tx.commit().await?;
    Ok(ids)
}

/// `parked list --json` with `args` added: (table, id) of every parked event listed.
async fn parked(db: &TestDb, args: &[&str]) -> Result<Vec<(String, String)>> {
    let mut all = vec!["parked", "list", "--json"];
    all.extend_from_slice(args);
    let out = relay_cli_on(db, &all, &[]).await?;
    ensure!(out.code == 0, "parked list: {}", out.text());
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r["table"].as_str().unwrap_or_default().to_owned(),
                r["id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// `parked list|retry|drop`, `replay` and `topics ensure` with two `[[outbox]]` tables: the list
/// shows each table's parked events, retry and drop with `--table` act on that table only (retry
/// through that table's route), replay with `--table` republishes that table's range onto its own
/// topic, and a missing or unknown `--table` is refused naming the configured tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_act_on_the_table_named_by_table() -> Result<()> {
    let db = TestDb::create("mt_ops").await?;
    let tag = unique("mto");
    for t in ["alpha.outbox", "beta.outbox"] {
        migrate_table(&db, t).await?;
    }
    let alpha_topic = format!("{tag}.alpha.Acct");
    let beta_topic = format!("{tag}.beta.Acct");
    let config = config_file(&format!(
        r#"
        [[outbox]]
        table = "alpha.outbox"
        [outbox.route]
        topic = "{tag}.alpha.{{aggregatetype}}"

        [[outbox]]
        table = "beta.outbox"
        [outbox.route]
        topic = "{tag}.beta.{{aggregatetype}}"
        "#
    ))?;
    let path = config.to_str().context("a UTF-8 path")?;

    // `topics ensure` creates every table's routed topics (read from each table's events).
    commit_into(&db, "alpha.outbox", vec![padded_event("Acct", "a", 1, 10)]).await?;
    commit_into(&db, "beta.outbox", vec![padded_event("Acct", "b", 1, 10)]).await?;
    let out = relay_cli_on(
        &db,
        &[
            "topics",
            "ensure",
            "--replication-factor",
            "1",
            "--config",
            path,
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code, 0, "{}", out.text());
    for t in [&alpha_topic, &beta_topic] {
        assert!(
            out.stdout.contains(&format!("created  {t}")),
            "{t}: {}",
            out.stdout
        );
    }

    // A producer limit stands in for a broker refusing large records: one poison event per
    // table is parked.
    let relay = start_with_config(
        &db,
        &config,
        &[(
            "OUTBOX_KAFKA_PROPERTIES",
            "message.max.bytes=20000,batch.size=20000",
        )],
    )
    .await?;
    let alpha_poison = commit_into(
        &db,
        "alpha.outbox",
        vec![padded_event("Acct", "p", 1, 30_000)],
    )
    .await?[0]
        .to_string();
    let beta_poison = commit_into(
        &db,
        "beta.outbox",
        vec![padded_event("Acct", "q", 1, 30_000)],
    )
    .await?[0]
        .to_string();
    let deadline = Instant::now() + LONG;
    let listed = loop {
        let listed = parked(&db, &["--config", path]).await?;
        if listed.len() == 2 || Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop_cleanly(relay).await?;
    let expected = vec![
        ("alpha.outbox".to_owned(), alpha_poison.clone()),
        ("beta.outbox".to_owned(), beta_poison.clone()),
    ];
    assert_eq!(
        listed, expected,
        "every table's parked events, with their table"
    );
    let out = relay_cli_on(&db, &["parked", "list", "--config", path], &[]).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout
            .contains(&format!("alpha.outbox  {alpha_poison}"))
            && out.stdout.contains(&format!("beta.outbox  {beta_poison}")),
        "{}",
        out.stdout
    );
    let alpha_only = parked(&db, &["--table", "alpha.outbox", "--config", path]).await?;
    assert_eq!(alpha_only, vec![(String::new(), alpha_poison.clone())]);

    // Without --table, retry and drop name the configured tables and change nothing.
    for action in ["retry", "drop"] {
        let out = relay_cli_on(&db, &["parked", action, "--all", "--config", path], &[]).await?;
        assert_eq!(out.code, 2, "{action}: {}", out.text());
        assert!(
            out.stderr.contains("pass --table")
                && out.stderr.contains("`alpha.outbox`")
                && out.stderr.contains("`beta.outbox`"),
            "{action}: {}",
            out.stderr
        );
    }
    // An unknown table is refused too.
    let out = relay_cli_on(
        &db,
        &[
            "parked",
            "drop",
            "--all",
            "--table",
            "gamma.outbox",
            "--config",
            path,
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code, 2, "{}", out.text());
    assert!(
        out.stderr
            .contains("`gamma.outbox` is not one of the configured outbox tables"),
        "{}",
        out.stderr
    );
    assert_eq!(parked(&db, &["--config", path]).await?, expected);

    // Retry on alpha publishes alpha's poison event on alpha's topic; beta's stays parked.
    let out = relay_cli_on(
        &db,
        &[
            "parked",
            "retry",
            "--all",
            "--table",
            "alpha.outbox",
            "--config",
            path,
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout.contains("republished 1 parked events"),
        "{}",
        out.stdout
    );
    assert_eq!(
        parked(&db, &["--config", path]).await?,
        vec![("beta.outbox".to_owned(), beta_poison.clone())]
    );
    let alpha_records = consume(&[alpha_topic.as_str()], 2, QUIET, LONG).await?;
    let alpha_ids: Vec<String> = alpha_records
        .iter()
        .map(|r| r.event_id().to_string())
        .collect();
    assert_eq!(alpha_ids.len(), 2, "{alpha_ids:?}");
    assert!(alpha_ids.contains(&alpha_poison), "{alpha_ids:?}");

    // Drop on beta removes beta's only.
    let out = relay_cli_on(
        &db,
        &[
            "parked",
            "drop",
            "--all",
            "--table",
            "beta.outbox",
            "--config",
            path,
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout.contains("dropped 1 parked events"),
        "{}",
        out.stdout
    );
    assert!(parked(&db, &["--config", path]).await?.is_empty());

    // Replay of beta's range republishes beta's event onto beta's topic, alpha's untouched.
    let beta_before = consume(&[beta_topic.as_str()], 1, QUIET, LONG).await?;
    let beta_first: Vec<Uuid> = beta_before.iter().map(|r| r.event_id()).collect();
    assert_eq!(beta_first.len(), 1, "{beta_first:?}");
    let first = beta_first[0].to_string();
    let out = relay_cli_on(
        &db,
        &[
            "replay",
            "--from-id",
            &first,
            "--to-id",
            &first,
            "--table",
            "beta.outbox",
            "--config",
            path,
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(out.stdout.contains("replayed 1 events"), "{}", out.stdout);
    let beta_after: Vec<Uuid> = consume(&[beta_topic.as_str()], 2, QUIET, LONG)
        .await?
        .iter()
        .map(|r| r.event_id())
        .collect();
    assert_eq!(
        beta_after,
        vec![beta_first[0], beta_first[0]],
        "original id, replayed"
    );
    assert_eq!(
        consume(&[alpha_topic.as_str()], 2, QUIET, LONG)
            .await?
            .len(),
        2
    );
    let out = relay_cli_on(&db, &["replay", "--from", "1h", "--config", path], &[]).await?;
    assert_eq!(out.code, 2, "{}", out.text());
    assert!(out.stderr.contains("pass --table"), "{}", out.stderr);
    Ok(())
}

/// With a `tables` pattern, `--table` accepts a migrated table matching it and refuses one that
/// matches but does not exist, and one outside the pattern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_selection_under_a_pattern_checks_the_table_exists_and_matches() -> Result<()> {
    let db = TestDb::create("mt_ops_pattern").await?;
    for t in ["tenant_a.outbox", "other.outbox"] {
        migrate_table(&db, t).await?;
    }
    let env = [("OUTBOX_TABLES", "tenant_*.outbox")];
    let out = relay_cli_on(&db, &["parked", "list", "--table", "tenant_a.outbox"], &env).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(out.stdout.contains("no parked events"), "{}", out.stdout);
    let out = relay_cli_on(
        &db,
        &["parked", "list", "--table", "tenant_zz.outbox"],
        &env,
    )
    .await?;
    assert_eq!(out.code, 2, "{}", out.text());
    assert!(
        out.stderr
            .contains("matches the `tables` pattern `tenant_*.outbox`")
            && out.stderr.contains("not a migrated outbox table"),
        "{}",
        out.stderr
    );
    let out = relay_cli_on(&db, &["parked", "list", "--table", "other.outbox"], &env).await?;
    assert_eq!(out.code, 2, "{}", out.text());
    assert!(
        out.stderr
            .contains("`other.outbox` is not one of the configured outbox tables")
            && out.stderr.contains("the tables matching `tenant_*.outbox`"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// The relay's sessions on `db` right now, by `application_name` (`""` for the unnamed ones:
/// start-up checks, the admin endpoint, the pattern rescan); the test's own are left out.
async fn relay_sessions(pool: &sqlx::PgPool, database: &str) -> Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity
         WHERE datname = $1 AND backend_type = 'client backend'
           AND application_name IS DISTINCT FROM $2
         GROUP BY 1",
    )
    .bind(database)
    .bind(outbox_tests::database::TEST_SESSIONS)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Samples [`relay_sessions`] every 10 ms until `stop` fires; returns the most sessions seen at
/// once of each name and in all.
async fn peak_sessions(
    pool: sqlx::PgPool,
    database: String,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(BTreeMap<String, i64>, i64, usize)> {
    let mut peak: BTreeMap<String, i64> = BTreeMap::new();
    let mut total = 0;
    let mut samples = 0;
    while !stop.is_cancelled() {
        let now = relay_sessions(&pool, &database).await?;
        total = total.max(now.values().sum());
        for (name, n) in now {
            let p = peak.entry(name).or_default();
            *p = (*p).max(n);
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((peak, total, samples))
}

/// The sessions bound of docs/operations.md for `tables` tables and `pool_size`: a leader
/// session per table, the shared pool, the shared LISTEN session, and at most three short or
/// small ones (the admin endpoint's two, the pattern rescan's one).
fn session_bound(tables: usize, pool_size: usize) -> i64 {
    (tables + pool_size + 1 + 3) as i64
}

/// (a) Twenty tables with a shared pool of two sessions: every event of every table is
/// delivered exactly once and in per-aggregate order, and the relay never holds more sessions
/// than one leader session per table, the pool, the shared LISTEN session and the admin
/// endpoint's — sampled from `pg_stat_activity` from before start-up until the last table
/// drained (with a pool per table the acknowledgement and LISTEN sessions alone were three per
/// table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tables_share_one_session_budget_and_lose_nothing() -> Result<()> {
    const TABLES: usize = 20;
    const POOL: usize = 2;
    let db = TestDb::create("mt_budget").await?;
    let tag = unique("mtb");
    let tables: Vec<String> = (0..TABLES).map(|i| format!("bud_{i:02}.outbox")).collect();
    for t in &tables {
        migrate_table(&db, t).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 3).await?;
    let config = config_file(&format!(
        "tables = \"bud_*.outbox\"\npool_size = {POOL}\n[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n"
    ))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn(peak_sessions(
        db.pool.clone(),
        db.name.clone(),
        stop.clone(),
    ));
    let relay = start_with_config(&db, &config, &[("OUTBOX_BATCH_SIZE", "20")]).await?;
    let addr = wait_admin(&relay).await?;
    wait_roles(&addr, "active", TABLES).await?;
    // Every table gets a backlog at once, so all of them drain (and acknowledge) together.
    let mut written = Vec::new();
    for t in &tables {
        written.push(write_events(&db, t, "Acct", 3, 20).await?);
    }
    for t in &tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    stop.cancel();
    let (peak, total, samples) = sampler.await??;
    eprintln!("peak relay sessions over {samples} samples: {total} in all, {peak:?}");
    ensure!(
        samples > 10,
        "too few samples ({samples}) to prove anything"
    );
    let named = |n: &str| peak.get(n).copied().unwrap_or(0);
    assert_eq!(
        named("outbox-relay"),
        TABLES as i64,
        "one leader session per table"
    );
    assert!(
        named("outbox-relay-ack") <= POOL as i64,
        "acknowledgements over the shared pool of {POOL}: {peak:?}"
    );
    assert!(
        named("outbox-relay-ack") >= 1,
        "the rows were acknowledged on the pool: {peak:?}"
    );
    assert!(
        named("outbox-relay-listen") <= 1,
        "one shared LISTEN session: {peak:?}"
    );
    assert!(
        total <= session_bound(TABLES, POOL),
        "{total} sessions at once, above the documented bound {}: {peak:?}",
        session_bound(TABLES, POOL)
    );

    let records = consume(&[topic.as_str()], TABLES * 60, QUIET, LONG).await?;
    for (t, w) in tables.iter().zip(&written) {
        let ids: BTreeSet<Uuid> = w.values().flatten().copied().collect();
        let mine: Vec<Consumed> = records
            .iter()
            .filter(|r| ids.contains(&r.event_id()))
            .cloned()
            .collect();
        check_exact_and_ordered(&mine, w, t)?;
    }
    assert_eq!(records.len(), TABLES * 60, "nothing else, no duplicates");
    stop_cleanly(relay).await?;
    Ok(())
}

/// (b) Fairness under the smallest budget: with one pooled session for every table's
/// acknowledgements, a table draining a backlog of 20,000 events does not keep five quiet
/// tables waiting — their few events, written once the backlog is draining, are all published
/// while most of it is still unpublished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_table_does_not_starve_the_others_of_a_one_session_pool() -> Result<()> {
    let db = TestDb::create("mt_fair_pool").await?;
    let tag = unique("mtq");
    let quiet: Vec<String> = (0..5).map(|i| format!("quiet_{i}.outbox")).collect();
    migrate_table(&db, "busy.outbox").await?;
    for t in &quiet {
        migrate_table(&db, t).await?;
    }
    create_topic(&format!("{tag}.Bulk"), 3).await?;
    create_topic(&format!("{tag}.Few"), 1).await?;
    for _ in 0..20 {
        write_events(&db, "busy.outbox", "Bulk", 1000, 1).await?;
    }
    let mut config = format!(
        "pool_size = 1\n[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n[[outbox]]\ntable = \"busy.outbox\"\n"
    );
    for t in &quiet {
        config.push_str(&format!("[[outbox]]\ntable = \"{t}\"\n"));
    }
    let config = config_file(&config)?;
    let relay = start_with_config(&db, &config, &[("OUTBOX_BATCH_SIZE", "100")]).await?;
    let deadline = Instant::now() + LONG;
    while pending(&db, "busy.outbox").await? == 20_000 {
        ensure!(
            Instant::now() < deadline,
            "the backlog never started draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut written = Vec::new();
    for t in &quiet {
        written.push(write_events(&db, t, "Few", 2, 3).await?);
    }
    for t in &quiet {
        wait_table_drained(&db, t, LONG).await?;
    }
    let backlog_left = pending(&db, "busy.outbox").await?;
    eprintln!("the quiet tables drained with {backlog_left} backlog events left");
    assert!(
        backlog_left > 0,
        "the quiet tables' events waited for the whole backlog"
    );
    wait_table_drained(&db, "busy.outbox", LONG).await?;
    let few = format!("{tag}.Few");
    let records = consume(&[few.as_str()], 30, QUIET, LONG).await?;
    for (t, w) in quiet.iter().zip(&written) {
        let ids: BTreeSet<Uuid> = w.values().flatten().copied().collect();
        let mine: Vec<Consumed> = records
            .iter()
            .filter(|r| ids.contains(&r.event_id()))
            .cloned()
            .collect();
        check_exact_and_ordered(&mine, w, t)?;
    }
    stop_cleanly(relay).await?;
    Ok(())
}

/// librdkafka clients in process `pid`: every client runs exactly one thread named `rdk:main`.
fn kafka_clients(pid: u32) -> Result<usize> {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "rdk:main" {
            n += 1;
        }
    }
    Ok(n)
}

/// (c) One producer for the whole relay: ten tables publish through a single librdkafka
/// producer (plus the one idle probe) — a producer per table would be twenty clients — and each
/// table's delivery results still reach that table: every event of every table is delivered,
/// and the per-table `published` metric counts exactly that table's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tables_of_a_relay_share_one_kafka_producer() -> Result<()> {
    const TABLES: usize = 10;
    let db = TestDb::create("mt_producer").await?;
    let tag = unique("mtk");
    let tables: Vec<String> = (0..TABLES).map(|i| format!("prod_{i}.outbox")).collect();
    for t in &tables {
        migrate_table(&db, t).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 3).await?;
    let (relay, addr, _) = start_relay(
        &db,
        &format!("tables = \"prod_*.outbox\"\n[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n"),
        &[("OUTBOX_BATCH_SIZE", "10")],
    )
    .await?;
    wait_roles(&addr, "active", TABLES).await?;
    let mut written = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        // A different number of events per table, so a result credited to the wrong table shows.
        written.push(write_events(&db, t, "Acct", 2, i + 1).await?);
    }
    for t in &tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    let clients = kafka_clients(relay.child.pid())?;
    assert_eq!(
        clients, 2,
        "one shared producer and one shared idle probe for {TABLES} tables"
    );
    let scrape = http_get(&addr, "/metrics").await?.1;
    for (i, t) in tables.iter().enumerate() {
        assert_eq!(
            table_metric(&scrape, "outbox_relay_events_published_total", t),
            Some((2 * (i + 1)) as f64),
            "{t}: its own deliveries only"
        );
    }
    let total: usize = written
        .iter()
        .map(|w| w.values().map(Vec::len).sum::<usize>())
        .sum();
    let records = consume(&[topic.as_str()], total, QUIET, LONG).await?;
    for (t, w) in tables.iter().zip(&written) {
        let ids: BTreeSet<Uuid> = w.values().flatten().copied().collect();
        let mine: Vec<Consumed> = records
            .iter()
            .filter(|r| ids.contains(&r.event_id()))
            .cloned()
            .collect();
        check_exact_and_ordered(&mine, w, t)?;
    }
    stop_cleanly(relay).await?;
    Ok(())
}

/// Failures stay per table with one producer: while five tables drain, two tables' leader
/// sessions and every pooled acknowledgement session are terminated. The pipelines that lost
/// their session or their acknowledgements wait for their own records in the shared producer,
/// rewind and take their tables back; every event of every table is delivered, none lost, each
/// aggregate's events first arriving in write order, and the relay keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_losing_its_sessions_recovers_through_the_shared_producer_without_loss()
-> Result<()> {
    const TABLES: usize = 5;
    let db = TestDb::create("mt_shared_fail").await?;
    let tag = unique("mtx");
    let tables: Vec<String> = (0..TABLES).map(|i| format!("fail_{i}.outbox")).collect();
    for t in &tables {
        migrate_table(&db, t).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 3).await?;
    let mut written = Vec::new();
    for t in &tables {
        written.push(write_events(&db, t, "Acct", 100, 10).await?);
    }
    let config = config_file(&format!(
        "tables = \"fail_*.outbox\"\npool_size = 2\n[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n"
    ))?;
    let relay = start_with_config(
        &db,
        &config,
        &[("OUTBOX_BATCH_SIZE", "20"), ("OUTBOX_LEADER_LEASE", "2s")],
    )
    .await?;
    let deadline = Instant::now() + LONG;
    while pending(&db, &tables[0]).await? == 1000 {
        ensure!(
            Instant::now() < deadline,
            "the tables never started draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
           SELECT pg_terminate_backend(pid) FROM (
             (SELECT pid FROM pg_stat_activity
               WHERE datname = $1 AND application_name = 'outbox-relay' LIMIT 2)
             UNION ALL
             (SELECT pid FROM pg_stat_activity
               WHERE datname = $1 AND application_name = 'outbox-relay-ack')) s) k",
    )
    .bind(&db.name)
    .fetch_one(&db.pool)
    .await?;
    ensure!(terminated >= 2, "only {terminated} sessions terminated");
    for t in &tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    let records = consume(&[topic.as_str()], TABLES * 1000, QUIET, LONG).await?;
    for (t, w) in tables.iter().zip(&written) {
        let ids: BTreeSet<Uuid> = w.values().flatten().copied().collect();
        let mine: Vec<Consumed> = records
            .iter()
            .filter(|r| ids.contains(&r.event_id()))
            .cloned()
            .collect();
        check_complete_and_ordered(&mine, w, t)?;
    }
    eprintln!(
        "{terminated} sessions terminated; {} records for {} events",
        records.len(),
        TABLES * 1000
    );
    stop_cleanly(relay).await?;
    Ok(())
}
