//! Many outbox tables in one relay with the logical source: one replication slot and one
//! publication carry every table, one reader hands each table's events to that table's pipeline
//! (its own routing, metrics and status), a new tenant's table is added to the publication by the
//! re-scan, a SIGKILL and restart lose nothing, and a table that leaves the publication stops the
//! relay naming it. See `outbox_relay::source::logical::multi` and docs/operations.md, "Many
//! tables per relay". Every test has its own database, slot, schemas and topics.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outbox_tests::tables::*;
use outbox_tests::*;
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(1500);

/// The `[logical]` section and `source` of a test relay on slot `slot`.
fn logical_toml(slot: &str) -> String {
    format!(
        "source = \"logical\"\ntables_rescan_interval = \"1s\"\n\
         [logical]\nslot = \"{slot}\"\npublication = \"{slot}_pub\"\n\
         heartbeat_interval = \"500ms\"\nstatus_interval = \"200ms\"\n"
    )
}

/// The replication slots of the test's database.
async fn slots(db: &TestDb) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database() \
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await?)
}

/// The publications of the test's database.
async fn publications(db: &TestDb) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT pubname::text FROM pg_publication ORDER BY 1")
            .fetch_all(&db.pool)
            .await?,
    )
}

/// `schema.table` of every member of `publication`.
async fn members(db: &TestDb, publication: &str) -> Result<BTreeSet<String>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
    )
    .bind(publication)
    .fetch_all(&db.pool)
    .await?;
    Ok(rows.into_iter().map(|(s, t)| format!("{s}.{t}")).collect())
}

/// Waits until `table` is a member of `publication`.
async fn wait_member(db: &TestDb, publication: &str, table: &str) -> Result<()> {
    let deadline = Instant::now() + LONG;
    loop {
        let m = members(db, publication).await?;
        if m.contains(table) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{table} never joined {publication}: {m:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the slot is streamed to (its walsender active).
async fn wait_slot_active(db: &TestDb, slot: &str) -> Result<()> {
    let deadline = Instant::now() + LONG;
    loop {
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(&db.pool)
                .await?;
        if active == Some(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("slot {slot} never became active");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `records` with their keys prefixed by their table (`schema.table/agg-0`), found from the ids
/// `written` (keyed the same way): the aggregate ids are the same in every table.
fn keyed_by_table(records: &[Consumed], written: &BTreeMap<String, Vec<Uuid>>) -> Vec<Consumed> {
    let table_of: BTreeMap<Uuid, &str> = written
        .iter()
        .flat_map(|(k, ids)| {
            let t = k.split('/').next().unwrap_or_default();
            ids.iter().map(move |id| (*id, t))
        })
        .collect();
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            let t = table_of.get(&r.event_id()).copied().unwrap_or_default();
            r.key = Some(format!("{t}/{}", r.key.clone().unwrap_or_default()));
            r
        })
        .collect()
}

/// Three `[[outbox]]` tables with their own topics, written concurrently on ten aggregates each:
/// every event reaches its table's topic exactly once and in per-aggregate order, through one slot
/// and one publication `FOR TABLE` the three; metrics and status are per table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_tables_share_one_slot_and_arrive_exactly_once_in_order() -> Result<()> {
    let db = TestDb::create("mtl_list").await?;
    let tag = unique("mtl");
    let slot = unique("mtl_slot");
    let tables = ["billing.outbox", "shipping.outbox", "audit.outbox"];
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
    let mut toml = logical_toml(&slot);
    for (t, short) in tables.iter().zip(["billing", "shipping", "audit"]) {
        toml.push_str(&format!(
            "[[outbox]]\ntable = \"{t}\"\n[outbox.route]\ntopic = \"{tag}.{short}.{{aggregatetype}}\"\n"
        ));
    }
    let (relay, addr, _) = start_relay(&db, &toml, &[("OUTBOX_BATCH_SIZE", "50")]).await?;
    wait_slot_active(&db, &slot).await?;

    let (a, b, c) = tokio::try_join!(
        write_events(&db, tables[0], "Acct", 10, 20),
        write_events(&db, tables[1], "Acct", 10, 20),
        write_events(&db, tables[2], "Acct", 10, 20),
    )?;
    let written = [a, b, c];
    for t in tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    for (i, topic) in topics.iter().enumerate() {
        let records = consume(&[topic.as_str()], 200, QUIET, LONG).await?;
        check_exact_and_ordered(&records, &written[i], topic)?;
    }

    // One slot, one publication, every table in it.
    assert_eq!(slots(&db).await?, vec![slot.clone()]);
    let publication = format!("{slot}_pub");
    assert_eq!(publications(&db).await?, vec![publication.clone()]);
    assert_eq!(
        members(&db, &publication).await?,
        tables.iter().map(|t| (*t).to_owned()).collect()
    );

    // Per-table figures and status.
    let (code, scrape) = http_get(&addr, "/metrics").await?;
    assert_eq!(code, 200, "{scrape}");
    for t in tables {
        assert_eq!(
            table_metric(&scrape, "outbox_relay_events_published_total", t),
            Some(200.0),
            "{t}\n{scrape}"
        );
    }
    let (code, body) = http_get(&addr, "/status").await?;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(status["tables"].as_array().map(Vec::len), Some(3), "{body}");
    for t in status["tables"].as_array().unwrap() {
        assert_eq!(t["role"], "active", "{body}");
        assert_eq!(t["published_by_this_instance"], 200, "{body}");
    }
    let log = stop_cleanly(relay).await?;
    assert!(log.contains("opening the slot for every table"), "{log}");
    // A clean stop made the slot's position durable: nothing is sent again by the next start.
    let (relay, _, _) = start_relay(&db, &toml, &[]).await?;
    wait_slot_active(&db, &slot).await?;
    tokio::time::sleep(QUIET).await;
    for (i, topic) in topics.iter().enumerate() {
        let records = consume(&[topic.as_str()], 200, QUIET, LONG).await?;
        check_exact_and_ordered(&records, &written[i], topic)?;
    }
    stop_cleanly(relay).await?;
    Ok(())
}

/// A `tenant_*.outbox` pattern: the tenants' tables share one slot; a tenant created while the
/// relay runs joins the publication at the next re-scan and its events are relayed; the relay is
/// SIGKILLed in the middle of the writes and started again: every event of every table arrives,
/// each aggregate's first in write order, and the duplicates stay within what was in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_adds_a_new_tenant_to_the_publication_and_a_kill_loses_nothing() -> Result<()> {
    let db = TestDb::create("mtl_pattern").await?;
    let tag = unique("mtlp");
    let slot = unique("mtlp_slot");
    let publication = format!("{slot}_pub");
    for t in ["tenant_a.outbox", "tenant_b.outbox", "other.outbox"] {
        migrate_table(&db, t).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 3).await?;
    let toml = format!(
        "tables = \"tenant_*.outbox\"\n{}[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n",
        logical_toml(&slot)
    );
    let env = [("OUTBOX_BATCH_SIZE", "20"), ("OUTBOX_LEADER_LEASE", "2s")];
    let (relay, _, config) = start_relay(&db, &toml, &env).await?;
    wait_slot_active(&db, &slot).await?;
    assert_eq!(
        members(&db, &publication).await?,
        ["tenant_a.outbox", "tenant_b.outbox"]
            .map(str::to_owned)
            .into()
    );

    let mut written: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    let mut merge = |table: &str, w: BTreeMap<String, Vec<Uuid>>| {
        for (k, v) in w {
            written.entry(format!("{table}/{k}")).or_default().extend(v);
        }
    };
    let (a, b) = tokio::try_join!(
        write_rounds(&db, "tenant_a.outbox", "Acct", 5, 1..=10),
        write_rounds(&db, "tenant_b.outbox", "Acct", 5, 1..=10),
    )?;
    merge("tenant_a.outbox", a);
    merge("tenant_b.outbox", b);

    // A new tenant: picked up by the re-scan, added to the publication, relayed.
    migrate_table(&db, "tenant_c.outbox").await?;
    wait_member(&db, &publication, "tenant_c.outbox").await?;
    relay
        .wait_for_log("added to the slot's publication", LONG)
        .await?;
    let c = write_rounds(&db, "tenant_c.outbox", "Acct", 5, 1..=10).await?;
    merge("tenant_c.outbox", c);
    for t in ["tenant_a.outbox", "tenant_b.outbox", "tenant_c.outbox"] {
        wait_table_drained(&db, t, LONG).await?;
    }

    // SIGKILL while the three tenants write; a new relay on the same slot finishes the job.
    let writers = async {
        tokio::try_join!(
            write_rounds(&db, "tenant_a.outbox", "Acct", 5, 11..=60),
            write_rounds(&db, "tenant_b.outbox", "Acct", 5, 11..=60),
            write_rounds(&db, "tenant_c.outbox", "Acct", 5, 11..=60),
        )
    };
    let kill = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        relay.kill9().await
    };
    let (written_late, killed_log) = tokio::join!(writers, kill);
    let (a, b, c) = written_late?;
    let killed_log = killed_log?;
    merge("tenant_a.outbox", a);
    merge("tenant_b.outbox", b);
    merge("tenant_c.outbox", c);
    let relay = start_with_config(&db, &config, &env).await?;
    wait_admin(&relay).await?;
    for t in ["tenant_a.outbox", "tenant_b.outbox", "tenant_c.outbox"] {
        wait_table_drained(&db, t, LONG).await?;
    }
    let total: usize = written.values().map(Vec::len).sum();
    assert_eq!(total, 3 * 5 * 60);
    let records = consume(&[topic.as_str()], total, QUIET, LONG).await?;
    let keyed = keyed_by_table(&records, &written);
    check_complete_and_ordered(&keyed, &written, &topic)?;
    let unique_ids: BTreeSet<Uuid> = records.iter().map(Consumed::event_id).collect();
    ensure!(
        unique_ids.len() == total,
        "{} distinct events for {total} written",
        unique_ids.len()
    );
    let duplicates = records.len() - total;
    // What was in flight at the kill: the hub's window (batch × (batches in flight + 1) ×
    // tables) plus one status interval of acknowledged events.
    ensure!(
        duplicates <= 3 * 20 * 5 + 200,
        "{duplicates} duplicates after one SIGKILL"
    );
    eprintln!("duplicates after the SIGKILL: {duplicates} of {total} events");
    assert_eq!(slots(&db).await?, vec![slot.clone()]);
    assert_eq!(publications(&db).await?, vec![publication.clone()]);
    assert!(
        !members(&db, &publication).await?.contains("other.outbox"),
        "a table outside the pattern is not published"
    );
    drop(killed_log);
    stop_cleanly(relay).await?;
    Ok(())
}

/// The slot is the unit of leadership: a second relay with the same configuration stands by for
/// the slot (it opens nothing), and when the first is SIGKILLed it takes over every table; every
/// event written meanwhile arrives, each aggregate's in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relay_takes_over_the_slot_of_a_killed_one() -> Result<()> {
    let db = TestDb::create("mtl_standby").await?;
    let tag = unique("mtls");
    let slot = unique("mtls_slot");
    let tables = ["t_one.outbox", "t_two.outbox"];
    for t in tables {
        migrate_table(&db, t).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 3).await?;
    let toml = format!(
        "tables = \"t_*.outbox\"\n{}[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n",
        logical_toml(&slot)
    );
    let env = [("OUTBOX_LEADER_LEASE", "2s")];
    let (first, _, config) = start_relay(&db, &toml, &env).await?;
    wait_slot_active(&db, &slot).await?;
    let second = start_with_config(&db, &config, &env).await?;
    let second_addr = wait_admin(&second).await?;
    tokio::time::sleep(QUIET).await;
    assert!(
        !second.log().contains("opening the slot"),
        "the standby opened the slot:\n{}",
        second.log()
    );
    let (_, body) = http_get(&second_addr, "/status").await?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(status["tables"].as_array().map(Vec::len), Some(0), "{body}");

    first.kill9().await?;
    let mut written = BTreeMap::new();
    for t in tables {
        for (k, v) in write_events(&db, t, "Acct", 3, 10).await? {
            written.insert(format!("{t}/{k}"), v);
        }
    }
    for t in tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    second
        .wait_for_log("holding the slot's leader lock", LONG)
        .await?;
    let records = consume(&[topic.as_str()], 60, QUIET, LONG).await?;
    let keyed = keyed_by_table(&records, &written);
    check_exact_and_ordered(&keyed, &written, &topic)?;
    assert_eq!(slots(&db).await?, vec![slot.clone()]);
    stop_cleanly(second).await?;
    Ok(())
}

/// A table removed from the publication behind the relay's back would silently stop being
/// relayed: the relay stops with an error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_leaving_the_publication_stops_the_relay_naming_it() -> Result<()> {
    let db = TestDb::create("mtl_gone").await?;
    let tag = unique("mtlg");
    let slot = unique("mtlg_slot");
    for t in ["one.outbox", "two.outbox"] {
        migrate_table(&db, t).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 1).await?;
    let toml = format!(
        "{}[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n\
         [[outbox]]\ntable = \"one.outbox\"\n[[outbox]]\ntable = \"two.outbox\"\n",
        logical_toml(&slot)
    );
    let (relay, _, _) = start_relay(&db, &toml, &[]).await?;
    wait_slot_active(&db, &slot).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER PUBLICATION \"{slot}_pub\" DROP TABLE two.outbox"
    )))
    .execute(&db.pool)
    .await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("two.outbox") && log.contains("is no longer a member of publication"),
        "{log}"
    );
    Ok(())
}

/// The configuration refusal of several tables with the logical source is gone; events written
/// as logical messages (which name no table) are still refused, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tables_with_the_logical_source_pass_validation() -> Result<()> {
    for text in [
        "source = \"logical\"\n[[outbox]]\ntable = \"a.outbox\"\n[[outbox]]\ntable = \"b.outbox\"\n",
        "source = \"logical\"\ntables = \"tenant_*.outbox\"\n",
    ] {
        let path = config_file(text)?;
        let out = relay_cli(
            &[
                "config",
                "validate",
                "--config",
                path.to_str().context("utf-8")?,
            ],
            &[],
        )
        .await?;
        assert_eq!(out.code, 0, "{text}: {}", out.text());
    }
    let path = config_file(
        "source = \"logical\"\n[[outbox]]\ntable = \"a\"\nwrite_mode = \"logical_message\"\n\
         [[outbox]]\ntable = \"b\"\n",
    )?;
    let out = relay_cli(
        &[
            "config",
            "validate",
            "--config",
            path.to_str().context("utf-8")?,
        ],
        &[],
    )
    .await?;
    assert_eq!(out.code, 2, "{}", out.text());
    assert!(
        out.stderr.contains("`outbox[0].write_mode`") && out.stderr.contains("names no table"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// Rows pending in three `[[outbox]]` tables before the relay's first start in logical mode (a
/// switch from polling with a backlog): the new slot does not stream them, each table's feed
/// re-publishes them from the table first and holds its streamed events meanwhile. With writes
/// continuing after the start, every event of every table arrives exactly once (streamed copies
/// of re-published rows are skipped) and in per-aggregate order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_pending_before_the_slot_exists_are_re_published_first_in_order() -> Result<()> {
    let db = TestDb::create("mtl_backlog").await?;
    let tag = unique("mtlb");
    let slot = unique("mtlb_slot");
    let tables = ["billing.outbox", "shipping.outbox", "audit.outbox"];
    let shorts = ["billing", "shipping", "audit"];
    for t in tables {
        migrate_table(&db, t).await?;
    }
    let topics: Vec<String> = shorts.iter().map(|s| format!("{tag}.{s}.Acct")).collect();
    for t in &topics {
        create_topic(t, 3).await?;
    }
    let mut written: Vec<BTreeMap<String, Vec<Uuid>>> = Vec::new();
    for t in tables {
        written.push(write_rounds(&db, t, "Acct", 8, 1..=15).await?);
    }
    let mut toml = logical_toml(&slot);
    for (t, short) in tables.iter().zip(shorts) {
        toml.push_str(&format!(
            "[[outbox]]\ntable = \"{t}\"\n[outbox.route]\ntopic = \"{tag}.{short}.{{aggregatetype}}\"\n"
        ));
    }
    let (relay, addr, _) = start_relay(&db, &toml, &[("OUTBOX_BATCH_SIZE", "25")]).await?;
    // More writes while the backlog is re-published: they are streamed, and held behind it.
    let (a, b, c) = tokio::try_join!(
        write_rounds(&db, tables[0], "Acct", 8, 16..=40),
        write_rounds(&db, tables[1], "Acct", 8, 16..=40),
        write_rounds(&db, tables[2], "Acct", 8, 16..=40),
    )?;
    for (w, late) in written.iter_mut().zip([a, b, c]) {
        for (k, v) in late {
            w.entry(k).or_default().extend(v);
        }
    }
    for t in tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    for (i, topic) in topics.iter().enumerate() {
        let records = consume(&[topic.as_str()], 8 * 40, QUIET, LONG).await?;
        check_exact_and_ordered(&records, &written[i], topic)?;
    }
    let (code, scrape) = http_get(&addr, "/metrics").await?;
    assert_eq!(code, 200, "{scrape}");
    let log = stop_cleanly(relay).await?;
    assert!(
        log.contains("re-publishing the table's unpublished rows"),
        "{log}"
    );
    assert_eq!(slots(&db).await?, vec![slot]);
    Ok(())
}

/// A tenant's table that already holds events (several aggregates, several transactions) when
/// it starts matching the pattern — created as `staging_c.outbox`, written to, then its schema
/// renamed to `tenant_c` — with writes going on while the re-scan adds it to the publication:
/// the rows committed before the `ALTER PUBLICATION` are re-published from the table before its
/// streamed events, so every event arrives exactly once and each aggregate's in write order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_written_to_before_the_rescan_adds_it_loses_nothing() -> Result<()> {
    let db = TestDb::create("mtl_early").await?;
    let tag = unique("mtle");
    let slot = unique("mtle_slot");
    let publication = format!("{slot}_pub");
    migrate_table(&db, "tenant_a.outbox").await?;
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 3).await?;
    let toml = format!(
        "tables = \"tenant_*.outbox\"\n{}[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n",
        logical_toml(&slot)
    );
    let (relay, _, _) = start_relay(&db, &toml, &[("OUTBOX_BATCH_SIZE", "20")]).await?;
    wait_slot_active(&db, &slot).await?;

    let mut written: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    let mut merge = |table: &str, w: BTreeMap<String, Vec<Uuid>>| {
        for (k, v) in w {
            written.entry(format!("{table}/{k}")).or_default().extend(v);
        }
    };
    // Written before the table matches: no re-scan can add it yet.
    migrate_table(&db, "staging_c.outbox").await?;
    let early = write_rounds(&db, "staging_c.outbox", "Acct", 6, 1..=10).await?;
    merge("tenant_c.outbox", early);
    sqlx::query("ALTER SCHEMA staging_c RENAME TO tenant_c")
        .execute(&db.pool)
        .await?;
    // Writes go on across the re-scan that adds it.
    let (a, c) = tokio::try_join!(
        write_rounds(&db, "tenant_a.outbox", "Acct", 6, 1..=40),
        async {
            let mut all: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
            for round in 0..6 {
                let first = 11 + round * 5;
                let w = write_rounds(&db, "tenant_c.outbox", "Acct", 6, first..=first + 4).await?;
                for (k, v) in w {
                    all.entry(k).or_default().extend(v);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            anyhow::Ok(all)
        },
    )?;
    merge("tenant_a.outbox", a);
    merge("tenant_c.outbox", c);
    wait_member(&db, &publication, "tenant_c.outbox").await?;
    for t in ["tenant_a.outbox", "tenant_c.outbox"] {
        wait_table_drained(&db, t, LONG).await?;
    }
    let total: usize = written.values().map(Vec::len).sum();
    assert_eq!(total, 6 * 40 * 2);
    let records = consume(&[topic.as_str()], total, QUIET, LONG).await?;
    let keyed = keyed_by_table(&records, &written);
    check_exact_and_ordered(&keyed, &written, &topic)?;
    let log = stop_cleanly(relay).await?;
    assert!(log.contains("added to the slot's publication"), "{log}");
    Ok(())
}

/// The logical source's figures of a two-table relay: what each table's feed counted (events
/// streamed, rows and pages re-published when it joined the stream) labelled with its table,
/// with the right values per table (rows committed before the first start are re-published,
/// the later ones streamed); the one slot's figures (sessions, heartbeats, confirmed LSN,
/// `wal_status`, lag) exactly once, without a `table` label, under a single-table relay's names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slots_figures_are_exported_once_and_each_tables_with_its_label() -> Result<()> {
    let db = TestDb::create("mtl_metrics").await?;
    let tag = unique("mtlm");
    let slot = unique("mtlm_slot");
    let tables = ["north.outbox", "south.outbox"];
    // (aggregates, rounds before the start, rounds after it) per table: different figures.
    let shapes = [(4usize, 5i64, 6i64), (3, 3, 4)];
    for t in tables {
        migrate_table(&db, t).await?;
    }
    let topic = format!("{tag}.Acct");
    create_topic(&topic, 1).await?;
    for (t, (aggregates, before, _)) in tables.iter().zip(shapes) {
        write_rounds(&db, t, "Acct", aggregates, 1..=before).await?;
    }
    let mut toml = format!(
        "{}[route]\ntopic = \"{tag}.{{aggregatetype}}\"\n",
        logical_toml(&slot)
    );
    for t in tables {
        toml.push_str(&format!("[[outbox]]\ntable = \"{t}\"\n"));
    }
    const BATCH: usize = 5;
    let batch = BATCH.to_string();
    let (relay, addr, _) =
        start_relay(&db, &toml, &[("OUTBOX_BATCH_SIZE", batch.as_str())]).await?;
    // The backlog is re-published and marked first; only then the later rows are written, so
    // they are streamed (and not in any backfill's snapshot).
    for t in tables {
        wait_table_drained(&db, t, LONG).await?;
    }
    for (t, (aggregates, before, after)) in tables.iter().zip(shapes) {
        write_rounds(&db, t, "Acct", aggregates, before + 1..=before + after).await?;
    }
    for t in tables {
        wait_table_drained(&db, t, LONG).await?;
    }

    let streamed = "outbox_relay_logical_events_streamed_total";
    let backfilled = "outbox_relay_logical_rows_backfilled_total";
    let pages = "outbox_relay_logical_backfill_pages_total";
    let wal_status = "outbox_relay_logical_slot_wal_status";
    // Counted before the rows were marked, so settled now but for the slot's own upkeep (its
    // first status check, its first confirmation).
    let settled = |scrape: &str| {
        tables
            .iter()
            .zip(shapes)
            .all(|(t, (aggregates, _, after))| {
                table_metric(scrape, streamed, t).unwrap_or(0.0)
                    >= (aggregates as i64 * after) as f64
            })
            && unlabelled_metric(scrape, "outbox_relay_logical_confirmed_lsn").unwrap_or(0.0) > 0.0
            && metric_samples(scrape, wal_status)
                .iter()
                .any(|l| l.ends_with(" 1"))
            && unlabelled_metric(scrape, "outbox_relay_slot_lag_bytes").is_some()
    };
    let deadline = Instant::now() + LONG / 3;
    let scrape = loop {
        let (code, scrape) = http_get(&addr, "/metrics").await?;
        ensure!(code == 200, "{scrape}");
        if settled(&scrape) || Instant::now() > deadline {
            break scrape;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Per table: labelled, one series per table, the table's own figures.
    for name in [streamed, backfilled, pages] {
        let samples = metric_samples(&scrape, name);
        ensure!(
            samples.len() == tables.len()
                && tables
                    .iter()
                    .all(|t| table_metric(&scrape, name, t).is_some()),
            "{name}: one series per table wanted, got {samples:?}\n{scrape}"
        );
    }
    for (t, (aggregates, before, after)) in tables.iter().zip(shapes) {
        let rows_before = (aggregates as i64 * before) as f64;
        let rows_after = (aggregates as i64 * after) as f64;
        assert_eq!(
            table_metric(&scrape, backfilled, t),
            Some(rows_before),
            "{t}: the rows committed before the start are re-published\n{scrape}"
        );
        let read = table_metric(&scrape, pages, t).unwrap_or(0.0);
        assert!(
            read >= (rows_before / BATCH as f64).ceil() && read <= rows_before,
            "{t}: {read} pages for {rows_before} rows in batches of {BATCH}\n{scrape}"
        );
        let got = table_metric(&scrape, streamed, t).unwrap_or(0.0);
        assert!(
            got >= rows_after,
            "{t}: {got} events streamed for {rows_after} written after the start\n{scrape}"
        );
    }

    // The slot's: once each, no table label, the names a single-table relay uses.
    for name in [
        "outbox_relay_logical_sessions_total",
        "outbox_relay_logical_heartbeats_total",
        "outbox_relay_logical_confirmed_lsn",
        "outbox_relay_logical_slot_recoveries_total",
        "outbox_relay_logical_messages_refused_total",
        "outbox_relay_slot_lag_bytes",
        "outbox_relay_slot_lost",
    ] {
        let samples = metric_samples(&scrape, name);
        ensure!(
            samples.len() == 1 && unlabelled_metric(&scrape, name).is_some(),
            "{name}: one unlabelled series wanted, got {samples:?}\n{scrape}"
        );
    }
    assert!(
        unlabelled_metric(&scrape, "outbox_relay_logical_sessions_total").unwrap_or(0.0) >= 1.0,
        "{scrape}"
    );
    assert!(
        unlabelled_metric(&scrape, "outbox_relay_logical_confirmed_lsn").unwrap_or(0.0) > 0.0,
        "{scrape}"
    );
    let states = metric_samples(&scrape, wal_status);
    ensure!(
        states.len() == 5
            && states.iter().all(|l| !l.contains("table="))
            && states.iter().filter(|l| l.ends_with(" 1")).count() == 1,
        "{wal_status}: one series per status, one of them 1, wanted: {states:?}\n{scrape}"
    );
    let mut described = BTreeSet::new();
    for l in scrape.lines().filter(|l| l.starts_with("# TYPE ")) {
        ensure!(described.insert(l), "{l} twice in\n{scrape}");
    }

    // `/status` shows the slot with every table.
    let (code, body) = http_get(&addr, "/status").await?;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let listed = status["tables"].as_array().context("tables")?;
    assert_eq!(listed.len(), tables.len(), "{body}");
    for t in listed {
        assert_eq!(t["slot"]["name"], slot.as_str(), "{body}");
        assert!(t["slot"]["lag_bytes"].is_i64(), "{body}");
    }
    stop_cleanly(relay).await?;
    Ok(())
}

/// How many of `ids` in `table` are not marked published.
async fn unmarked_in(db: &TestDb, table: &str, ids: &[Uuid]) -> Result<i64> {
    // `table` is one of the test's own constant names.
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE id = ANY($1) AND published_at IS NULL"
    )))
    .bind(ids)
    .fetch_one(&db.pool)
    .await?)
}

/// Reads `n` events from `feed`.
async fn read_feed(
    feed: &mut outbox_relay::source::logical::multi::FeedSource,
    n: usize,
) -> Result<Vec<outbox_relay::source::SourceEvent>> {
    use outbox_relay::source::Source;
    let token = tokio_util::sync::CancellationToken::new();
    let mut events = Vec::new();
    while events.len() < n {
        let batch = tokio::time::timeout(LONG, feed.next_batch(7, &token))
            .await
            .context("the feed's events never came")??;
        events.extend(batch);
    }
    Ok(events)
}

/// Lets `feed` wait for events (as its pipeline does once caught up) until every row of `ids`
/// in `table` is marked published.
async fn until_feed_marked(
    feed: &mut outbox_relay::source::logical::multi::FeedSource,
    db: &TestDb,
    table: &str,
    ids: &[Uuid],
) -> Result<()> {
    use outbox_relay::source::Source;
    let token = tokio_util::sync::CancellationToken::new();
    let deadline = Instant::now() + LONG;
    loop {
        if let Ok(batch) =
            tokio::time::timeout(Duration::from_millis(200), feed.next_batch(7, &token)).await
        {
            ensure!(batch?.is_empty(), "nothing more was written");
        }
        let left = unmarked_in(db, table, ids).await?;
        if left == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{left} acknowledged rows of {table} never marked published"
        );
    }
}

/// The row marks of the multi-table path (`table` mode, `acknowledgement = "mark"`, deferred
/// like the single-table source's): a table's rows are marked only once its pipeline
/// acknowledged them (after Kafka did), exactly the acknowledged ones, and every acknowledged
/// row ends up marked without a flush once the feed is caught up — also the rows acknowledged
/// through an opening of the feed that was dropped (a pipeline restarted after a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feeds_rows_are_marked_only_after_acknowledgement_and_all_of_them() -> Result<()> {
    use std::sync::Arc;

    use outbox_core::{OutboxTable, WriteMode};
    use outbox_relay::config::RowAcknowledgement;
    use outbox_relay::source::Source;
    use outbox_relay::source::logical::multi::{FeedMarks, FeedSource, Hub};
    use outbox_relay::source::logical::{LogicalConfig, LogicalSource, PublicationName, SlotName};
    use outbox_relay::stats::LogicalMetrics;

    let db = TestDb::create("mtl_marks").await?;
    let slot = unique("mtlm_slot");
    let tables = ["billing.outbox", "shipping.outbox"];
    for t in tables {
        migrate_table(&db, t).await?;
    }
    let parsed: Vec<OutboxTable> = tables
        .iter()
        .map(|t| OutboxTable::parse(t))
        .collect::<Result<_, _>>()?;
    // The slot as a multi-table relay opens it: it marks nothing itself, its feeds do.
    let mut cfg = LogicalConfig::new(db.url.clone(), parsed[0].clone(), WriteMode::InsertDelete);
    cfg.slot = SlotName::parse(&slot)?;
    cfg.publication = PublicationName::parse(&format!("{slot}_pub"))?;
    cfg.tables = parsed.clone();
    cfg.recover_lost_slot = false;
    cfg.heartbeat_interval = Duration::from_millis(200);
    cfg.status_interval = Duration::from_millis(100);
    let source = LogicalSource::open(cfg, None, Arc::new(LogicalMetrics::default())).await?;
    let (hub, handle) = Hub::new(source, 50, 10_000);
    let stop = tokio_util::sync::CancellationToken::new();
    let hub_task = tokio::spawn(hub.run(stop.clone()));
    let marks = |i: usize| FeedMarks {
        pool: db.pool.clone(),
        table: parsed[i].clone(),
        how: RowAcknowledgement::Mark,
    };
    let feeds: Vec<_> = (0..2)
        .map(|i| handle.feed(i as u16, None, Arc::new(LogicalMetrics::default())))
        .collect();
    let mut a = FeedSource::open(feeds[0].clone(), None, Some(marks(0)));
    let mut b = FeedSource::open(feeds[1].clone(), None, Some(marks(1)));

    let ids = |w: BTreeMap<String, Vec<Uuid>>| -> Vec<Uuid> { w.into_values().flatten().collect() };
    let a_ids = ids(write_rounds(&db, tables[0], "Acct", 4, 1..=10).await?);
    let b_ids = ids(write_rounds(&db, tables[1], "Acct", 4, 1..=10).await?);
    let a_events = read_feed(&mut a, a_ids.len()).await?;
    let b_events = read_feed(&mut b, b_ids.len()).await?;

    // Delivered to the pipelines, not acknowledged: nothing is marked, even after a flush.
    a.flush().await?;
    b.flush().await?;
    assert_eq!(
        unmarked_in(&db, tables[0], &a_ids).await?,
        a_ids.len() as i64
    );
    assert_eq!(
        unmarked_in(&db, tables[1], &b_ids).await?,
        b_ids.len() as i64
    );

    // Half of a's acknowledged: exactly those rows are marked, once flushed.
    let half = a_events.len() / 2;
    a.acknowledge(&a_events[..half]).await?;
    a.flush().await?;
    let marked: BTreeSet<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM {} WHERE published_at IS NOT NULL",
        tables[0]
    )))
    .fetch_all(&db.pool)
    .await?
    .into_iter()
    .collect();
    let acknowledged: BTreeSet<Uuid> = a_events[..half].iter().map(|e| e.event.id).collect();
    assert_eq!(
        marked, acknowledged,
        "marked rows are exactly the acknowledged ones"
    );
    assert_eq!(
        unmarked_in(&db, tables[1], &b_ids).await?,
        b_ids.len() as i64
    );

    // b's rows acknowledged, then its pipeline restarts: the next opening marks them.
    b.acknowledge(&b_events).await?;
    drop(b);
    let mut b = FeedSource::open(feeds[1].clone(), None, Some(marks(1)));
    until_feed_marked(&mut b, &db, tables[1], &b_ids).await?;

    // The rest of a's: marked once the feed is caught up, without a flush.
    a.acknowledge(&a_events[half..]).await?;
    until_feed_marked(&mut a, &db, tables[0], &a_ids).await?;

    drop((a, b));
    stop.cancel();
    hub_task.await??;
    for t in tables {
        let mut conn = db.pool.acquire().await?;
        let backlog = outbox_relay::table::backlog(&mut conn, &OutboxTable::parse(t)?).await?;
        assert_eq!(backlog.pending_events, 0, "{t}: {backlog:?}");
    }
    Ok(())
}
