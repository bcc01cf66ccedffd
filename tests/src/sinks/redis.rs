//! Redis Streams for the guarantee suite: the relay's settings for the server at `REDIS_URL`
//! (default `redis://127.0.0.1:6379`), nothing to create before publishing (a stream is created
//! by its first entry), and reading a stream back from its start with `XRANGE`.
//!
//! A stream entry maps back onto [`Consumed`] as the sink wrote it
//! (`outbox_relay::sink::redis`): field `key` → key, `value` → value, `ts` → timestamp,
//! `h:<name>` → header `<name>`. The topic is the stream key, the partition 0, and the offset
//! the entry's position in the stream (0, 1, 2, …), so offsets order records as the stream does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::broker::Consumed;
use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// The test server's URL: `REDIS_URL`, or the standard local port.
pub fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// `OUTBOX_SINK=redis` and the server's URL.
pub fn relay_env() -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_SINK", "redis".to_owned()),
        ("OUTBOX_REDIS_URL", url()),
    ]
}

/// Settings under which the sink refuses every record larger than `bytes`.
pub fn size_limit_env(bytes: usize) -> Vec<(&'static str, String)> {
    vec![("OUTBOX_REDIS__MAX_RECORD_BYTES", bytes.to_string())]
}

/// A connection to the test server.
pub async fn connection() -> Result<redis::aio::MultiplexedConnection> {
    connection_to(&url()).await
}

/// A connection to the server at `url`.
pub async fn connection_to(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    // The client's defaults (1 s to connect, 500 ms per reply) are too short for a loaded
    // machine reading a whole stream.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to Redis at {url}"))
}

/// The ids of the connections Redis lists (`CLIENT LIST`) for the relay process `pid`, which
/// names its connections `outbox-relay-<pid>`.
pub async fn relay_connections(pid: u32) -> Result<Vec<String>> {
    let mut conn = connection().await?;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await?;
    let name = format!("name=outbox-relay-{pid} ");
    Ok(list
        .lines()
        .filter(|l| l.contains(&name))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect())
}

/// Kills every connection of the relay process `pid` from the server side (`CLIENT KILL ID`);
/// returns how many Redis killed.
pub async fn kill_relay_connections(pid: u32) -> Result<usize> {
    let mut conn = connection().await?;
    let mut killed = 0;
    for id in relay_connections(pid).await? {
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(&id)
            .query_async(&mut conn)
            .await?;
        killed += usize::try_from(n)?;
    }
    Ok(killed)
}

/// Nothing to create: a stream appears with its first entry. Removes a stream left under the
/// same name (names are unique per test run, so normally there is none).
pub async fn prepare(destination: &str) -> Result<()> {
    let mut conn = connection().await?;
    let _: i64 = redis::cmd("DEL")
        .arg(destination)
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// An entry's fields, as `XRANGE` returns them.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Every entry of `destination` on the server at `url`, from its start, in stream order.
pub async fn read_all(url: &str, destination: &str) -> Result<Vec<Consumed>> {
    let mut conn = connection_to(url).await?;
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page: Vec<(String, Fields)> = redis::cmd("XRANGE")
            .arg(destination)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        let Some((last, _)) = page.last() else {
            break;
        };
        start = format!("({last}");
        for (_, fields) in page {
            let offset = i64::try_from(out.len())?;
            out.push(consumed(destination, offset, fields)?);
        }
    }
    Ok(out)
}

fn consumed(destination: &str, offset: i64, fields: Fields) -> Result<Consumed> {
    let mut record = Consumed {
        topic: destination.to_owned(),
        partition: 0,
        offset,
        key: None,
        value: None,
        headers: BTreeMap::new(),
        timestamp_ms: None,
    };
    for (name, value) in fields {
        let name = String::from_utf8(name)?;
        let value = String::from_utf8(value)?;
        match name.as_str() {
            "key" => record.key = Some(value),
            "value" => record.value = Some(value),
            "ts" => record.timestamp_ms = Some(value.parse()?),
            other => match other.strip_prefix("h:") {
                Some(header) => {
                    record.headers.insert(header.to_owned(), value);
                }
                None => bail!("entry of {destination} has an unknown field `{other}`"),
            },
        }
    }
    Ok(record)
}

/// Reads `destination` from its start until at least `at_least` entries are there and then
/// nothing new for `quiet`, or until `timeout`.
pub async fn consume(
    destination: &str,
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    consume_at(&url(), destination, at_least, quiet, timeout).await
}

/// [`consume`] from the server at `url`.
pub async fn consume_at(
    url: &str,
    destination: &str,
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>> {
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    let mut changed = Instant::now();
    loop {
        let records = read_all(url, destination).await?;
        if records.len() != seen {
            seen = records.len();
            changed = Instant::now();
        }
        if (seen >= at_least && changed.elapsed() >= quiet) || Instant::now() >= deadline {
            return Ok(records);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis server of the test's own (`redis-server` on a free loopback port, data in a
/// temporary directory), which a test may kill and restart. Killed when dropped.
pub struct PrivateRedis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    /// TLS only (no plaintext port): the server's certificate and key, and a password.
    tls: Option<PrivateTls>,
    child: Option<Child>,
}

/// What a TLS-only [`PrivateRedis`] serves with.
#[derive(Debug, Clone)]
pub struct PrivateTls {
    /// PEM certificate of the server.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA that signed it.
    pub ca: PathBuf,
    /// The `default` user's password (`requirepass`).
    pub password: String,
}

impl PrivateRedis {
    /// Starts `redis-server` with `args` added to its command line (e.g. `--appendonly yes`).
    pub async fn start(args: &[&str]) -> Result<Self> {
        Self::launch(args, None).await
    }

    /// A server that speaks only TLS (with `tls`'s certificate) and admits only `tls.password`.
    pub async fn start_tls(tls: PrivateTls) -> Result<Self> {
        Self::launch(&[], Some(tls)).await
    }

    async fn launch(args: &[&str], tls: Option<PrivateTls>) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(crate::unique("outbox-redis"));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            port,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            tls,
            child: None,
        };
        server.restart().await?;
        Ok(server)
    }

    /// `redis://127.0.0.1:<port>`; for a TLS server `rediss://:<password>@127.0.0.1:<port>`
    /// with certificate checks off (the test's own client; the relay under test checks).
    pub fn url(&self) -> String {
        match &self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(tls) => format!(
                "rediss://:{}@127.0.0.1:{}/#insecure",
                tls.password, self.port
            ),
        }
    }

    /// SIGKILLs the server and waits until it is gone.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Starts the server (again) on the same port and directory; returns once it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9().await?;
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => {
                command.arg("--port").arg(self.port.to_string());
            }
            Some(tls) => {
                command
                    .args(["--port", "0", "--tls-port"])
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", "no", "--requirepass"])
                    .arg(&tls.password);
            }
        }
        let child = command
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (Debian package redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut conn) = connection_to(&self.url()).await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not answer", self.port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
