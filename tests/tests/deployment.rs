//! What the packaging and the operator documentation promise, checked against a real relay:
//!
//! - the least-privilege role of `docs/postgres.md` is enough to relay (and to park, purge, and
//!   run the read-only commands), and not more than that;
//! - every `outbox_relay_*` metric the alert rules in `deploy/prometheus/alerts.yaml` and the
//!   Grafana dashboard `deploy/grafana/outbox-relay.json` use is one the relay exports, every
//!   query of both is valid PromQL, and the dashboard is well formed (ids, layout, data source
//!   and job variables) with each panel described in `docs/operations.md`;
//! - the annotated `relay.toml` of `docs/operations.md` is valid and names every setting, the
//!   Kubernetes example's configuration loads with its secret files, and the sharded example's
//!   loads with the shards, replicas and grace period it describes;
//! - the Dockerfile passes hadolint and builds the relay with `otel`; with the `docker` feature,
//!   `docker build` succeeds and the image's relay accepts tracing;
//! - the Helm chart `deploy/helm/outbox-relay` passes Helm's lint rules and renders, with its
//!   defaults and with three sharded relays, a Deployment whose relay loads its configuration;
//!   in `mode: sidecar` it renders no Deployment, and the example service chart
//!   `deploy/helm/examples/account-service`, with the relay chart as a dependency, renders the
//!   relay as a native sidecar of its pods through the chart's named templates;
//! - a database URL demanding TLS from a server without it fails loudly, without the password;
//! - a paused (SIGSTOPped) active relay is fenced: the standby takes over within the lease, and
//!   the old one, resumed, steps down without producing or acknowledging anything (polling and
//!   logical sources).
//!
//! The documents are read at test time, so editing them without keeping them true fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::FutureExt;
use outbox_core::{NewEvent, Outbox};
use outbox_tests::*;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use uuid::Uuid;

const QUIET: Duration = Duration::from_millis(1500);
const LONG: Duration = Duration::from_secs(60);

/// A file of the repository, by its path from the workspace root.
fn repo_file(path: &str) -> Result<String> {
    let full: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).with_context(|| format!("reading {}", full.display()))
}

/// The body of the fenced code block (```lang) that follows the line `<!-- marker -->`.
fn marked_block(doc: &str, marker: &str, lang: &str) -> Result<String> {
    let tag = format!("<!-- {marker} -->");
    let after = doc
        .split_once(&tag)
        .map(|(_, rest)| rest)
        .with_context(|| format!("no `{tag}` marker"))?;
    let fence = format!("```{lang}\n");
    let start = after
        .find(&fence)
        .with_context(|| format!("no ```{lang} block after `{tag}`"))?;
    ensure!(
        after[..start].trim().is_empty(),
        "the ```{lang} block must directly follow `{tag}`"
    );
    let body = &after[start + fence.len()..];
    let end = body.find("\n```").context("unterminated code block")?;
    Ok(body[..=end].to_owned())
}

/// `url` with its user and password replaced.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{user}:{password}@{host}{path}")
}

async fn write(db: &TestDb, events: Vec<NewEvent>) -> Result<Vec<Uuid>> {
    let mut tx = db.pool.begin().await?;
    let ids = Outbox::default().publish_new(&mut tx, events).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Runs the relay binary with `args` and only the given environment.
async fn relay_cli(args: &[&str], env: &[(&str, &str)]) -> Result<(i32, String, String)> {
    let mut all = vec![("RUST_LOG", "info")];
    all.extend_from_slice(env);
    let out = outbox_tests::relay_cli(args, &all).await?;
    Ok((out.code, out.stdout, out.stderr))
}

/// The SQLSTATE of a failed statement, or why it did not fail.
fn sqlstate<T>(result: Result<T, sqlx::Error>) -> String {
    match result {
        Ok(_) => "it succeeded".to_owned(),
        Err(e) => e
            .as_database_error()
            .and_then(|d| d.code().map(|c| c.into_owned()))
            .unwrap_or_else(|| format!("not a database error: {e}")),
    }
}

/// Statements the documented relay role must not be able to run.
const FORBIDDEN: &[&str] = &[
    "SELECT * FROM accounts",
    "INSERT INTO outbox (aggregatetype, aggregateid, type) VALUES ('forged', '1', 'Forged')",
    "UPDATE outbox SET payload = '{\"forged\": true}'",
    "TRUNCATE outbox",
    "UPDATE outbox_parked SET reason = 'rewritten'",
    "INSERT INTO _outbox_migrations (table_name, version, description) VALUES ('outbox', 99, 'x')",
    "CREATE TABLE public.relay_was_here (i int)",
    "ALTER TABLE outbox ADD COLUMN relay_was_here int",
    "SELECT pg_create_logical_replication_slot('relay_was_here', 'pgoutput')",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_least_privilege_polling_role_relays_everything_and_can_do_nothing_more()
-> Result<()> {
    let doc = repo_file("docs/postgres.md")?;
    let block = marked_block(&doc, "least-privilege-polling", "sql")?;
    for placeholder in ["account_relay", "CHANGE_ME", "DATABASE accounts"] {
        ensure!(
            block.contains(placeholder),
            "docs/postgres.md's role block no longer uses `{placeholder}`:\n{block}"
        );
    }
    let db = TestDb::create("dep_role").await?;
    let role = unique("relay_role");
    let password = unique("pw");
    let sql = block
        .replace("account_relay", &role)
        .replace("CHANGE_ME", &password)
        .replace("DATABASE accounts", &format!("DATABASE \"{}\"", db.name));
    // Roles are server-wide: remove it whatever happened, failed assertions included.
    let result =
        std::panic::AssertUnwindSafe(least_privilege_scenario(&db, &role, &password, &sql))
            .catch_unwind()
            .await;
    let cleanup = async {
        let mut conn = db.connect().await?;
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
            .bind(&role)
            .execute(&mut conn)
            .await?;
        sqlx::query(AssertSqlSafe(format!("DROP OWNED BY \"{role}\"")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let mut admin = PgConnection::connect(&services().admin_url).await?;
        sqlx::query(AssertSqlSafe(format!("DROP ROLE IF EXISTS \"{role}\"")))
            .execute(&mut admin)
            .await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(outcome) => outcome?,
        Err(panic) => std::panic::resume_unwind(panic),
    }
    cleanup.context("dropping the test role")
}

async fn least_privilege_scenario(
    db: &TestDb,
    role: &str,
    password: &str,
    grants: &str,
) -> Result<()> {
    // The owner migrates, as docs/postgres.md describes, and the service has a table of its own.
    let (code, _, err) = relay_cli(&["migrate"], &[("OUTBOX_DATABASE_URL", &db.url)]).await?;
    assert_eq!(code, 0, "migrate as the owner: {err}");
    sqlx::raw_sql(
        "CREATE TABLE accounts (id text PRIMARY KEY, email text);
         INSERT INTO accounts VALUES ('1', 'secret@example.com');",
    )
    .execute(&db.pool)
    .await?;
    sqlx::raw_sql(AssertSqlSafe(grants.to_owned()))
        .execute(&db.pool)
        .await
        .with_context(|| format!("running the documented grants:\n{grants}"))?;
    let role_url = with_credentials(&db.url, role, password);

    // The relay, as that role: marks published rows, purges them after a (short) retention, and
    // parks an event whose topic name is illegal.
    let agg_type = unique("lp");
    let topic = format!("outbox.event.{agg_type}");
    let relay = RelayProcess::start(
        db,
        &[],
        &[
            ("OUTBOX_DATABASE_URL", role_url.as_str()),
            ("OUTBOX_RETENTION", "1s"),
        ],
    )
    .await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.extend(
            write(
                db,
                vec![
                    NewEvent::new(&agg_type, format!("a{}", i % 3), "Changed", None)
                        .with_aggregate_seq(i / 3),
                ],
            )
            .await?,
        );
    }
    let poison = write(db, vec![NewEvent::new("orders/eu", "p1", "Created", None)]).await?[0];
    wait_drained(&db.pool, LONG)
        .await
        .with_context(|| format!("relay log:\n{}", relay.log()))?;

    let records = consume(&[&topic], ids.len(), QUIET, LONG).await?;
    let ledger = Ledger {
        committed: ids.iter().copied().collect(),
        ..Default::default()
    };
    let verdict = Verdict::check(&ledger, &records);
    verdict.assert_safe();

    let parked: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox_parked")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(parked, vec![poison], "the role can park an event");
    // Published rows are purged after the retention: the DELETE grant works.
    let deadline = Instant::now() + LONG;
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&db.pool)
            .await?;
        if left == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{left} published rows never purged; relay log:\n{}",
            relay.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The operator commands that only read or resolve work with the same role.
    let env = [
        ("OUTBOX_DATABASE_URL", role_url.as_str()),
        ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", &services().bootstrap),
    ];
    let (code, out, err) = relay_cli(&["status", "--json"], &env).await?;
    assert_eq!(code, 0, "status as the relay role: {err}");
    let status: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(status["parked_events"], 1, "{out}");
    assert_eq!(status["leader_present"], true, "{out}");
    let (code, out, err) = relay_cli(&["parked", "drop", &poison.to_string()], &env).await?;
    assert_eq!(code, 0, "parked drop as the relay role: {out}{err}");

    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(
        !log.contains("permission denied"),
        "the relay hit a missing grant:\n{log}"
    );

    // Nothing more than that.
    let mut conn = PgConnection::connect(&role_url).await?;
    for statement in FORBIDDEN {
        let code = sqlstate(
            sqlx::query(AssertSqlSafe(*statement))
                .execute(&mut conn)
                .await,
        );
        assert_eq!(
            code, "42501",
            "the relay role must not be allowed to run `{statement}`, but: {code}"
        );
    }
    // What docs/postgres.md says about heartbeats: pg_logical_emit_message needs no extra grant.
    sqlx::query("SELECT pg_logical_emit_message(false, 'outbox-deployment-test', '')")
        .execute(&mut conn)
        .await
        .context("docs/postgres.md says any role may call pg_logical_emit_message")?;
    conn.close().await?;
    Ok(())
}

/// Every `outbox_relay_*` name in `text` (expressions and annotations alike).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("outbox_relay_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // `outbox_relay_*` in prose is not a name.
        if !name.ends_with('_') {
            names.insert(name.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Whether the scrape has a sample of `name` (and, for a histogram series, the histogram), or
/// `name` is a histogram the scrape declares.
fn exported(scrape: &str, name: &str) -> bool {
    if scrape.contains(&format!("# TYPE {name} histogram\n")) {
        return true;
    }
    let has_sample = scrape.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
    });
    let histogram_ok = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .is_none_or(|base| scrape.contains(&format!("# TYPE {base} histogram\n")));
    has_sample && histogram_ok
}

/// Metrics a relay exports only when it reads from a replication slot.
const LOGICAL_ONLY: &[&str] = &[
    "outbox_relay_slot_lag_bytes",
    "outbox_relay_slot_lost",
    "outbox_relay_logical_events_streamed_total",
    "outbox_relay_logical_heartbeats_total",
    "outbox_relay_logical_rows_backfilled_total",
    "outbox_relay_logical_slot_recoveries_total",
    "outbox_relay_logical_sessions_total",
    "outbox_relay_logical_messages_refused_total",
    "outbox_relay_logical_slot_wal_status",
];

/// The `expr:` queries of Prometheus rules (a block scalar `expr: |` or a one-line value).
fn rule_queries(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if let Some(value) = line.trim_start().strip_prefix("expr:") {
            let value = value.trim();
            if value == "|" || value == ">" || value == "|-" || value == ">-" {
                let mut body = Vec::new();
                i += 1;
                while i < lines.len()
                    && (lines[i].trim().is_empty()
                        || lines[i].len() - lines[i].trim_start().len() > indent)
                {
                    body.push(lines[i].trim());
                    i += 1;
                }
                out.push(body.join("\n"));
                continue;
            }
            out.push(value.to_owned());
        }
        i += 1;
    }
    out
}

/// The dashboard's queries with Grafana's variables replaced by values PromQL accepts.
fn grafana_query_as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__range", "6h")
        .replace("$job", ".*")
        .replace("$table", ".*")
}

/// Parses `query` as PromQL.
fn check_promql(what: &str, query: &str) -> Result<()> {
    promql_parser::parser::parse(query)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{what}: `{query}` is not valid PromQL: {e}"))
}

#[test]
fn every_query_in_deploy_is_valid_promql_and_the_dashboard_is_well_formed() -> Result<()> {
    let rules = repo_file("deploy/prometheus/alerts.yaml")?;
    let queries = rule_queries(&rules);
    ensure!(
        queries.len() >= 10,
        "alerts.yaml queries found: {queries:?}"
    );
    for q in &queries {
        check_promql("alerts.yaml", q)?;
    }
    // The check can fail.
    ensure!(check_promql("self-test", "sum by (job) (rate(x[5m])").is_err());

    let text = repo_file("deploy/grafana/outbox-relay.json")?;
    let dash: serde_json::Value =
        serde_json::from_str(&text).context("outbox-relay.json is not JSON")?;
    let operations = repo_file("docs/operations.md")?;
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .context("templating.list")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    ensure!(
        vars == ["datasource", "job", "table"],
        "variables: {vars:?}"
    );
    let panels = dash["panels"].as_array().context("panels")?;
    let mut ids = BTreeSet::new();
    let mut cells: BTreeSet<(i64, i64)> = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        let id = p["id"].as_i64().context("a panel without an id")?;
        ensure!(ids.insert(id), "panel id {id} is used twice");
        let title = p["title"].as_str().unwrap_or_default();
        ensure!(!title.is_empty(), "panel {id} has no title");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_i64().unwrap_or(-1),
            g["y"].as_i64().unwrap_or(-1),
            g["w"].as_i64().unwrap_or(0),
            g["h"].as_i64().unwrap_or(0),
        );
        ensure!(
            x >= 0 && y >= 0 && w > 0 && h > 0 && x + w <= 24,
            "panel `{title}`: gridPos {g}"
        );
        for cx in x..x + w {
            for cy in y..y + h {
                ensure!(cells.insert((cx, cy)), "panel `{title}` overlaps another");
            }
        }
        if p["type"] == "row" {
            continue;
        }
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "panel `{title}` does not use the data source variable"
        );
        ensure!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "panel `{title}` has no description"
        );
        ensure!(
            operations.contains(&format!("**{title}**")),
            "docs/operations.md does not describe the panel `{title}`"
        );
        let targets = p["targets"].as_array().context("targets")?;
        ensure!(!targets.is_empty(), "panel `{title}` has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().context("a target without expr")?;
            ensure!(
                refs.insert(t["refId"].as_str().unwrap_or_default()),
                "panel `{title}`: refId used twice"
            );
            ensure!(
                expr.contains("job=~\"$job\""),
                "panel `{title}`: `{expr}` ignores the job variable"
            );
            check_promql(title, &grafana_query_as_promql(expr))?;
            queries += 1;
        }
    }
    ensure!(queries >= 20, "only {queries} queries");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alert_rules_and_the_dashboard_use_is_exported_by_the_relay() -> Result<()>
{
    let rules = repo_file("deploy/prometheus/alerts.yaml")?;
    let dashboard = repo_file("deploy/grafana/outbox-relay.json")?;
    let mut wanted = metric_names(&rules);
    wanted.extend(metric_names(&dashboard));
    for must in [
        "outbox_relay_commit_to_ack_seconds_bucket",
        "outbox_relay_oldest_pending_age_seconds",
        "outbox_relay_leader",
        "outbox_relay_parked_events",
        "outbox_relay_slot_lost",
    ] {
        ensure!(
            wanted.contains(must),
            "alerts.yaml no longer uses {must}: {wanted:?}"
        );
    }

    // A polling relay that has published something (so every polling metric has a value).
    let db = TestDb::migrated("dep_metrics").await?;
    let relay = RelayProcess::start(
        &db,
        &["--log-format", "json"],
        &[("OUTBOX_ADMIN_ADDR", "127.0.0.1:0")],
    )
    .await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let addr = admin_addr(&relay.log()).context("admin address not logged")?;
    write(&db, vec![NewEvent::new(unique("met"), "1", "Made", None)]).await?;
    wait_drained(&db.pool, LONG).await?;
    let (code, scrape) = http_get(&addr, "/metrics").await?;
    assert_eq!(code, 200, "{scrape}");
    let (code, _) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0);

    let mut missing: Vec<&String> = wanted.iter().filter(|n| !exported(&scrape, n)).collect();
    let logical: Vec<&String> = missing
        .iter()
        .copied()
        .filter(|n| LOGICAL_ONLY.contains(&n.as_str()))
        .collect();
    missing.retain(|n| !LOGICAL_ONLY.contains(&n.as_str()));
    assert!(
        missing.is_empty(),
        "alerts.yaml or the dashboard use metrics the relay does not export: {missing:?}\nscrape:\n{scrape}"
    );
    if !logical.is_empty() {
        check_logical_metrics(&logical).await?;
    }
    Ok(())
}

/// The `by (…)` label lists of a query.
fn by_clauses(query: &str) -> Vec<Vec<String>> {
    query
        .match_indices("by (")
        .map(|(i, m)| {
            let rest = &query[i + m.len()..];
            let end = rest.find(')').unwrap_or(rest.len());
            rest[..end]
                .split(',')
                .map(|l| l.trim().to_owned())
                .collect()
        })
        .collect()
}

/// A relay of several tables labels each table's series with `table`: every dashboard query and
/// alert rule over such a metric keeps the tables apart (so one stuck table shows, and fires, on
/// its own), and the dashboard's `$table` filter is applied to exactly those metrics (a filter on
/// a process-wide metric would blank its panel whenever one table is picked).
/// The metric names a two-table relay on `source` labels with `table` (histograms by their base
/// name), from one scrape after both tables have a leader and one of them published an event.
async fn names_labelled_per_table(source: &str) -> Result<BTreeSet<String>> {
    let db = TestDb::create("dep_tables").await?;
    let mut conn = db.connect().await?;
    for schema in ["dep_t1", "dep_t2"] {
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await?;
        outbox_core::migrate(
            &mut conn,
            &outbox_core::OutboxTable::parse(&format!("{schema}.outbox"))?,
        )
        .await?;
    }
    let slot = unique("dep_tables");
    let relay = RelayProcess::start(
        &db,
        &["--log-format", "json", "--source", source],
        &[
            ("OUTBOX_ADMIN_ADDR", "127.0.0.1:0"),
            ("OUTBOX_TABLES", "dep_t*.outbox"),
            ("OUTBOX_SLOT", &slot),
        ],
    )
    .await?;
    // One event, so the figures a table has only once it published are exported too.
    let table = outbox_core::OutboxTable::parse("dep_t1.outbox")?;
    let mut tx = conn.begin().await?;
    Outbox::new(table)
        .publish_new(
            &mut tx,
            vec![NewEvent::new(unique("dep"), "1", "Made", None)],
        )
        .await?;
    tx.commit().await?;
    let deadline = Instant::now() + LONG;
    let scrape = loop {
        let log = relay.log();
        if let Some(addr) = admin_addr(&log)
            && let Ok((200, scrape)) = http_get(&addr, "/metrics").await
            && scrape.contains("outbox_relay_leader{table=\"dep_t2.outbox\"} 1")
            && scrape.contains("outbox_relay_pending_events{table=\"dep_t1.outbox\"} 0")
            && scrape.contains("outbox_relay_seconds_since_last_event{table=\"dep_t1.outbox\"}")
        {
            break Ok(scrape);
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "the two-table {source} relay never reported both tables; log:\n{log}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (code, _) = relay.terminate(Duration::from_secs(30)).await?;
    // A replication slot outlives the database's connections: dropped whatever happened.
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .execute(&mut conn)
    .await?;
    let scrape = scrape?;
    assert_eq!(code, 0, "the {source} relay's exit code");
    Ok(scrape
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("table=\"dep_t1.outbox\""))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| n.to_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_keep_the_tables_of_a_relay_apart() -> Result<()> {
    // The names a multi-table relay labels with `table`, on either source.
    let polling = names_labelled_per_table("polling").await?;
    ensure!(polling.len() >= 10, "labelled per table: {polling:?}");
    let logical = names_labelled_per_table("logical").await?;
    ensure!(
        logical.contains("outbox_relay_logical_events_streamed_total"),
        "a two-table logical relay labels its tables' streamed events: {logical:?}"
    );
    let per_table: BTreeSet<String> = polling.union(&logical).cloned().collect();
    let is_per_table = |name: &str| {
        per_table.contains(name)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .is_some_and(|base| per_table.iter().any(|n| n.starts_with(&format!("{base}_"))))
    };

    let text = repo_file("deploy/grafana/outbox-relay.json")?;
    let dash: serde_json::Value = serde_json::from_str(&text)?;
    let mut checked = 0;
    for p in dash["panels"].as_array().context("panels")? {
        let title = p["title"].as_str().unwrap_or_default();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("a target without expr")?;
            let names = metric_names(expr);
            let labelled = names.iter().any(|n| is_per_table(n));
            let filtered = expr.contains("table=~\"$table\"");
            ensure!(
                labelled == filtered,
                "panel `{title}`: `{expr}` {} the $table filter",
                if labelled { "lacks" } else { "must not have" }
            );
            if labelled {
                for by in by_clauses(expr) {
                    ensure!(
                        by.iter().any(|l| l == "table"),
                        "panel `{title}`: `{expr}` adds the tables up"
                    );
                }
                checked += 1;
            }
        }
    }
    ensure!(checked >= 15, "only {checked} per-table dashboard queries");
    let rules = repo_file("deploy/prometheus/alerts.yaml")?;
    for q in rule_queries(&rules) {
        if metric_names(&q).iter().any(|n| is_per_table(n)) {
            for by in by_clauses(&q) {
                ensure!(
                    by.iter().any(|l| l == "table"),
                    "alerts.yaml: `{q}` adds the tables up"
                );
            }
        }
    }
    Ok(())
}

/// Scrapes a relay reading from a replication slot for the slot metrics.
async fn check_logical_metrics(names: &[&String]) -> Result<()> {
    let db = TestDb::migrated("dep_slot").await?;
    let slot = unique("dep_slot");
    let relay = RelayProcess::start(
        &db,
        &["--log-format", "json", "--source", "logical"],
        &[("OUTBOX_ADMIN_ADDR", "127.0.0.1:0"), ("OUTBOX_SLOT", &slot)],
    )
    .await?;
    let deadline = Instant::now() + LONG;
    let outcome = loop {
        let log = relay.log();
        if let Some(addr) = admin_addr(&log)
            && let Ok((200, scrape)) = http_get(&addr, "/metrics").await
            && names.iter().all(|n| exported(&scrape, n))
        {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "a logical-source relay never exported {names:?}; log:\n{log}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = relay.terminate(Duration::from_secs(30)).await;
    let mut conn = db.connect().await?;
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .execute(&mut conn)
    .await?;
    outcome
}

/// The `key = value` keys of a TOML document, dotted with their table; entries of the map
/// tables become `table.*`. A commented-out `# key = value` line names a setting too: the
/// alternatives that cannot be set together (one way to authenticate) are shown that way.
fn toml_keys(text: &str) -> BTreeSet<String> {
    const MAPS: &[&str] = &["kafka.properties", "route.routes"];
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        let line = match line.strip_prefix("# ") {
            Some(alternative)
                if alternative.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                alternative
            }
            _ => line,
        };
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_matches('"');
        keys.insert(match (section.as_str(), MAPS.contains(&section.as_str())) {
            ("", _) => key.to_owned(),
            (s, true) => format!("{s}.*"),
            (s, false) => format!("{s}.{key}"),
        });
    }
    keys
}

#[tokio::test]
async fn the_annotated_relay_toml_in_the_operations_guide_is_valid_and_names_every_setting()
-> Result<()> {
    let doc = repo_file("docs/operations.md")?;
    let example = marked_block(&doc, "relay-toml-example", "toml")?;
    let dir = std::env::temp_dir().join(unique("dep_cfg"));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("relay.toml");
    std::fs::write(&file, &example)?;
    let (code, out, err) = relay_cli(
        &["config", "validate", "--config", file.to_str().unwrap()],
        &[],
    )
    .await?;
    assert_eq!(code, 0, "docs/operations.md's relay.toml is invalid: {err}");
    assert!(out.contains("configuration is valid"), "{out}");

    let documented = toml_keys(&example);
    let known = outbox_relay::config::load::known_keys();
    let undocumented: Vec<&String> = known.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "settings missing from docs/operations.md's relay.toml: {undocumented:?}"
    );
    // admin_addr and dead_letter_topic have no default, so known_keys may not list them.
    let unknown: Vec<&String> = documented
        .iter()
        .filter(|k| {
            !known.contains(*k) && !["admin_addr", "dead_letter_topic"].contains(&k.as_str())
        })
        .collect();
    assert!(unknown.is_empty(), "not settings: {unknown:?}");
    Ok(())
}

/// The `relay.toml: |` block scalar of the Kubernetes example's ConfigMap.
fn configmap_toml(manifest: &str) -> Result<String> {
    let mut lines = manifest
        .lines()
        .skip_while(|l| l.trim() != "relay.toml: |")
        .skip(1)
        .peekable();
    let first = lines.peek().context("no `relay.toml: |` in the manifest")?;
    let indent = first.len() - first.trim_start().len();
    let mut out = String::new();
    for line in lines {
        if !line.trim().is_empty() && line.len() - line.trim_start().len() < indent {
            break;
        }
        out.push_str(line.get(indent..).unwrap_or(""));
        out.push('\n');
    }
    Ok(out)
}

/// The first integer after `key:` in `text`.
fn yaml_number(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|r| r.trim().parse().ok())
}

#[tokio::test]
async fn the_kubernetes_example_config_loads_with_its_secret_files_and_fits_the_grace_period()
-> Result<()> {
    let manifest = repo_file("deploy/kubernetes/account-service.yaml")?;
    let toml = configmap_toml(&manifest)?;
    for var in [
        "OUTBOX_CONFIG",
        "OUTBOX_DATABASE_URL_FILE",
        "OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD_FILE",
        "restartPolicy: Always",
    ] {
        ensure!(manifest.contains(var), "the manifest no longer uses {var}");
    }
    let dir = std::env::temp_dir().join(unique("dep_k8s"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("relay.toml");
    std::fs::write(&config, &toml)?;
    let db_secret = dir.join("database-url");
    std::fs::write(
        &db_secret,
        "postgres://account_relay:db-s3cret@db:5432/accounts\n",
    )?;
    let sasl_secret = dir.join("kafka-sasl-password");
    std::fs::write(&sasl_secret, "sasl-s3cret")?;
    let (code, out, err) = relay_cli(
        &["config", "print"],
        &[
            ("OUTBOX_CONFIG", config.to_str().unwrap()),
            ("OUTBOX_DATABASE_URL_FILE", db_secret.to_str().unwrap()),
            (
                "OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD_FILE",
                sasl_secret.to_str().unwrap(),
            ),
            ("OUTBOX_ADMIN_ADDR", "0.0.0.0:9187"),
            ("OUTBOX_LOG_FORMAT", "json"),
        ],
    )
    .await?;
    assert_eq!(code, 0, "the ConfigMap's relay.toml does not load: {err}");
    assert!(!err.contains("ignoring"), "unrecognised variables: {err}");
    assert!(
        out.contains("\"sasl.password\" = \"<redacted>\""),
        "the SASL password file was not picked up:\n{out}"
    );
    assert!(
        out.contains("database_url = \"<redacted>\"")
            && out.contains("admin_addr = \"0.0.0.0:9187\""),
        "{out}"
    );
    assert!(
        !out.contains("s3cret") && !err.contains("s3cret"),
        "a secret was printed:\n{out}{err}"
    );

    let timeout = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("shutdown_timeout = "))
        .map(|v| outbox_relay::config::duration::parse(v.trim_matches('"')))
        .context("the ConfigMap sets no shutdown_timeout")?
        .map_err(anyhow::Error::msg)?;
    let grace = yaml_number(&manifest, "terminationGracePeriodSeconds:")
        .context("no terminationGracePeriodSeconds")?;
    assert!(
        Duration::from_secs(grace) > timeout,
        "terminationGracePeriodSeconds ({grace}s) must exceed shutdown_timeout ({timeout:?})"
    );
    Ok(())
}

/// The YAML document of the manifest's one object of `kind`.
fn manifest_object<'a>(manifest: &'a str, kind: &str) -> Result<&'a str> {
    let line = format!("kind: {kind}");
    let found: Vec<&str> = manifest
        .split("\n---\n")
        .filter(|d| d.lines().any(|l| l == line))
        .collect();
    ensure!(
        found.len() == 1,
        "{} {kind} objects in the manifest",
        found.len()
    );
    Ok(found[0])
}

/// The `- name: …` / `value: …` pairs of a manifest object's container environment.
fn manifest_env(object: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = object.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|w| {
            let name = w[0].strip_prefix("- name: ")?;
            let value = w[1].strip_prefix("value: ")?;
            Some((name.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect()
}

/// The ConfigMap a manifest object mounts as its `relay-config` volume.
fn relay_config_volume(object: &str) -> Option<String> {
    let lines: Vec<&str> = object.lines().map(str::trim).collect();
    lines.windows(3).find_map(|w| {
        (w[0] == "- name: relay-config" && w[1] == "configMap:")
            .then(|| w[2].strip_prefix("name: ").map(str::to_owned))
            .flatten()
    })
}

/// The value of the top-level `key` of a relay.toml (before its first section), unquoted.
fn toml_top_level(toml: &str, key: &str) -> Option<String> {
    toml.lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
        })
}

/// `outbox-relay config print` with `toml` as the mounted relay.toml, the `OUTBOX_*` variables
/// of `env` (the manifest's mount paths moved into a scratch directory) and the Secret's files
/// faked there; its output.
async fn print_manifest_config(toml: &str, env: &[(String, String)]) -> Result<String> {
    let env: Vec<_> = env
        .iter()
        .filter(|(k, _)| k.starts_with("OUTBOX_"))
        .cloned()
        .collect();
    let secrets = [
        (
            "database-url",
            "postgres://account_relay:db-s3cret@db:5432/accounts\n",
        ),
        ("kafka-sasl-password", "sasl-s3cret"),
        ("admin-token", "s3cret-0123456789abcdef0123456789abcdef"),
    ];
    let (out, err) = print_mounted_config(toml, &secrets, &env, "the sharded manifest's").await?;
    ensure!(
        !out.contains("s3cret") && !err.contains("s3cret"),
        "a secret was printed:\n{out}{err}"
    );
    Ok(out)
}

/// `outbox-relay config print` as a pod would run it: `toml` as the mounted relay.toml and
/// `secrets` (file name → content) as the mounted Secret, both in a scratch directory that the
/// mount paths (`/etc/outbox`, `/var/run/secrets/outbox`) in `env` are moved to; its output and
/// log. Fails when the relay refuses `what` configuration or ignores a variable.
async fn print_mounted_config(
    toml: &str,
    secrets: &[(&str, &str)],
    env: &[(String, String)],
    what: &str,
) -> Result<(String, String)> {
    let dir = std::env::temp_dir().join(unique("dep_mounted"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("relay.toml"), toml)?;
    for (file, content) in secrets {
        std::fs::write(dir.join(file), content)?;
    }
    let dir_str = dir.to_str().context("temp dir")?.to_owned();
    let local: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace("/etc/outbox", &dir_str)
                .replace("/var/run/secrets/outbox", &dir_str);
            (k.clone(), v)
        })
        .collect();
    let pairs: Vec<(&str, &str)> = local
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (code, out, err) = relay_cli(&["config", "print"], &pairs).await?;
    std::fs::remove_dir_all(&dir)?;
    ensure!(code == 0, "the relay refuses {what} configuration:\n{err}");
    ensure!(!err.contains("ignoring"), "unrecognised variables: {err}");
    Ok((out, err))
}

/// `deploy/kubernetes/outbox-relay-sharded.yaml`: its ConfigMap's relay.toml loads with the
/// relay's own loader, both with the relay Deployment's environment and with the migrate Job's
/// (which mount that same ConfigMap), and sets the sharding the manifest describes: `shards` as
/// its header says, the same for the relays and the Job, more than one replica and no more than
/// shards, the grace period above `shutdown_timeout`, a rollout that adds a member before one
/// leaves. Instances need no identity of their own (membership is their lock sessions), so no
/// setting may ask for one without the manifest setting it per pod.
#[tokio::test]
async fn the_sharded_kubernetes_example_loads_and_shards_its_replicas_as_it_says() -> Result<()> {
    let manifest = repo_file("deploy/kubernetes/outbox-relay-sharded.yaml")?;
    let configmap = manifest_object(&manifest, "ConfigMap")?;
    let deployment = manifest_object(&manifest, "Deployment")?;
    let job = manifest_object(&manifest, "Job")?;
    let pdb = manifest_object(&manifest, "PodDisruptionBudget")?;
    let toml = configmap_toml(configmap)?;
    let configmap_name = configmap
        .lines()
        .find_map(|l| l.trim().strip_prefix("name: "))
        .context("the ConfigMap has no name")?;
    for (kind, object) in [("Deployment", deployment), ("Job", job)] {
        assert_eq!(
            relay_config_volume(object).as_deref(),
            Some(configmap_name),
            "the {kind} must mount the ConfigMap {configmap_name} as relay-config"
        );
    }
    let args = |object: &str| {
        object
            .lines()
            .find_map(|l| l.trim().strip_prefix("args: "))
            .map(str::to_owned)
    };
    assert_eq!(args(deployment).as_deref(), Some("[\"run\"]"));
    let job_args = args(job).context("the Job has no args")?;
    assert!(
        job_args.starts_with("[\"migrate\"") && !job_args.contains("--shards"),
        "the Job must migrate with the ConfigMap's shards: {job_args}"
    );

    let relay_env = manifest_env(deployment);
    let printed = print_manifest_config(&toml, &relay_env).await?;
    for want in [
        "database_url = \"<redacted>\"",
        "\"sasl.password\" = \"<redacted>\"",
        "admin_addr = \"0.0.0.0:9187\"",
        "token = \"<redacted>\"",
    ] {
        assert!(printed.contains(want), "no `{want}` in:\n{printed}");
    }
    assert_eq!(
        toml_top_level(&printed, "source").as_deref(),
        Some("polling"),
        "sharding needs the polling source:\n{printed}"
    );
    let shards: u64 = toml_top_level(&printed, "shards")
        .with_context(|| format!("the relays' configuration sets no shards:\n{printed}"))?
        .parse()?;
    assert!(shards > 1, "shards = {shards} does not share the table");
    assert!(
        manifest.contains(&format!("relay.toml with shards = {shards}")),
        "the manifest's header names another shard count than its relay.toml ({shards})"
    );
    let migrate = print_manifest_config(&toml, &manifest_env(job)).await?;
    assert_eq!(
        toml_top_level(&migrate, "shards"),
        Some(shards.to_string()),
        "the migrate Job must build the index for the relays' shards:\n{migrate}"
    );

    let replicas = yaml_number(deployment, "replicas:").context("no replicas")?;
    assert!(
        (2..=shards).contains(&replicas),
        "{replicas} replicas for {shards} shards: more than one, and not more than the shards"
    );
    let (fewest, most) = (shards / replicas, shards.div_ceil(replicas));
    let split = if fewest == most {
        format!("{replicas} relays, each owning {most} of the {shards} shards")
    } else {
        format!("{replicas} relays, each owning {fewest} or {most} of the {shards} shards")
    };
    assert!(manifest.contains(&split), "the header must say `{split}`");
    assert_eq!(
        yaml_number(deployment, "maxUnavailable:"),
        Some(0),
        "a rollout adds a member before one leaves"
    );
    let disruptions = yaml_number(pdb, "maxUnavailable:").context("no PDB maxUnavailable")?;
    assert!(
        disruptions < replicas,
        "the PDB lets every relay go at once"
    );

    let timeout = toml_top_level(&printed, "shutdown_timeout")
        .map(|v| outbox_relay::config::duration::parse(&v))
        .context("no shutdown_timeout")?
        .map_err(anyhow::Error::msg)?;
    let grace = yaml_number(deployment, "terminationGracePeriodSeconds:")
        .context("no terminationGracePeriodSeconds")?;
    assert!(
        Duration::from_secs(grace) > timeout,
        "terminationGracePeriodSeconds ({grace}s) must exceed shutdown_timeout ({timeout:?})"
    );

    let identities: Vec<String> = outbox_relay::config::load::known_keys()
        .into_iter()
        .filter(|k| k.contains("instance") || k.contains("member"))
        .collect();
    assert!(
        identities.is_empty(),
        "the relay has per-instance settings {identities:?}: the sharded manifest must give \
         each pod its own (e.g. from metadata.name)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_demands_tls_from_a_server_without_it_fails_loudly_and_keeps_the_password()
-> Result<()> {
    let db = TestDb::migrated("dep_tls").await?;
    let ssl: String = sqlx::query_scalar("SHOW ssl").fetch_one(&db.pool).await?;
    if ssl != "off" {
        bail!("this test needs a PostgreSQL server without TLS (ssl = {ssl})");
    }
    let password = unique("pw");
    let user = sqlx::query_scalar::<_, String>("SELECT current_user::text")
        .fetch_one(&db.pool)
        .await?;
    for mode in ["require", "verify-full"] {
        let url = format!(
            "{}?sslmode={mode}",
            with_credentials(&db.url, &user, &password)
        );
        let relay = RelayProcess::start(&db, &["--database-url", &url], &[]).await?;
        let (code, log) = relay.wait_exit(LONG).await?;
        assert_eq!(code, 1, "sslmode={mode}: a runtime failure, exit 1:\n{log}");
        let lower = log.to_lowercase();
        assert!(
            lower.contains("tls") || lower.contains("ssl"),
            "sslmode={mode}: the error must name TLS/SSL:\n{log}"
        );
        assert!(
            !log.contains(&password),
            "sslmode={mode}: the password was printed:\n{log}"
        );
    }
    Ok(())
}

/// Events of `agg_type` over four aggregates, each with its per-aggregate sequence, committed
/// one per transaction and recorded in `ledger`.
async fn write_round(
    db: &TestDb,
    agg_type: &str,
    round: i64,
    n: i64,
    ledger: &mut Ledger,
) -> Result<()> {
    for i in 0..n {
        ledger.committed.extend(
            write(
                db,
                vec![
                    NewEvent::new(agg_type, format!("z{}", i % 4), "Changed", None)
                        .with_aggregate_seq(round * 1000 + i),
                ],
            )
            .await?,
        );
    }
    Ok(())
}

/// Freezes the active relay `old` (SIGSTOP), writes round 2 and returns how long it took until
/// it was published (by `standby`, whose log a timeout shows).
async fn freeze_and_time_takeover(
    db: &TestDb,
    old: &RelayProcess,
    standby: &RelayProcess,
    agg_type: &str,
    ledger: &mut Ledger,
) -> Result<Duration> {
    old.signal("STOP").await?;
    let paused = Instant::now();
    write_round(db, agg_type, 2, 20, ledger).await?;
    wait_drained(&db.pool, LONG)
        .await
        .with_context(|| format!("standby log:\n{}", standby.log()))?;
    Ok(paused.elapsed())
}

/// Thaws the frozen relay `old` (SIGCONT), waits until it reports its lease lost, then writes
/// round 3 and waits until it is published.
async fn thaw_until_lease_lost(
    db: &TestDb,
    old: &RelayProcess,
    agg_type: &str,
    ledger: &mut Ledger,
) -> Result<()> {
    old.signal("CONT").await?;
    old.wait_for_log("leader lease lost", LONG).await?;
    write_round(db, agg_type, 3, 20, ledger).await?;
    wait_drained(&db.pool, LONG).await?;
    Ok(())
}

/// Reads the three rounds back from `topic` and asserts every event arrived exactly once, in
/// order (the old relay's log goes with a failure).
async fn assert_every_event_once(topic: &str, ledger: &Ledger, old: &RelayProcess) -> Result<()> {
    let records = consume(&[topic], 60, Duration::from_millis(1500), LONG).await?;
    let verdict = Verdict::check(ledger, &records);
    assert_eq!(
        verdict,
        Verdict {
            records: 60,
            ..Default::default()
        },
        "every event exactly once, in order; old relay log:\n{}",
        old.log()
    );
    Ok(())
}

/// Stops both relays gracefully; each must exit 0.
async fn terminate_both(old: RelayProcess, standby: RelayProcess) -> Result<()> {
    let (code, log) = old.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let (code, log) = standby.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    Ok(())
}

async fn scrape(addr: &str, name: &str) -> Result<f64> {
    let (code, body) = http_get(addr, "/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}: {body}");
    metric(&body, name).with_context(|| format!("{name} missing from:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_by_its_lease_and_publishes_nothing_after_it_resumes()
-> Result<()> {
    let lease = Duration::from_secs(3);
    let db = TestDb::migrated("dep_zombie").await?;
    let agg_type = unique("zombie");
    let topic = format!("outbox.event.{agg_type}");
    create_topic(&topic, 2).await?;
    let env = [
        ("OUTBOX_ADMIN_ADDR", "127.0.0.1:0"),
        ("OUTBOX_LEADER_LEASE", "3s"),
    ];
    let old = RelayProcess::start(&db, &["--log-format", "json"], &env).await?;
    old.wait_for_log("this relay is active", LONG).await?;
    let standby = RelayProcess::start(&db, &["--log-format", "json"], &env).await?;
    standby.wait_for_log("standing by", LONG).await?;
    let old_admin = admin_addr(&old.log()).context("admin address not logged")?;

    let mut ledger = Ledger::default();
    write_round(&db, &agg_type, 1, 20, &mut ledger).await?;
    wait_drained(&db.pool, LONG).await?;
    assert_eq!(
        scrape(&old_admin, "outbox_relay_events_published_total").await?,
        20.0
    );

    // Freeze the active relay: its session stays open, but the server ends it after the lease.
    let takeover = freeze_and_time_takeover(&db, &old, &standby, &agg_type, &mut ledger).await?;
    assert!(
        takeover < lease + Duration::from_secs(5),
        "the standby took {takeover:?} to publish (lease {lease:?})"
    );
    ensure!(
        standby.log().contains("this relay is active"),
        "someone else published:\n{}",
        standby.log()
    );

    // Thaw it: it must notice its lease is gone and step down, sending and recording nothing.
    thaw_until_lease_lost(&db, &old, &agg_type, &mut ledger).await?;
    assert_eq!(
        scrape(&old_admin, "outbox_relay_events_published_total").await?,
        20.0,
        "the resumed relay acknowledged events:\n{}",
        old.log()
    );
    assert_eq!(
        scrape(&old_admin, "outbox_relay_leader_lease_lost_total").await?,
        1.0
    );
    assert_eq!(scrape(&old_admin, "outbox_relay_leader").await?, 0.0);

    assert_every_event_once(&topic, &ledger, &old).await?;

    let old_log = old.log();
    let lost_at = old_log.find("leader lease lost").unwrap_or(0);
    assert!(
        old_log[lost_at..].contains("standing by"),
        "the resumed relay went back to standby:\n{old_log}"
    );
    terminate_both(old, standby).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_logical_leader_does_not_produce_what_it_received_while_frozen() -> Result<()> {
    let lease = Duration::from_secs(3);
    let db = TestDb::migrated("dep_zombie_lr").await?;
    // A frozen relay's walsender must let go of the slot within about the lease too (the
    // operations guide recommends the same on the relay's role).
    sqlx::query(AssertSqlSafe(format!(
        "ALTER DATABASE \"{}\" SET wal_sender_timeout = '3s'",
        db.name
    )))
    .execute(&db.pool)
    .await?;
    let agg_type = unique("zombie_lr");
    let topic = format!("outbox.event.{agg_type}");
    create_topic(&topic, 2).await?;
    let slot = unique("zslot");
    let env = [
        ("OUTBOX_ADMIN_ADDR", "127.0.0.1:0"),
        ("OUTBOX_LEADER_LEASE", "3s"),
        ("OUTBOX_SLOT", slot.as_str()),
    ];
    let args = ["--log-format", "json", "--source", "logical"];
    let old = RelayProcess::start(&db, &args, &env).await?;
    old.wait_for_log("this relay is active", LONG).await?;
    let mut ledger = Ledger::default();
    write_round(&db, &agg_type, 1, 20, &mut ledger).await?;
    wait_drained(&db.pool, LONG)
        .await
        .with_context(|| format!("log:\n{}", old.log()))?;
    // Round 1 is acknowledged; wait until the slot knows it too (a takeover repeats what was
    // acknowledged after the last status update, a documented property of the logical source
    // that this test is not about).
    let written_to: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&db.pool)
        .await?;
    let deadline = Instant::now() + LONG;
    loop {
        let confirmed: Option<bool> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .bind(&written_to)
        .fetch_optional(&db.pool)
        .await?
        .flatten();
        if confirmed == Some(true) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the slot never confirmed {written_to}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let standby = RelayProcess::start(&db, &args, &env).await?;
    standby.wait_for_log("standing by", LONG).await?;
    let old_admin = admin_addr(&old.log()).context("admin address not logged")?;

    // Freeze the active relay, then commit events: its walsender streams them into the frozen
    // process's socket before the server gives up on it, so the old relay holds a batch it
    // received while it was still the leader.
    let takeover = freeze_and_time_takeover(&db, &old, &standby, &agg_type, &mut ledger).await?;
    assert!(
        takeover < lease + Duration::from_secs(10),
        "the standby took {takeover:?} to publish (lease {lease:?})"
    );

    // Thawed, it must refuse to produce that batch: its lease ran out while it was frozen.
    thaw_until_lease_lost(&db, &old, &agg_type, &mut ledger).await?;
    assert_eq!(
        scrape(&old_admin, "outbox_relay_events_published_total").await?,
        20.0,
        "{}",
        old.log()
    );
    assert_every_event_once(&topic, &ledger, &old).await?;
    terminate_both(old, standby).await?;
    // Slots are server-wide: remove this test's (and its recovery marker) once their
    // walsenders have gone.
    let deadline = Instant::now() + LONG;
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ($1, $1 || '_bf')",
        )
        .bind(&slot)
        .fetch_one(&db.pool)
        .await?;
        if left == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "slot {slot} could not be dropped"
        );
        let _ = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE slot_name IN ($1, $1 || '_bf') AND NOT active",
        )
        .bind(&slot)
        .execute(&db.pool)
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The repository's root directory.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

/// Where a checker of `scripts/tools.sh` is installed: `$var` when set, else the newest
/// `<prefix><version>` directory under `.services/tools/` that has `inner`, joined with `inner`
/// (the hadolint binary) or not (`keep_dir`: the Python path of the Helm engine).
fn installed_tool(var: &str, prefix: &str, inner: &str, keep_dir: bool) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        let check = if keep_dir {
            path.join(inner)
        } else {
            path.clone()
        };
        ensure!(
            check.exists(),
            "{var}={} is no install of {prefix}* ({inner} missing): run scripts/tools.sh and \
             export what it prints",
            path.display()
        );
        return Ok(path);
    }
    let tools = repo_root().join(".services/tools");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&tools)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|dir| dir.join(inner).exists())
        .collect();
    found.sort();
    let dir = found.pop().with_context(|| {
        format!(
            "{prefix}* is not installed: run scripts/tools.sh (scripts/test.sh does), which puts \
             it from PyPI into {}, or set {var}",
            tools.display()
        )
    })?;
    Ok(if keep_dir { dir } else { dir.join(inner) })
}

/// Runs `program` with `args` in the repository root; exit code, stdout and stderr.
fn run_tool(program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<(i32, String, String)> {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).current_dir(repo_root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn the_dockerfile_passes_hadolint_and_builds_the_relay_with_otel() -> Result<()> {
    let hadolint = installed_tool("HADOLINT", "hadolint-", "bin/hadolint", false)?;
    let (code, out, err) = run_tool(&hadolint, &["--no-color", "Dockerfile"], &[])?;
    assert_eq!(
        code, 0,
        "hadolint finds problems in the Dockerfile:\n{out}{err}"
    );
    // The linter is not a no-op: a Dockerfile with known mistakes fails it.
    let bad = std::env::temp_dir().join(unique("Dockerfile.bad"));
    std::fs::write(&bad, "FROM debian\nRUN cd /tmp && apt-get install curl\n")?;
    let (code, out, _) = run_tool(&hadolint, &["--no-color", bad.to_str().unwrap()], &[])?;
    std::fs::remove_file(&bad)?;
    assert_ne!(code, 0, "hadolint passed a Dockerfile with known mistakes");
    for rule in ["DL3006", "DL3003", "DL3008"] {
        assert!(out.contains(rule), "hadolint did not report {rule}:\n{out}");
    }

    // The image's relay has the `otel` feature, so tracing is switched on by configuration.
    let dockerfile = repo_file("Dockerfile")?;
    ensure!(
        dockerfile.contains("ARG RELAY_FEATURES=otel"),
        "the Dockerfile no longer builds the relay with `otel` by default"
    );
    let builds: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.contains("cargo build"))
        .collect();
    ensure!(
        builds.len() == 2
            && builds
                .iter()
                .all(|l| l.contains("--features \"$RELAY_FEATURES\"")),
        "both cargo builds (dependencies and sources) must use the same features: {builds:?}"
    );
    let relay_manifest = repo_file("outbox-relay/Cargo.toml")?;
    ensure!(
        relay_manifest.contains("\notel = ["),
        "outbox-relay has no `otel` feature"
    );
    let operations = repo_file("docs/operations.md")?;
    let ways_to_run = operations
        .split_once("## Ways to run it")
        .and_then(|(_, rest)| rest.split_once("\n## "))
        .map(|(section, _)| section)
        .context("docs/operations.md has no `Ways to run it` section")?;
    ensure!(
        ways_to_run.contains("`otel`") && ways_to_run.contains("OUTBOX_TELEMETRY__ENABLED=true"),
        "docs/operations.md's `Ways to run it` no longer says how to turn on the image's tracing"
    );
    Ok(())
}

/// `docker build` of the repository's image, then the image's relay: its version, and a
/// configuration with tracing on (refused by a relay built without `otel`). Needs a Docker engine,
/// which the opt-in `docker` feature promises.
#[cfg(feature = "docker")]
#[test]
fn the_container_image_builds_and_its_relay_accepts_tracing() -> Result<()> {
    let docker = Path::new("docker");
    let (code, out, err) = run_tool(docker, &["info"], &[])?;
    assert_eq!(
        code, 0,
        "the `docker` feature is on but `docker info` fails (no Docker engine?):\n{out}{err}"
    );
    let tag = format!("outbox-relay-test:{}", unique("t"));
    let (code, out, err) = run_tool(docker, &["build", "--tag", &tag, "."], &[])?;
    assert_eq!(code, 0, "docker build failed:\n{out}{err}");
    let result = (|| -> Result<()> {
        let (code, out, err) = run_tool(docker, &["run", "--rm", &tag, "--version"], &[])?;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("outbox-relay"), "{out}");
        let (code, out, err) = run_tool(
            docker,
            &[
                "run",
                "--rm",
                "-e",
                "OUTBOX_DATABASE_URL=postgres://relay@db:5432/app",
                "-e",
                "OUTBOX_TELEMETRY__ENABLED=true",
                &tag,
                "config",
                "validate",
            ],
            &[],
        )?;
        assert_eq!(code, 0, "the image's relay refuses tracing:\n{out}{err}");
        Ok(())
    })();
    let _ = run_tool(docker, &["image", "rm", "--force", &tag], &[]);
    result
}

/// `scripts/helm-chart.py` (Helm's own lint rules and template engine) with `args`.
fn helm_chart(args: &[&str]) -> Result<(i32, String, String)> {
    let pythonpath = installed_tool(
        "HELM_CHART_PYTHONPATH",
        "helm-python-sdk-",
        "helm_python",
        true,
    )?;
    let mut all = vec!["scripts/helm-chart.py"];
    all.extend_from_slice(args);
    run_tool(Path::new("python3"), &all, &[("PYTHONPATH", &pythonpath)])
}

const CHART: &str = "deploy/helm/outbox-relay";

/// The chart rendered with the values files `values` (paths from the chart), as Kubernetes
/// objects, by kind and name.
fn render_chart(name: &str, values: &[&str]) -> Result<Vec<serde_json::Value>> {
    let files: Vec<String> = values.iter().map(|v| format!("{CHART}/{v}")).collect();
    let mut args = vec!["template", CHART, "--name", name];
    for f in &files {
        args.extend(["-f", f.as_str()]);
    }
    let (code, out, err) = helm_chart(&args)?;
    ensure!(code == 0, "helm template with {values:?} failed:\n{err}");
    let docs: Vec<serde_json::Value> =
        serde_json::from_str(&out).context("helm-chart.py output")?;
    Ok(docs.into_iter().map(|d| d["manifest"].clone()).collect())
}

/// The one object of `kind` among `objects`.
fn one<'a>(objects: &'a [serde_json::Value], kind: &str) -> Result<&'a serde_json::Value> {
    let found: Vec<_> = objects.iter().filter(|o| o["kind"] == kind).collect();
    ensure!(found.len() == 1, "{} {kind} objects rendered", found.len());
    Ok(found[0])
}

/// A container's environment as name → value (`valueFrom` entries as `<from>`).
fn container_env(container: &serde_json::Value) -> Result<Vec<(String, String)>> {
    container["env"]
        .as_array()
        .context("a container without env")?
        .iter()
        .map(|e| {
            let name = e["name"].as_str().context("env without name")?.to_owned();
            let value = e["value"].as_str().unwrap_or("<from>").to_owned();
            Ok((name, value))
        })
        .collect()
}

fn env_value<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Runs `outbox-relay config print` with the rendered ConfigMap's relay.toml, the container's
/// environment and `secrets` (file name → content) standing in for the mounted Secret.
async fn relay_loads_rendered_config(
    objects: &[serde_json::Value],
    env: &[(String, String)],
    secrets: &[(&str, &str)],
) -> Result<String> {
    let configmap = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap" && o["metadata"]["annotations"]["helm.sh/hook"].is_null()
        })
        .context("no relay ConfigMap")?;
    let toml = configmap["data"]["relay.toml"]
        .as_str()
        .context("no relay.toml in the ConfigMap")?;
    // A relay built without `otel` refuses tracing; the image has it (checked above).
    let env: Vec<_> = env
        .iter()
        .filter(|(k, _)| k != "OUTBOX_TELEMETRY__ENABLED")
        .cloned()
        .collect();
    let (out, _) = print_mounted_config(toml, secrets, &env, "the rendered").await?;
    Ok(out)
}

#[tokio::test]
async fn the_helm_chart_lints_and_renders_a_relay_deployment_unsharded_and_sharded() -> Result<()> {
    // Helm's lint rules, strict, with the defaults and with each CI values file.
    for values in [
        None,
        Some("ci/minimal-values.yaml"),
        Some("ci/sharded-values.yaml"),
    ] {
        let file = values.map(|v| format!("{CHART}/{v}"));
        let mut args = vec!["lint", CHART];
        if let Some(f) = &file {
            args.extend(["-f", f.as_str()]);
        }
        let (code, out, err) = helm_chart(&args)?;
        assert_eq!(code, 0, "helm lint with {values:?}:\n{out}{err}");
        assert!(out.contains("1 chart(s) linted"), "{out}");
    }
    // Lint is not a no-op: a chart with a broken template fails it.
    let broken = std::env::temp_dir().join(unique("dep_chart"));
    let broken_chart = broken.join("outbox-relay");
    copy_dir(&repo_root().join(CHART), &broken_chart)?;
    std::fs::write(
        broken_chart.join("templates/broken.yaml"),
        "kind: ConfigMap\n{{ if .Values.shards }}\n",
    )?;
    let (code, out, _) = helm_chart(&["lint", broken_chart.to_str().unwrap()])?;
    std::fs::remove_dir_all(&broken)?;
    assert_ne!(code, 0, "helm lint passed a broken template:\n{out}");
    assert!(out.contains("templates/broken.yaml"), "{out}");

    // Without a database URL or an existing Secret the chart refuses to render, naming the value.
    let (code, _, err) = helm_chart(&["template", CHART])?;
    assert_ne!(code, 0, "rendered without a database URL");
    assert!(err.contains("secrets.databaseUrl is required"), "{err}");

    // values.schema.json refuses what the relay would refuse, and misspelled values.
    for (values, refusal) in [
        ("shards: 2000\n", "at '/shards': maximum"),
        (
            "otel:\n  enabeld: true\n",
            "additional properties 'enabeld' not allowed",
        ),
    ] {
        let file = std::env::temp_dir().join(unique("dep_values"));
        std::fs::write(
            &file,
            format!("{values}secrets:\n  databaseUrl: postgres://db/app\n"),
        )?;
        let (code, _, err) = helm_chart(&["template", CHART, "-f", file.to_str().unwrap()])?;
        std::fs::remove_file(&file)?;
        assert_ne!(code, 0, "rendered with {values:?}");
        assert!(err.contains(refusal), "{values:?}: {err}");
    }

    // Defaults: 2 relays (one active, one standby), unsharded, tracing off, a Secret of its own.
    let objects = render_chart("accounts", &["ci/minimal-values.yaml"])?;
    let mut kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret"]
    );
    let deployment = one(&objects, "Deployment")?;
    assert_eq!(deployment["metadata"]["name"], "accounts-outbox-relay");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"], deployment["spec"]["selector"]["matchLabels"],
        "the selector must match the pod labels"
    );
    let relay = check_relay_container(pod)?;
    let env = container_env(relay)?;
    assert_eq!(env_value(&env, "OUTBOX_SHARDS"), None, "{env:?}");
    assert_eq!(env_value(&env, "OUTBOX_TELEMETRY__ENABLED"), Some("false"));
    assert_eq!(env_value(&env, "OUTBOX_ADMIN__TOKEN_FILE"), None);
    let secret = one(&objects, "Secret")?;
    assert_eq!(
        secret["stringData"]["database-url"],
        "postgres://account_relay:change-me@db:5432/accounts"
    );
    assert_eq!(
        pod["spec"]["volumes"][1]["secret"]["secretName"],
        secret["metadata"]["name"]
    );
    let printed = relay_loads_rendered_config(
        &objects,
        &env,
        &[(
            "database-url",
            "postgres://account_relay:pw@db:5432/accounts",
        )],
    )
    .await?;
    assert!(
        printed.contains("admin_addr = \"0.0.0.0:9187\""),
        "{printed}"
    );

    // Three relays sharing 16 shards, tracing on, the migrate hook with the same shards.
    let objects = render_chart("accounts", &["ci/sharded-values.yaml"])?;
    let deployment = one(&objects, "Deployment")?;
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"];
    let relay = check_relay_container(pod)?;
    let env = container_env(relay)?;
    assert_eq!(env_value(&env, "OUTBOX_SHARDS"), Some("16"), "{env:?}");
    assert_eq!(env_value(&env, "OUTBOX_TELEMETRY__ENABLED"), Some("true"));
    assert_eq!(
        env_value(&env, "OUTBOX_TELEMETRY__OTLP_ENDPOINT"),
        Some("http://otel-collector.observability:4318")
    );
    assert!(
        objects.iter().all(|o| o["kind"] != "Secret"),
        "a Secret was rendered although secrets.existingSecret is set"
    );
    assert_eq!(
        pod["spec"]["volumes"][1]["secret"]["secretName"],
        "account-service-relay"
    );
    let job = one(&objects, "Job")?;
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"],
        "pre-install,pre-upgrade"
    );
    let migrate = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(migrate["args"][0], "migrate");
    assert_eq!(
        env_value(&container_env(migrate)?, "OUTBOX_SHARDS"),
        Some("16"),
        "the migrate Job must build the index for the relays' shards"
    );
    assert_eq!(
        job["spec"]["template"]["spec"]["volumes"][1]["secret"]["secretName"],
        "account-service-migrate"
    );
    let pdb = one(&objects, "PodDisruptionBudget")?;
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let printed = relay_loads_rendered_config(
        &objects,
        &env,
        &[
            (
                "database-url",
                "postgres://account_relay:pw@db:5432/accounts",
            ),
            ("kafka-sasl-password", "sasl-pw"),
            ("admin-token", "0123456789abcdef0123456789abcdef"),
        ],
    )
    .await?;
    for want in [
        "shards = 16",
        "\"sasl.password\" = \"<redacted>\"",
        "otlp_endpoint = \"http://otel-collector.observability:4318\"",
    ] {
        assert!(printed.contains(want), "no `{want}` in:\n{printed}");
    }
    Ok(())
}

/// Checks the relay container of a rendered pod template (image, command, probes on the admin
/// port, non-root read-only container, config and secret mounts) and returns it.
fn check_relay_container(pod: &serde_json::Value) -> Result<&serde_json::Value> {
    let containers = pod["spec"]["containers"].as_array().context("containers")?;
    ensure!(containers.len() == 1, "containers: {containers:?}");
    let relay = &containers[0];
    check_relay_container_spec(relay)?;
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["spec"]["securityContext"]["runAsUser"], 10001);
    // SIGTERM drains within shutdown_timeout (30s in the default config), below the grace period.
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 45);
    Ok(relay)
}

/// Checks a rendered relay container, wherever it runs: image, command, probes on the admin
/// port, read-only root file system, config and secret mounts.
fn check_relay_container_spec(relay: &serde_json::Value) -> Result<()> {
    assert_eq!(relay["name"], "outbox-relay");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        relay["image"],
        format!("outbox-relay:{version}"),
        "the chart's appVersion must be the workspace version"
    );
    assert_eq!(relay["args"], serde_json::json!(["run"]));
    assert_eq!(relay["ports"][0]["name"], "relay-admin");
    assert_eq!(relay["ports"][0]["containerPort"], 9187);
    assert_eq!(relay["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(relay["readinessProbe"]["httpGet"]["path"], "/readyz");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(relay[probe]["httpGet"]["port"], "relay-admin", "{probe}");
    }
    assert_eq!(relay["securityContext"]["readOnlyRootFilesystem"], true);
    let mounts: Vec<(&str, &str)> = relay["volumeMounts"]
        .as_array()
        .context("volumeMounts")?
        .iter()
        .filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?)))
        .collect();
    assert_eq!(
        mounts,
        [
            ("relay-config", "/etc/outbox/relay.toml"),
            ("relay-secrets", "/var/run/secrets/outbox")
        ]
    );
    Ok(())
}

/// The rendered pod volume `name` of `pod`.
fn pod_volume<'a>(pod: &'a serde_json::Value, name: &str) -> Result<&'a serde_json::Value> {
    pod["spec"]["volumes"]
        .as_array()
        .context("no volumes")?
        .iter()
        .find(|v| v["name"] == name)
        .with_context(|| format!("no volume {name} in {:#}", pod["spec"]["volumes"]))
}

/// A scratch copy of the example service chart with the relay chart in its `charts/`, as
/// `helm dependency update` leaves it; the overrides `values` (YAML) merged over its values.
fn example_service_chart(values: Option<&str>) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(unique("dep_svc_chart"));
    let chart = dir.join("account-service");
    copy_dir(
        &repo_root().join("deploy/helm/examples/account-service"),
        &chart,
    )?;
    copy_dir(&repo_root().join(CHART), &chart.join("charts/outbox-relay"))?;
    if let Some(values) = values {
        std::fs::write(dir.join("override.yaml"), values)?;
    }
    Ok(dir)
}

#[tokio::test]
async fn the_helm_chart_in_sidecar_mode_renders_no_deployment_and_a_sidecar_for_the_service_chart()
-> Result<()> {
    let (code, out, err) = helm_chart(&[
        "lint",
        CHART,
        "-f",
        &format!("{CHART}/ci/sidecar-values.yaml"),
    ])?;
    assert_eq!(code, 0, "helm lint in sidecar mode:\n{out}{err}");

    // Alone: the relay's ConfigMap and Secret, no relay of its own.
    let objects = render_chart("accounts", &["ci/sidecar-values.yaml"])?;
    let mut kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["ConfigMap", "Secret"],
        "sidecar mode renders no Deployment or PDB"
    );
    let secret_name = one(&objects, "Secret")?["metadata"]["name"].clone();
    // Its notes print the container to paste, from the same template.
    let values = format!("{CHART}/ci/sidecar-values.yaml");
    let (code, notes, err) = helm_chart(&["notes", CHART, "-f", &values, "--name", "accounts"])?;
    assert_eq!(code, 0, "{err}");
    let version = env!("CARGO_PKG_VERSION");
    for want in [
        "initContainers:\n  - name: outbox-relay\n".to_owned(),
        format!("image: \"outbox-relay:{version}\""),
        "restartPolicy: Always".to_owned(),
        "value: /var/run/secrets/outbox/database-url".to_owned(),
        "value: /var/run/secrets/outbox/admin-token".to_owned(),
        "path: /readyz".to_owned(),
        format!(
            "secretName: {}",
            secret_name.as_str().context("Secret name")?
        ),
        "name: accounts-outbox-relay".to_owned(),
    ] {
        assert!(notes.contains(&want), "no `{want}` in the notes:\n{notes}");
    }
    let (code, notes, err) = helm_chart(&[
        "notes",
        CHART,
        "-f",
        &format!("{CHART}/ci/minimal-values.yaml"),
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(!notes.contains("initContainers"), "{notes}");
    assert!(notes.starts_with("2 outbox relay(s)"), "{notes}");

    // An unknown mode is refused by the values schema.
    let bad_mode = std::env::temp_dir().join(unique("dep_values"));
    std::fs::write(
        &bad_mode,
        "mode: daemonset\nsecrets:\n  databaseUrl: postgres://db/app\n",
    )?;
    let (code, _, err) = helm_chart(&["template", CHART, "-f", bad_mode.to_str().unwrap()])?;
    std::fs::remove_file(&bad_mode)?;
    assert_ne!(code, 0, "rendered with mode: daemonset");
    assert!(err.contains("at '/mode'"), "{err}");

    // As the dependency of the service's chart: the service's Deployment has the relay as a
    // native sidecar, mounting the relay chart's ConfigMap and the existing Secret.
    let scratch = example_service_chart(None)?;
    let chart = scratch.join("account-service");
    let chart = chart.to_str().context("temp path")?;
    let (code, out, err) = helm_chart(&["lint", chart])?;
    assert_eq!(
        code, 0,
        "helm lint of the example service chart:\n{out}{err}"
    );
    let (code, out, err) = helm_chart(&["template", chart, "--name", "accounts"])?;
    assert_eq!(
        code, 0,
        "helm template of the example service chart:\n{err}"
    );
    let docs: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let objects: Vec<serde_json::Value> = docs.into_iter().map(|d| d["manifest"].clone()).collect();
    let mut kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        ["ConfigMap", "Deployment"],
        "the service's Deployment and the relay's ConfigMap (its Secret exists)"
    );
    let deployment = one(&objects, "Deployment")?;
    assert_eq!(deployment["metadata"]["name"], "accounts-account-service");
    let pod = &deployment["spec"]["template"];
    let containers = pod["spec"]["containers"].as_array().context("containers")?;
    assert_eq!(
        containers.len(),
        1,
        "the service's container only: {containers:?}"
    );
    let init = pod["spec"]["initContainers"]
        .as_array()
        .context("initContainers")?;
    assert_eq!(init.len(), 1, "{init:?}");
    let relay = &init[0];
    check_relay_container_spec(relay)?;
    assert_eq!(relay["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(relay["startupProbe"]["httpGet"]["path"], "/healthz");
    // The pod's security context is the service's: the relay sets its own user.
    assert_eq!(relay["securityContext"]["runAsUser"], 10001);
    assert_eq!(relay["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        relay["resources"]["requests"]["cpu"], "50m",
        "the service chart's override"
    );
    let env = container_env(relay)?;
    assert_eq!(
        env_value(&env, "OUTBOX_DATABASE_URL_FILE"),
        Some("/var/run/secrets/outbox/database-url")
    );
    let configmap = one(&objects, "ConfigMap")?;
    assert_eq!(
        pod_volume(pod, "relay-config")?["configMap"]["name"],
        configmap["metadata"]["name"]
    );
    let secrets = &pod_volume(pod, "relay-secrets")?["secret"];
    assert_eq!(secrets["secretName"], "account-service-relay");
    assert_eq!(
        secrets["defaultMode"], 0o444,
        "readable by the relay's user in any pod"
    );
    let checksum = pod["metadata"]["annotations"]["checksum/outbox-relay-config"]
        .as_str()
        .context("no config checksum annotation")?;
    assert_eq!(checksum.len(), 64, "{checksum}");
    let printed = relay_loads_rendered_config(
        &objects,
        &env,
        &[(
            "database-url",
            "postgres://account_relay:pw@db:5432/accounts",
        )],
    )
    .await?;
    assert!(
        printed.contains("bootstrap_servers = \"kafka:9092\""),
        "{printed}"
    );
    std::fs::remove_dir_all(&scratch)?;

    // The sidecar templates refuse a relay chart that also renders its own Deployment.
    let scratch = example_service_chart(Some("outbox-relay:\n  mode: deployment\n"))?;
    let chart = scratch.join("account-service");
    let override_file = scratch.join("override.yaml");
    let (code, _, err) = helm_chart(&[
        "template",
        chart.to_str().context("temp path")?,
        "-f",
        override_file.to_str().context("temp path")?,
    ])?;
    std::fs::remove_dir_all(&scratch)?;
    assert_ne!(
        code, 0,
        "sidecar templates rendered next to a relay Deployment"
    );
    assert!(
        err.contains("needs the outbox-relay chart's `mode: sidecar`"),
        "{err}"
    );
    Ok(())
}

/// Copies the directory tree `from` to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
