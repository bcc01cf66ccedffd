//! Test harness for end-to-end tests against a real PostgreSQL and a real Kafka-protocol broker.
//!
//! Connection settings come from the environment first (`DATABASE_URL`,
//! `KAFKA_BOOTSTRAP_SERVERS`, as written by `scripts/services.sh up`); with the `docker` feature
//! and no settings, PostgreSQL and Redpanda are started with testcontainers instead.
//!
//! Every test gets its own database and its own topic names, so tests run in parallel against one
//! server and one broker without seeing each other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection, PgPool};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use outbox_relay::{Relay, RelayConfig};

pub mod demo;
pub mod writers;

/// Where the services are.
#[derive(Debug, Clone)]
pub struct Services {
    /// A URL of the server's `postgres` database (used to create per-test databases).
    pub admin_url: String,
    /// Kafka bootstrap servers.
    pub bootstrap: String,
}

static SERVICES: OnceLock<Services> = OnceLock::new();
static LOGGING: OnceLock<()> = OnceLock::new();

/// Installs a test log subscriber once (`RUST_LOG` controls it; quiet by default).
pub fn init_logging() {
    LOGGING.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// The services to test against. Panics with instructions when none are configured.
pub fn services() -> Services {
    init_logging();
    SERVICES
        .get_or_init(|| {
            let db = std::env::var("DATABASE_URL").ok();
            let kafka = std::env::var("KAFKA_BOOTSTRAP_SERVERS").ok();
            match (db, kafka) {
                (Some(admin_url), Some(bootstrap)) => Services {
                    admin_url,
                    bootstrap,
                },
                _ => docker_services().unwrap_or_else(|e| {
                    panic!(
                        "no test services: set DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS \
                         (`source <(scripts/services.sh up && scripts/services.sh env)`, or run \
                         `scripts/test.sh`), or enable the `docker` feature: {e}"
                    )
                }),
            }
        })
        .clone()
}

#[cfg(not(feature = "docker"))]
fn docker_services() -> Result<Services> {
    bail!("the `docker` feature is off")
}

#[cfg(feature = "docker")]
fn docker_services() -> Result<Services> {
    // The blocking runner must not run on a tokio worker thread.
    std::thread::spawn(start_containers)
        .join()
        .map_err(|_| anyhow::anyhow!("starting containers panicked"))?
}

#[cfg(feature = "docker")]
fn start_containers() -> Result<Services> {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::SyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    let pg = GenericImage::new("postgres", "15")
        .with_wait_for(WaitFor::message_on_stderr(
            "database system is ready to accept connections",
        ))
        .with_exposed_port(5432.tcp())
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
        .with_cmd([
            "postgres",
            "-c",
            "wal_level=logical",
            "-c",
            "max_replication_slots=20",
            "-c",
            "max_wal_senders=20",
        ])
        .start()?;
    let pg_port = pg.get_host_port_ipv4(5432)?;
    let kafka = GenericImage::new("redpandadata/redpanda", "v24.2.7")
        .with_wait_for(WaitFor::message_on_stderr("Successfully started Redpanda!"))
        .with_mapped_port(19092, 19092.tcp())
        .with_cmd([
            "redpanda",
            "start",
            "--mode",
            "dev-container",
            "--smp",
            "1",
            "--kafka-addr",
            "0.0.0.0:19092",
            "--advertise-kafka-addr",
            "127.0.0.1:19092",
        ])
        .start()?;
    // The containers live as long as the test process.
    std::mem::forget(pg);
    std::mem::forget(kafka);
    Ok(Services {
        admin_url: format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"),
        bootstrap: "127.0.0.1:19092".to_owned(),
    })
}

/// A short unique suffix for database and topic names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A database created for one test.
pub struct TestDb {
    /// Its URL.
    pub url: String,
    /// Its name.
    pub name: String,
    /// A pool on it.
    pub pool: PgPool,
}

impl TestDb {
    /// Creates a fresh database named after `prefix`.
    pub async fn create(prefix: &str) -> Result<Self> {
        let services = services();
        let name = unique(prefix);
        let mut admin = PgConnection::connect(&services.admin_url)
            .await
            .context("connecting to the test PostgreSQL")?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await?;
        let _ = admin.close().await;
        let opts = PgConnectOptions::from_str(&services.admin_url)?.database(&name);
        let url = replace_database(&services.admin_url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(opts)
            .await?;
        Ok(Self { url, name, pool })
    }

    /// Creates the default outbox table in it.
    pub async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        outbox_core::migrate(&mut conn, &outbox_core::OutboxTable::default()).await?;
        Ok(())
    }

    /// A fresh connection (not from the pool).
    pub async fn connect(&self) -> Result<PgConnection> {
        Ok(PgConnectOptions::from_str(&self.url)?.connect().await?)
    }
}

/// `url` with its database replaced by `name`.
pub fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > base.find("://").map(|s| s + 2).unwrap_or(0) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Creates `topic` with `partitions` partitions (replication 1).
pub async fn create_topic(topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", services().bootstrap)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    Ok(())
}

/// A record read back from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key as UTF-8.
    pub key: Option<String>,
    /// Value as UTF-8.
    pub value: Option<String>,
    /// Headers (last value per name).
    pub headers: BTreeMap<String, String>,
    /// Record timestamp (ms).
    pub timestamp_ms: Option<i64>,
}

impl Consumed {
    /// The `id` header as a UUID.
    pub fn event_id(&self) -> Uuid {
        Uuid::parse_str(self.headers.get("id").expect("record has an id header"))
            .expect("id header is a uuid")
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Reads every record of `topics` from the beginning until at least `at_least` records have
/// arrived and then nothing new for `quiet`, or until `timeout`. Reads past `at_least` so that
/// duplicates are seen too.
pub async fn consume(
    topics: &[&str],
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    consume_from(&services().bootstrap, topics, at_least, quiet, timeout).await
}

/// [`consume`] from another cluster (e.g. librdkafka's mock cluster).
pub async fn consume_from(
    bootstrap: &str,
    topics: &[&str],
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    let bootstrap = bootstrap.to_owned();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        consume_blocking(&bootstrap, &topics, at_least, quiet, timeout)
    })
    .await?
}

fn consume_blocking(
    bootstrap: &str,
    topics: &[String],
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    let deadline = Instant::now() + timeout;
    // Wait for the topics to exist (the relay or the test creates them), then assign every
    // partition from the beginning.
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        loop {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
            let parts = md
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if parts > 0 {
                for p in 0..parts as i32 {
                    tpl.add_partition_offset(topic, p, Offset::Beginning)?;
                }
                break;
            }
            if Instant::now() > deadline {
                bail!("topic {topic} never appeared");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut last_new = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for i in 0..h.count() {
                        let hh = h.get(i);
                        headers.insert(
                            hh.key.to_owned(),
                            hh.value
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default(),
                        );
                    }
                }
                out.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
                    headers,
                    timestamp_ms: m.timestamp().to_millis(),
                });
                last_new = Instant::now();
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "consumer error (retrying)");
            }
            None => {}
        }
        let now = Instant::now();
        if out.len() >= at_least && now.duration_since(last_new) >= quiet {
            return Ok(out);
        }
        if now > deadline {
            return Ok(out);
        }
    }
}

/// What a test wrote: committed and rolled-back event ids, and each aggregate's committed
/// sequence in commit order.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Committed event ids.
    pub committed: HashSet<Uuid>,
    /// Rolled-back event ids.
    pub rolled_back: HashSet<Uuid>,
}

/// What reading the topics back showed, compared with a [`Ledger`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Committed events never read.
    pub lost: usize,
    /// Events read that were never committed.
    pub phantom: usize,
    /// Records read minus distinct ids.
    pub duplicates: usize,
    /// Per aggregate, a lower `outbox-aggregate-seq` read after a higher one (duplicates of an
    /// already-seen sequence number are not inversions).
    pub inversions: usize,
    /// Records read.
    pub records: usize,
}

impl Verdict {
    /// Compares `records` with `ledger`.
    pub fn check(ledger: &Ledger, records: &[Consumed]) -> Self {
        let mut seen = HashSet::new();
        let mut v = Verdict {
            records: records.len(),
            ..Default::default()
        };
        // Order is judged in offset order per partition.
        let mut sorted: Vec<&Consumed> = records.iter().collect();
        sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
        let mut highest: HashMap<(String, String), i64> = HashMap::new();
        for r in sorted {
            let id = r.event_id();
            let first_sighting = seen.insert(id);
            if !first_sighting {
                v.duplicates += 1;
            }
            if !ledger.committed.contains(&id) {
                v.phantom += 1;
            }
            let seq = r
                .header("outbox-aggregate-seq")
                .and_then(|s| s.parse::<i64>().ok());
            if let (Some(key), Some(seq)) = (r.key.clone(), seq) {
                let high = highest.entry((r.topic.clone(), key)).or_insert(i64::MIN);
                if seq < *high {
                    // A redelivered record below the high mark is a duplicate; a first sighting
                    // below it means an earlier event arrived after a later one.
                    if first_sighting {
                        v.inversions += 1;
                    }
                } else {
                    *high = seq;
                }
            }
        }
        v.lost = ledger
            .committed
            .iter()
            .filter(|id| !seen.contains(id))
            .count();
        v
    }
}

/// A relay running inside the test process.
pub struct InProcessRelay {
    /// Cancel to stop it gracefully.
    pub shutdown: CancellationToken,
    /// Its task.
    pub task: tokio::task::JoinHandle<Result<(), outbox_relay::RelayError>>,
    /// Its live figures ([`Relay::stats`]).
    pub stats: std::sync::Arc<outbox_relay::RelayStats>,
}

impl InProcessRelay {
    /// Starts a relay with `config`.
    pub fn start(config: RelayConfig) -> Result<Self> {
        let shutdown = CancellationToken::new();
        let relay = Relay::new(config)?;
        let stats = relay.stats();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Ok(Self {
            shutdown,
            task,
            stats,
        })
    }

    /// Stops it gracefully and returns its result.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

/// A relay configuration for `db`, polling, fast wake-ups, against the test broker.
pub fn relay_config(db: &TestDb) -> RelayConfig {
    let mut c = RelayConfig::default();
    c.database_url = outbox_relay::config::Secret::new(db.url.clone());
    c.kafka.bootstrap_servers = services().bootstrap;
    c.poll_interval = Duration::from_millis(200);
    c.standby_interval = Duration::from_millis(200);
    c.kafka.delivery_timeout = Duration::from_secs(10);
    c
}

/// The `outbox-relay` binary: `$RELAY_BIN` when set (scripts/test.sh builds it first),
/// otherwise the one next to the test executable, (re)built once per test process so a test
/// never runs a stale relay.
pub fn relay_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("RELAY_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test>-<hash> → target/<profile>/outbox-relay
        let profile_dir = exe
            .parent()
            .and_then(|p| p.parent())
            .expect("target/<profile> directory");
        let bin = profile_dir.join("outbox-relay");
        if is_fresh(&bin) {
            return bin;
        }
        let release = profile_dir.file_name().and_then(|n| n.to_str()) == Some("release");
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "outbox-relay",
            "--bin",
            "outbox-relay",
        ]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build for outbox-relay");
        assert!(status.success(), "building outbox-relay failed");
        profile_dir.join("outbox-relay")
    })
    .clone()
}

/// Whether `bin` exists and is newer than every source file it is built from (building it
/// with `-p outbox-relay` resolves features differently from the test build, so it is only
/// rebuilt when it is really stale).
fn is_fresh(bin: &std::path::Path) -> bool {
    fn newest(dir: &std::path::Path, acc: &mut std::time::SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                newest(&p, acc);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                *acc = (*acc).max(m);
            }
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return false;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut latest = std::time::SystemTime::UNIX_EPOCH;
    for dir in ["outbox-relay/src", "outbox-core/src", "outbox-macros/src"] {
        newest(&root.join(dir), &mut latest);
    }
    for file in [
        "Cargo.lock",
        "outbox-relay/Cargo.toml",
        "outbox-core/Cargo.toml",
    ] {
        if let Ok(m) = std::fs::metadata(root.join(file)).and_then(|m| m.modified()) {
            latest = latest.max(m);
        }
    }
    built >= latest
}

/// A relay running as a separate `outbox-relay` process.
pub struct RelayProcess {
    /// The child process.
    pub child: Child,
    /// Its stderr, collected.
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl RelayProcess {
    /// Starts `outbox-relay run` with these extra arguments and environment.
    pub async fn start(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let mut cmd = Command::new(relay_binary());
        cmd.arg("run")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("OUTBOX_DATABASE_URL", &db.url)
            .env("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", services().bootstrap)
            .env("OUTBOX_POLL_INTERVAL", "200ms")
            .env("OUTBOX_STANDBY_INTERVAL", "200ms")
            .env(
                "RUST_LOG",
                std::env::var("RELAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawning outbox-relay")?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        Ok(Self { child, log })
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("relay log never showed `{needle}`; log:\n{}", self.log())
    }

    /// Sends a signal (`libc`-free: through the `kill` command).
    pub async fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.child.id().context("relay already exited")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit code.
    pub async fn terminate(mut self, timeout: Duration) -> Result<(i32, String)> {
        self.signal("TERM").await?;
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("relay did not exit after SIGTERM")??;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok((status.code().unwrap_or(-1), self.log()))
    }

    /// SIGKILL, then waits for it to be gone.
    pub async fn kill9(mut self) -> Result<String> {
        self.signal("KILL").await?;
        let _ = self.child.wait().await?;
        Ok(self.log())
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(mut self, timeout: Duration) -> Result<(i32, String)> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("relay did not exit; log:\n{}", self.log()))??;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok((status.code().unwrap_or(-1), self.log()))
    }
}

/// The relay's log goes to the test's stderr when the handle is dropped: the test runner shows it
/// only for a test that failed, which is when it is needed (also after an early `?` return).
impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(log) = self.log.lock() {
            let pid = self
                .child
                .id()
                .map_or("exited".to_owned(), |p| p.to_string());
            eprintln!("---- relay process ({pid}) log ----\n{log}---- end of relay log ----");
        }
    }
}

/// Counts unpublished rows of the default outbox table.
pub async fn unpublished(pool: &PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(pool)
            .await?,
    )
}

/// Waits until the default outbox table has no unpublished rows.
pub async fn wait_drained(pool: &PgPool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = unpublished(pool).await?;
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{n} events still unpublished after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A minimal HTTP/1.1 GET (the tests need no HTTP client dependency): status and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    http_get_with_token(addr, path, None).await
}

/// [`http_get`] with an optional bearer token (`Authorization: Bearer …`).
pub async fn http_get_with_token(
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The admin address a relay logged (`admin endpoint listening addr=…`), from a JSON or a
/// pretty log.
pub fn admin_addr(log: &str) -> Option<String> {
    let json = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "admin endpoint listening")
        .and_then(|v| v["fields"]["addr"].as_str().map(str::to_owned));
    json.or_else(|| {
        let plain = log
            .replace("\u{1b}[3m", "")
            .replace("\u{1b}[0m", "")
            .replace("\u{1b}[2m", "");
        plain
            .lines()
            .find(|l| l.contains("admin endpoint listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .map(|a| {
                a.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_owned()
            })
    })
}

/// The value of an unlabelled sample `name` in a Prometheus scrape.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
