//! Many tables, one broker connection: a relay of six `[[outbox]]` tables holds exactly one
//! connection to NATS, one to Redis and one to RabbitMQ, counted from the server's side
//! (NATS's `/connz` monitoring, Redis's `CLIENT LIST`, `rabbitmqctl list_connections`), and
//! every table's events still arrive in per-aggregate order when Redis or RabbitMQ cuts that
//! one connection. See `outbox_relay::sink::shared` and docs/operations.md, "Many tables per
//! relay".

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use outbox_tests::sinks::nats as nats_broker;
use outbox_tests::sinks::rabbitmq as rabbit_broker;
use outbox_tests::sinks::redis as redis_broker;
use outbox_tests::tables::*;
use outbox_tests::*;
use uuid::Uuid;

const TABLES: usize = 6;
const QUIET: Duration = Duration::from_millis(1500);

/// Six tables `mts{i}.outbox`, migrated, each routed to `{tag}.t{i}.{aggregatetype}`: the
/// relay configuration and each table's destination for the aggregate type `Acct`.
async fn six_tables(db: &TestDb, tag: &str) -> Result<(String, Vec<(String, String)>)> {
    let mut toml = String::new();
    let mut tables = Vec::new();
    for i in 0..TABLES {
        let table = format!("mts{i}.outbox");
        migrate_table(db, &table).await?;
        toml.push_str(&format!(
            "[[outbox]]\ntable = \"{table}\"\n[outbox.route]\ntopic = \"{tag}.t{i}.{{aggregatetype}}\"\n\n"
        ));
        tables.push((table, format!("{tag}.t{i}.Acct")));
    }
    Ok((toml, tables))
}

/// Polls `count` until it returns `want` on five reads in a row (200 ms apart), within 30 s.
async fn settles_at<F, Fut>(want: usize, what: &str, mut count: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streak = 0;
    let mut last = 0;
    while streak < 5 {
        if Instant::now() > deadline {
            bail!("{what}: {last} connections, expected {want}");
        }
        last = count().await?;
        streak = if last == want { streak + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Writes `rounds` events for each of 3 aggregates into every table and checks each table's
/// destination receives them (re-sent copies allowed) with every aggregate in write order.
async fn all_arrive(
    db: &TestDb,
    tables: &[(String, String)],
    rounds: std::ops::RangeInclusive<i64>,
    written: &mut BTreeMap<String, BTreeMap<String, Vec<Uuid>>>,
    consume: impl AsyncConsume,
) -> Result<()> {
    for (table, _) in tables {
        let w = write_rounds(db, table, "Acct", 3, rounds.clone()).await?;
        let all = written.entry(table.clone()).or_default();
        for (aggregate, ids) in w {
            all.entry(aggregate).or_default().extend(ids);
        }
    }
    for (table, destination) in tables {
        wait_table_drained(db, table, LONG).await?;
        let expected = written[table].values().map(Vec::len).sum();
        let records = consume.consume(destination, expected).await?;
        check_complete_and_ordered(&records, &written[table], table)?;
    }
    Ok(())
}

/// Writes rounds `21..=120` into every table and, once the first table has rows waiting, runs
/// `cut` (which cuts the relay's broker connections and returns how many); the rows written join
/// `written`. Returns what `cut` returned.
async fn cut_while_writing<Fut>(
    db: &TestDb,
    tables: &[(String, String)],
    written: &mut BTreeMap<String, BTreeMap<String, Vec<Uuid>>>,
    cut: impl FnOnce() -> Fut,
) -> Result<usize>
where
    Fut: std::future::Future<Output = Result<usize>>,
{
    let writes = async {
        let mut written = BTreeMap::new();
        for (table, _) in tables {
            written.insert(
                table.clone(),
                write_rounds(db, table, "Acct", 3, 21..=120).await?,
            );
        }
        anyhow::Ok(written)
    };
    let cut = async {
        let deadline = Instant::now() + LONG;
        while pending(db, &tables[0].0).await? == 0 {
            ensure!(Instant::now() < deadline, "no events were written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cut().await
    };
    let (w, cut) = tokio::join!(writes, cut);
    for (table, w) in w? {
        let all = written.entry(table).or_default();
        for (aggregate, ids) in w {
            all.entry(aggregate).or_default().extend(ids);
        }
    }
    cut
}

/// Reads a destination back from the broker under test.
trait AsyncConsume {
    async fn consume(&self, destination: &str, at_least: usize) -> Result<Vec<Consumed>>;
}

struct RedisAt(String);

impl AsyncConsume for &RedisAt {
    async fn consume(&self, destination: &str, at_least: usize) -> Result<Vec<Consumed>> {
        redis_broker::consume_at(&self.0, destination, at_least, QUIET, LONG).await
    }
}

struct NatsAt(String);

impl AsyncConsume for &NatsAt {
    async fn consume(&self, destination: &str, at_least: usize) -> Result<Vec<Consumed>> {
        nats_broker::consume_at(&self.0, destination, at_least, QUIET, LONG).await
    }
}

/// Six tables on Redis: one connection (`CLIENT LIST`) for all of them, the idle probes
/// included; when Redis kills it, every table's events still arrive in order, over one new
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tables_share_one_connection_and_survive_its_loss() -> Result<()> {
    let db = TestDb::create("mts_redis").await?;
    let tag = unique("mts");
    let (toml, tables) = six_tables(&db, &tag).await?;
    let env = [
        ("OUTBOX_SINK", "redis".to_owned()),
        ("OUTBOX_REDIS_URL", redis_broker::url()),
        ("OUTBOX_REDIS__DEDUPE_PREFIX", unique("mts:dedupe")),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (relay, _addr, _config) = start_relay(&db, &toml, &env).await?;
    let pid = relay.child.pid();
    let at = RedisAt(redis_broker::url());
    let mut written = BTreeMap::new();
    all_arrive(&db, &tables, 1..=20, &mut written, &at).await?;
    settles_at(1, "Redis connections of a 6-table relay", || async {
        Ok(redis_broker::relay_connections(pid).await?.len())
    })
    .await?;

    // Redis cuts the one connection while the tables are publishing.
    let killed = cut_while_writing(&db, &tables, &mut written, || {
        redis_broker::kill_relay_connections(pid)
    })
    .await?;
    ensure!(killed == 1, "killed {killed} connections of the relay");
    all_arrive(&db, &tables, 121..=130, &mut written, &at).await?;
    settles_at(1, "Redis connections after the cut", || async {
        Ok(redis_broker::relay_connections(pid).await?.len())
    })
    .await?;
    stop_cleanly(relay).await?;
    Ok(())
}

/// A private `nats-server` with JetStream and its HTTP monitoring (`/connz`) on free ports.
struct MonitoredNats {
    port: u16,
    monitor: u16,
    dir: std::path::PathBuf,
    child: tokio::process::Child,
}

impl MonitoredNats {
    async fn start() -> Result<Self> {
        let free = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (port, monitor) = (free()?, free()?);
        let dir = std::env::temp_dir().join(unique("nats-connz"));
        std::fs::create_dir_all(&dir)?;
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = tokio::process::Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string(), "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin} (set NATS_SERVER_BIN)"))?;
        let server = Self {
            port,
            monitor,
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.connections().await.is_err() {
            ensure!(Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The names of the client connections the server lists (`/connz`).
    async fn connections(&self) -> Result<Vec<String>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.monitor)).await?;
        stream
            .write_all(b"GET /connz?limit=1024 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .context("no HTTP body from /connz")?;
        let connz: serde_json::Value = serde_json::from_str(body)?;
        Ok(connz["connections"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Drop for MonitoredNats {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Six tables on NATS: the server lists one `outbox-relay` connection for all of them, the
/// idle probes included, and every table's events arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tables_share_one_connection() -> Result<()> {
    let server = MonitoredNats::start().await?;
    let db = TestDb::create("mts_nats").await?;
    let tag = unique("mts");
    let (toml, tables) = six_tables(&db, &tag).await?;
    for (_, destination) in &tables {
        nats_broker::prepare_at(&server.url(), destination, None).await?;
    }
    let env = [
        ("OUTBOX_SINK", "nats".to_owned()),
        ("OUTBOX_NATS_URL", server.url()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (relay, _addr, _config) = start_relay(&db, &toml, &env).await?;
    let at = NatsAt(server.url());
    let mut written = BTreeMap::new();
    all_arrive(&db, &tables, 1..=20, &mut written, &at).await?;
    settles_at(1, "NATS connections of a 6-table relay", || async {
        Ok(server
            .connections()
            .await?
            .iter()
            .filter(|n| n.as_str() == "outbox-relay")
            .count())
    })
    .await?;
    stop_cleanly(relay).await?;
    Ok(())
}

/// The server-side process ids (`rabbitmqctl list_connections pid`, what `close_connection`
/// takes) of the AMQP connections of the relay process `pid`, told apart by their `connection_name` client property
/// (`outbox-relay-<pid>`).
async fn rabbit_connections(pid: u32) -> Result<Vec<String>> {
    let bin = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let out = tokio::process::Command::new(&bin)
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .await
        .with_context(|| format!("running {bin} (set RABBITMQCTL)"))?;
    ensure!(
        out.status.success(),
        "{bin} list_connections: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One `<pid>\t<client properties>` line per connection after a header line; the properties
    // print as Erlang terms, the name as `<<"outbox-relay-<pid>">>`.
    let name = format!("\"outbox-relay-{pid}\"");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| l.contains(&name))
        .filter_map(|l| l.split('\t').next())
        .map(str::to_owned)
        .collect())
}

struct RabbitAt;

impl AsyncConsume for &RabbitAt {
    async fn consume(&self, destination: &str, at_least: usize) -> Result<Vec<Consumed>> {
        rabbit_broker::consume(destination, at_least, QUIET, LONG).await
    }
}

/// Six tables on RabbitMQ: the broker lists one connection of the relay for all of them (one
/// confirm channel per table), the idle probes included; when the broker closes it while the
/// tables publish, every table's events still arrive in per-aggregate order, over one new
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_tables_share_one_connection_and_survive_its_loss() -> Result<()> {
    let db = TestDb::create("mts_rabbit").await?;
    let tag = unique("mts");
    let (toml, tables) = six_tables(&db, &tag).await?;
    for (_, destination) in &tables {
        rabbit_broker::prepare(destination).await?;
    }
    let env = rabbit_broker::relay_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (relay, _addr, _config) = start_relay(&db, &toml, &env).await?;
    let pid = relay.child.pid();
    let mut written = BTreeMap::new();
    all_arrive(&db, &tables, 1..=20, &mut written, &RabbitAt).await?;
    settles_at(1, "RabbitMQ connections of a 6-table relay", || async {
        Ok(rabbit_connections(pid).await?.len())
    })
    .await?;

    // The broker closes the one connection while the tables are publishing.
    let cut = cut_while_writing(&db, &tables, &mut written, || async {
        let names = rabbit_connections(pid).await?;
        for name in &names {
            let out = tokio::process::Command::new("rabbitmqctl")
                .args(["close_connection", name, "test cuts the relay's connection"])
                .output()
                .await?;
            ensure!(
                out.status.success(),
                "rabbitmqctl close_connection {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(names.len())
    })
    .await?;
    ensure!(cut == 1, "cut {cut} connections of the relay");
    all_arrive(&db, &tables, 121..=130, &mut written, &RabbitAt).await?;
    settles_at(1, "RabbitMQ connections after the cut", || async {
        Ok(rabbit_connections(pid).await?.len())
    })
    .await?;
    stop_cleanly(relay).await?;
    Ok(())
}
