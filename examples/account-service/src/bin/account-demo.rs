//! The one-command demo driver: starts the relay sidecar, the account service and the projector as
//! child processes, drives the scripted scenario over HTTP, narrates the events flowing and the
//! read models converging, checks that they equal the write model, stops everything, and exits 0
//! only on a match. `scripts/demo.sh` runs it (and the services) on a fresh machine.
//!
//! `--sink kafka|nats|rabbitmq|redis` picks the broker: the relay publishes there
//! (`OUTBOX_SINK`), and the projector reads back through the matching client
//! ([`account_service::source`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use account_service::domain::Status;
use account_service::projector::{LEGACY_GROUP, QUERY_GROUP};
use account_service::scenario::{self, Phase, Scenario};
use account_service::source::{
    EventSource, Sink, SourceArgs, nats_delete_stream, nats_durable, nats_stream_capturing,
    rabbitmq_queue,
};
use account_service::store;
use anyhow::{Context, Result, bail};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

/// Run the account-service demo end to end against a PostgreSQL server and a broker (Kafka, NATS
/// JetStream, RabbitMQ or Redis: `--sink`).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A PostgreSQL URL on the server to use; the demo creates its own databases there.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The broker and how to reach it.
    #[command(flatten)]
    source: SourceArgs,
    /// Destination of the account events: Kafka topic, NATS subject, RabbitMQ routing key or
    /// Redis stream (default: `outbox.event.account` on Kafka unless that topic exists from an
    /// earlier run; a run-specific `outbox.event.account-<run>` otherwise).
    #[arg(long)]
    topic: Option<String>,
    /// How many accounts the scenario opens.
    #[arg(long, default_value_t = 40)]
    accounts: usize,
    /// Where the `outbox-relay`, `account-service` and `account-projector` binaries are (default:
    /// next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the children's logs go (default: a fresh directory under the temp dir).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Do not stop and restart the projector in the middle of the scenario.
    #[arg(long)]
    no_restart: bool,
    /// Keep the demo's databases afterwards, and on NATS, RabbitMQ and Redis its stream, queues
    /// and consumer groups (they are removed by default).
    #[arg(long)]
    keep_databases: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    account_service::init_logging("warn,sqlx=error");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("account-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("account-demo: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map(|s| s + 3).unwrap_or(0);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// A child process with its log file.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program` with a clean environment plus `env`; stderr goes to `<log_dir>/<name>.log`.
    /// When `announce` is set, waits for the `listening on …` line on stdout and returns the URL.
    async fn start(
        name: &'static str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
        announce: bool,
    ) -> Result<(Self, Option<String>)> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("DEMO_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(if announce {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut url = None;
        if announce {
            let stdout = child.stdout.take().context("piped stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .ok()
                .and_then(|l| l.ok().flatten());
            match line
                .as_deref()
                .and_then(|l| l.strip_prefix("listening on "))
            {
                Some(u) => url = Some(u.trim().to_owned()),
                None => bail!(
                    "{name} did not come up; its log ({}):\n{}",
                    log.display(),
                    tail(&log)
                ),
            }
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        }
        Ok((Self { name, child, log }, url))
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGTERM, then waits up to 20 s (SIGKILL after that). Returns the exit code.
    async fn stop(mut self) -> Result<i32> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => Ok(status?.code().unwrap_or(-1)),
            Err(_) => {
                let _ = self.child.kill().await;
                bail!(
                    "{} did not stop within 20 s after SIGTERM; killed",
                    self.name
                )
            }
        }
    }

    /// Fails with the log tail when the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}); its log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

struct Dbs {
    write: String,
    query: String,
    legacy: String,
}

async fn topic_exists(bootstrap: &str, topic: &str) -> Result<bool> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .context("reading the broker's metadata")?;
        Ok(md.topics().iter().any(|t| t.name() == topic))
    })
    .await?
}

async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    Ok(())
}

struct Counts {
    written: i64,
    published: i64,
    query_applied: i64,
    legacy_applied: i64,
}

async fn counts(write: &PgPool, query: &PgPool, legacy: &PgPool) -> Result<Counts> {
    let (written, published): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(published_at) FROM outbox")
            .fetch_one(write)
            .await?;
    let query_applied = sqlx::query_scalar("SELECT count(*) FROM query.inbox")
        .fetch_one(query)
        .await?;
    let legacy_applied = sqlx::query_scalar("SELECT count(*) FROM legacy.inbox")
        .fetch_one(legacy)
        .await?;
    Ok(Counts {
        written,
        published,
        query_applied,
        legacy_applied,
    })
}

fn flow_line(c: &Counts, projector_up: bool) -> String {
    format!(
        "      events: {} written · {} published by the relay · query model applied {}{} · legacy list applied {}",
        c.written,
        c.published,
        c.query_applied,
        if projector_up {
            ""
        } else {
            " (projector down)"
        },
        c.legacy_applied
    )
}

async fn run(args: Args) -> Result<bool> {
    let started = Instant::now();
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the demo binary has no directory")?
            .to_path_buf(),
    };
    let bin = |name: &str| -> Result<PathBuf> {
        let p = bin_dir.join(name);
        if !p.exists() {
            bail!(
                "{} not found: build the workspace binaries first (`cargo build --bins`)",
                p.display()
            );
        }
        Ok(p)
    };
    let relay_bin = bin("outbox-relay")?;
    let service_bin = bin("account-service")?;
    let projector_bin = bin("account-projector")?;
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("account-demo-{run_id}")));
    std::fs::create_dir_all(&log_dir)?;

    println!("== account-service demo (run {run_id}) ==");
    let names = ["service", "query", "legacy"].map(|s| format!("account_demo_{run_id}_{s}"));
    let dbs = Dbs {
        write: with_database(&args.database_url, &names[0]),
        query: with_database(&args.database_url, &names[1]),
        legacy: with_database(&args.database_url, &names[2]),
    };
    let mut admin = PgConnectOptions::from_str(&args.database_url)?
        .connect()
        .await
        .context("connecting to PostgreSQL")?;
    for name in &names {
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
    }
    println!(
        "[setup] databases: {} (write model + outbox), {} (query model), {} (legacy app)",
        names[0], names[1], names[2]
    );

    let outcome = demo(
        &args,
        &dbs,
        &relay_bin,
        &service_bin,
        &projector_bin,
        &log_dir,
        &run_id,
    )
    .await;

    if args.keep_databases {
        println!("[teardown] databases kept: {}", names.join(", "));
    } else {
        for name in &names {
            if let Err(e) = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await
            {
                eprintln!("[teardown] could not drop {name}: {e}");
            }
        }
        println!("[teardown] databases dropped");
    }
    let _ = admin.close().await;
    println!("[logs] {}", log_dir.display());
    let ok = outcome?;
    println!(
        "RESULT: {} (in {:.1} s)",
        if ok {
            "read models == write model ✔"
        } else {
            "read models differ from the write model ✘"
        },
        started.elapsed().as_secs_f64()
    );
    Ok(ok)
}

async fn demo(
    args: &Args,
    dbs: &Dbs,
    relay_bin: &Path,
    service_bin: &Path,
    projector_bin: &Path,
    log_dir: &Path,
    run_id: &str,
) -> Result<bool> {
    let source = args.source.source()?;
    let sink = source.sink();
    let mut setup = BrokerSetup::default();
    let topic = match (&source, &args.topic) {
        (_, Some(t)) => t.clone(),
        (EventSource::Kafka { bootstrap_servers }, None)
            if topic_exists(bootstrap_servers, "outbox.event.account").await? =>
        {
            let t = format!("outbox.event.account-{run_id}");
            println!("[setup] outbox.event.account exists from an earlier run; this run uses {t}");
            t
        }
        (EventSource::Kafka { .. }, None) => "outbox.event.account".to_owned(),
        // Brokers whose streams and queues the demo removes afterwards: one destination per run.
        (_, None) => format!("outbox.event.account-{run_id}"),
    };
    let groups = [QUERY_GROUP, LEGACY_GROUP];

    // The relay sidecar, configured like in a deployment: OUTBOX_* variables.
    let mut relay_env: Vec<(&str, String)> = vec![
        ("OUTBOX_DATABASE_URL", dbs.write.clone()),
        ("OUTBOX_TOPIC", topic.clone()),
        ("OUTBOX_POLL_INTERVAL", "200ms".to_owned()),
        ("OUTBOX_SHUTDOWN_TIMEOUT", "10s".to_owned()),
    ];
    relay_env.extend(source.relay_env());
    // The outbox table first: `topics ensure` reads the routed event types from it.
    relay_cli(relay_bin, &["migrate"], &relay_env).await?;
    match &source {
        EventSource::Kafka { bootstrap_servers } => {
            create_topic(bootstrap_servers, &topic, 3).await?;
            println!(
                "[setup] sink kafka: topic {topic} created (3 partitions; records keyed by account id)"
            );
        }
        EventSource::Nats { url } => {
            // The stream the relay publishes into: an existing one when it captures the subject
            // already, otherwise one for this run, created by `outbox-relay topics ensure`.
            let stream = match nats_stream_capturing(url, &topic).await? {
                Some(existing) => existing,
                None => {
                    let name = format!("ACCOUNT_DEMO_{run_id}");
                    setup.nats_stream = Some(name.clone());
                    name
                }
            };
            relay_env.push(("OUTBOX_NATS__STREAM__NAME", stream.clone()));
            relay_env.push(("OUTBOX_NATS__STREAM__SUBJECTS", topic.clone()));
            let out = relay_cli(
                relay_bin,
                &["topics", "ensure", "--sink", "nats", "--add", &topic],
                &relay_env,
            )
            .await?;
            println!(
                "[setup] sink nats: `outbox-relay topics ensure --sink nats` → {}",
                out.lines().collect::<Vec<_>>().join("; ")
            );
            println!(
                "[setup] subject {topic} (header Outbox-Key = account id, Nats-Msg-Id = event id); durable pull consumers {} and {}",
                nats_durable(QUERY_GROUP, &topic),
                nats_durable(LEGACY_GROUP, &topic)
            );
        }
        EventSource::Rabbitmq { exchange, .. } => {
            source.prepare(&topic, &groups).await?;
            println!(
                "[setup] sink rabbitmq: topic exchange {exchange}, routing key {topic}; queues {} and {} declared and bound (one per consumer, single active consumer)",
                rabbitmq_queue(&topic, QUERY_GROUP),
                rabbitmq_queue(&topic, LEGACY_GROUP)
            );
        }
        EventSource::Redis { .. } => println!(
            "[setup] sink redis: stream {topic} (created by the relay's first XADD; fields key, value, h:id, …), read with XREADGROUP by the groups {QUERY_GROUP} and {LEGACY_GROUP}"
        ),
    }
    setup.created = true;

    let outcome = run_processes(
        args,
        dbs,
        &source,
        &topic,
        &relay_env,
        relay_bin,
        service_bin,
        projector_bin,
        log_dir,
    )
    .await;
    if !args.keep_databases {
        cleanup(&source, &topic, &groups, &setup).await;
    } else if sink != Sink::Kafka {
        println!("[teardown] {sink} resources of {topic} kept");
    }
    outcome
}

/// What the demo created on a broker, to remove afterwards.
#[derive(Default)]
struct BrokerSetup {
    created: bool,
    nats_stream: Option<String>,
}

async fn cleanup(source: &EventSource, topic: &str, groups: &[&str], setup: &BrokerSetup) {
    if !setup.created || source.sink() == Sink::Kafka {
        return;
    }
    let mut removed = match source.remove(topic, groups).await {
        Ok(()) => true,
        Err(e) => {
            println!(
                "[teardown] could not remove the {} resources of {topic}: {e:#}",
                source.sink()
            );
            false
        }
    };
    if let (EventSource::Nats { url }, Some(stream)) = (source, &setup.nats_stream)
        && let Err(e) = nats_delete_stream(url, stream).await
    {
        println!("[teardown] {e:#}");
        removed = false;
    }
    if removed {
        println!("[teardown] {} resources of {topic} removed", source.sink());
    }
}

/// Runs a one-shot `outbox-relay` command with `env`; its stdout, or an error with its output.
async fn relay_cli(relay_bin: &Path, args: &[&str], env: &[(&str, String)]) -> Result<String> {
    let out = Command::new(relay_bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", relay_bin.display()))?;
    if !out.status.success() {
        bail!(
            "outbox-relay {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[allow(clippy::too_many_arguments)]
async fn run_processes(
    args: &Args,
    dbs: &Dbs,
    source: &EventSource,
    topic: &str,
    relay_env: &[(&str, String)],
    relay_bin: &Path,
    service_bin: &Path,
    projector_bin: &Path,
    log_dir: &Path,
) -> Result<bool> {
    let relay_env: Vec<(&str, &str)> = relay_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (relay, _) = Proc::start("relay", relay_bin, &["run"], &relay_env, log_dir, false).await?;
    println!(
        "[setup] relay sidecar: `outbox-relay migrate` done, `outbox-relay run` started (pid {})",
        relay.pid()
    );
    let (service, service_url) = Proc::start(
        "account-service",
        service_bin,
        &["--listen", "127.0.0.1:0"],
        &[("ACCOUNT_SERVICE_DATABASE_URL", dbs.write.as_str())],
        log_dir,
        true,
    )
    .await?;
    let service_url = service_url.context("service URL")?;
    println!(
        "[setup] account service on {service_url} (pid {})",
        service.pid()
    );
    let source_env = source.projector_env();
    let mut projector_env: Vec<(&str, &str)> = vec![
        ("ACCOUNT_TOPIC", topic),
        ("QUERY_DATABASE_URL", dbs.query.as_str()),
        ("LEGACY_DATABASE_URL", dbs.legacy.as_str()),
    ];
    projector_env.extend(source_env.iter().map(|(k, v)| (*k, v.as_str())));
    let start_projector = || {
        Proc::start(
            "account-projector",
            projector_bin,
            &["--listen", "127.0.0.1:0"],
            &projector_env,
            log_dir,
            true,
        )
    };
    let (projector, projector_url) = start_projector().await?;
    println!(
        "[setup] projector on {} (pid {}): query model (group {QUERY_GROUP}) + legacy list (group {LEGACY_GROUP}), reading {} through {}",
        projector_url.unwrap_or_default(),
        projector.pid(),
        source.sink(),
        match source.sink() {
            Sink::Kafka => "rdkafka",
            Sink::Nats => "async-nats (JetStream pull consumers)",
            Sink::Rabbitmq => "lapin (a queue per consumer)",
            Sink::Redis => "redis (XREADGROUP)",
        }
    );

    let mut procs = Running {
        relay: Some(relay),
        service: Some(service),
        projector: Some(projector),
    };
    let result = scenario_and_verify(args, dbs, &service_url, &mut procs, &start_projector).await;
    // Stop everything this driver started, whatever happened.
    for p in [
        procs.projector.take(),
        procs.service.take(),
        procs.relay.take(),
    ]
    .into_iter()
    .flatten()
    {
        let name = p.name;
        match p.stop().await {
            Ok(0) => println!("[teardown] {name} stopped"),
            Ok(code) => println!("[teardown] {name} exited with {code}"),
            Err(e) => println!("[teardown] {e}"),
        }
    }
    result
}

struct Running {
    relay: Option<Proc>,
    service: Option<Proc>,
    projector: Option<Proc>,
}

impl Running {
    fn check(&mut self) -> Result<()> {
        for p in [&mut self.relay, &mut self.service, &mut self.projector]
            .into_iter()
            .flatten()
        {
            p.check_alive()?;
        }
        Ok(())
    }
}

async fn scenario_and_verify<F, Fut>(
    args: &Args,
    dbs: &Dbs,
    service_url: &str,
    procs: &mut Running,
    start_projector: &F,
) -> Result<bool>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(Proc, Option<String>)>>,
{
    let pool = |url: String| async move {
        PgPoolOptions::new()
            .max_connections(3)
            .connect(&url)
            .await
            .context("connecting to a demo database")
    };
    let write = pool(dbs.write.clone()).await?;
    let query = pool(dbs.query.clone()).await?;
    let legacy = pool(dbs.legacy.clone()).await?;
    let mut scenario = Scenario::new(service_url, write.clone(), args.accounts);
    let total = Phase::ALL.len();
    for (n, phase) in Phase::ALL.into_iter().enumerate() {
        let restart_here = !args.no_restart && phase == Phase::Deactivate;
        if restart_here && let Some(p) = procs.projector.take() {
            let code = p.stop().await?;
            println!(
                "[projector] stopped mid-stream (SIGTERM, exit {code}); the next commands happen while it is down"
            );
        }
        let report = scenario.run(phase).await?;
        println!(
            "[{}/{total}] {phase}: {} accepted, {} rejected",
            n + 1,
            report.accepted,
            report.rejected.len()
        );
        for r in &report.rejected {
            println!(
                "      rejected {} {} ({} events written): {}",
                r.status, r.code, r.outbox_rows_written, r.what
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!(
            "{}",
            flow_line(
                &counts(&write, &query, &legacy).await?,
                procs.projector.is_some()
            )
        );
        if restart_here {
            let (p, _) = start_projector().await?;
            println!(
                "[projector] restarted (pid {}): resumes where the broker has it (offsets, acks), the inbox skips anything already applied",
                p.pid()
            );
            procs.projector = Some(p);
        }
        procs.check()?;
    }

    // Converge.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_line = String::new();
    let convergence = loop {
        procs.check()?;
        let c = scenario::compare(&write, &query, &legacy).await?;
        let line = format!(
            "[converge] query model {}/{} events applied, {}/{} accounts; legacy list {} accounts",
            c.read_events_applied, c.events_written, c.read_accounts, c.accounts, c.legacy_accounts
        );
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        if c.converged() || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // Verify.
    let accounts = store::list(&write).await?;
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &accounts {
        *by_status.entry(a.status.as_str()).or_default() += 1;
    }
    let summary: Vec<String> = by_status.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!(
        "[verify] write model: {} accounts ({}), {} events",
        accounts.len(),
        summary.join(", "),
        convergence.events_written
    );
    let c = counts(&write, &query, &legacy).await?;
    // Each model parks in its own database.
    let query_parked: i64 = sqlx::query_scalar("SELECT count(*) FROM query.inbox_parked")
        .fetch_one(&query)
        .await?;
    let legacy_parked: i64 = sqlx::query_scalar("SELECT count(*) FROM legacy.inbox_parked")
        .fetch_one(&legacy)
        .await?;
    let parked = query_parked + legacy_parked;
    let enabled = accounts
        .iter()
        .filter(|a| a.status == Status::Active)
        .count();
    if convergence.converged() {
        println!(
            "[verify] query model: identical to the write model ({} accounts, every one of {} events applied exactly once)",
            convergence.read_accounts, c.query_applied
        );
        println!(
            "[verify] legacy list: {} open accounts, {enabled} enabled — matches the write model",
            convergence.legacy_accounts
        );
        println!(
            "[verify] relay: {} of {} events published; rejected commands wrote none; {parked} records parked",
            c.published, c.written
        );
    } else {
        println!("[verify] MISMATCH after waiting 120 s:");
        for d in convergence.differences.iter().take(20) {
            println!("      {d}");
        }
    }
    Ok(convergence.converged())
}
