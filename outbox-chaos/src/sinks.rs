//! The other sinks under broker faults (issue 14): NATS JetStream, RabbitMQ and Redis Streams.
//!
//! Every sink scenario talks to a **private** broker process on a free loopback port, never to
//! the machine's shared servers: `nats-server` and `redis-server` are started per run (they
//! start in well under a second), one RabbitMQ node is started for the whole session on first
//! use (it takes seconds) and stopped at its end ([`shutdown`]). A scenario may SIGKILL its
//! broker and start it again on the same port and data directory, cut the relay's connections
//! from the server side (Redis `CLIENT KILL`; for NATS and RabbitMQ a loopback forwarder in front
//! of the server closes every socket it carries), and relies on a broker-side size limit
//! (the stream's `max_msg_size`, RabbitMQ's `max_message_size`, Redis' `proto-max-bulk-len`) to
//! refuse a message for good. Destinations are read back through each broker's own client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use outbox_tests::Consumed;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::workload::{RunDb, SharedBook};

/// With this variable set to `1`, a missing broker binary fails the sink scenarios instead of
/// skipping them.
pub const REQUIRE_ENV: &str = "OUTBOX_CHAOS_REQUIRE_SINKS";

/// The largest message a scenario's NATS stream stores (`max_msg_size`), below the server's
/// `max_payload` (1 MiB), so that the stream itself refuses the broker-limit poison.
pub const NATS_STREAM_MAX_MSG: i32 = 256 * 1024;

/// The private RabbitMQ node's `max_message_size` (the relay's own limit stays at its 16 MiB
/// default, so the broker is what refuses).
pub const RABBITMQ_MAX_MESSAGE: usize = 256 * 1024;

/// The private Redis server's `proto-max-bulk-len` (its minimum); the relay's own
/// `max_record_bytes` is raised above it, so the server's limit is what refuses.
pub const REDIS_MAX_BULK: usize = 1024 * 1024;

/// A harness-side mutant (not a relay build): the broker forgets which event ids it has
/// stored — the NATS stream's duplicate window is 100 ms (its minimum), the relay's Redis dedupe keys are
/// deleted as they appear — so re-sent records are stored again. The duplicate check of the
/// NATS and Redis scenarios (none allowed) must catch it.
pub const DEDUPE_OFF: &str = "broker_dedupe_off";

/// The exchange the relay publishes to (its default `rabbitmq.exchange`).
const EXCHANGE: &str = "outbox";

/// The sink a scenario runs the relay with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// The default: Tansu or librdkafka's mock cluster.
    Kafka,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ with publisher confirms.
    Rabbitmq,
    /// Redis Streams.
    Redis,
}

impl Sink {
    /// `kafka`, `nats`, `rabbitmq`, `redis` (`OUTBOX_SINK`).
    pub fn as_str(self) -> &'static str {
        match self {
            Sink::Kafka => "kafka",
            Sink::Nats => "nats",
            Sink::Rabbitmq => "rabbitmq",
            Sink::Redis => "redis",
        }
    }

    /// The broker's server binary and the Debian package that ships it.
    fn server(self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            Sink::Kafka => None,
            Sink::Nats => Some(("nats-server", "NATS_SERVER_BIN", "nats-server")),
            Sink::Rabbitmq => Some(("rabbitmq-server", "RABBITMQ_SERVER_BIN", "rabbitmq-server")),
            Sink::Redis => Some(("redis-server", "REDIS_SERVER_BIN", "redis-server")),
        }
    }

    /// Size of the payload of the poison event the broker (not the relay) must refuse: a bit
    /// over the private broker's limit.
    pub fn broker_poison_bytes(self) -> usize {
        64 * 1024
            + match self {
                Sink::Kafka => 1024 * 1024,
                Sink::Nats => NATS_STREAM_MAX_MSG as usize,
                Sink::Rabbitmq => RABBITMQ_MAX_MESSAGE,
                Sink::Redis => REDIS_MAX_BULK,
            }
    }

    /// Words a park reason for the broker-limit poison must contain (one of them).
    pub fn refusal_words(self) -> &'static [&'static str] {
        match self {
            Sink::Kafka => &["too large", "MESSAGE_TOO_LARGE"],
            Sink::Nats => &["max_msg_size", "MAX_PAYLOAD", "EXCEEDS_MAXIMUM", "10054"],
            Sink::Rabbitmq => &["PRECONDITION_FAILED", "max_message_size", "message size"],
            Sink::Redis => &["proto-max-bulk-len", "max_record_bytes"],
        }
    }
}

/// Where the server binary of `sink` is: `$<NAME>_BIN`, then `PATH`, `/usr/sbin`, `/usr/bin`.
/// `Err` says why the sink's scenarios cannot run.
pub fn server_binary(sink: Sink) -> std::result::Result<PathBuf, String> {
    let Some((name, var, package)) = sink.server() else {
        return Err(format!("{} needs no private server", sink.as_str()));
    };
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{var}={} is not a file", p.display()))
        };
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("`{name}` not found in PATH, /usr/sbin or /usr/bin (Debian package {package}; or set {var})")
        })
}

/// Broker processes alive now: the pids of per-run servers and the RabbitMQ node's pid file.
/// A harness that dies without unwinding (a panic in `main`, a failed write to stderr) would
/// leave them running; [`kill_leftovers`] ends them from a panic hook.
static LIVE: std::sync::Mutex<(Vec<u32>, Option<PathBuf>)> =
    std::sync::Mutex::new((Vec::new(), None));

fn live() -> std::sync::MutexGuard<'static, (Vec<u32>, Option<PathBuf>)> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// SIGKILLs every broker process this harness started that is still alive (synchronous, for a
/// panic hook).
pub fn kill_leftovers() {
    let (pids, pid_file) = {
        let g = live();
        (g.0.clone(), g.1.clone())
    };
    let mut targets: Vec<String> = pids.iter().map(u32::to_string).collect();
    if let Some(pid) = pid_file.and_then(|f| std::fs::read_to_string(f).ok()) {
        targets.push(pid.trim().to_owned());
    }
    targets.retain(|p| !p.is_empty());
    if !targets.is_empty() {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .args(&targets)
            .status();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(port: u16, child: &mut Child, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "{what} exited with {status} before listening on 127.0.0.1:{port}: {}",
                tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what} did not listen on 127.0.0.1:{port} within 90s: {}",
                tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

fn log_file(dir: &Path, name: &str) -> Result<(PathBuf, Stdio, Stdio)> {
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let err = file.try_clone()?;
    Ok((path, Stdio::from(file), Stdio::from(err)))
}

/// A `nats-server` (JetStream, file store) or `redis-server` (`appendonly yes`, `appendfsync
/// always`) of one run, on a free loopback port; killed and its directory removed on drop.
struct Server {
    sink: Sink,
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    async fn start(sink: Sink) -> Result<Self> {
        let bin = server_binary(sink).map_err(anyhow::Error::msg)?;
        let dir = std::env::temp_dir().join(outbox_tests::unique(&format!(
            "outbox-chaos-{}",
            sink.as_str()
        )));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            sink,
            bin,
            port: free_port()?,
            dir,
            child: None,
        };
        s.run().await?;
        Ok(s)
    }

    async fn run(&mut self) -> Result<()> {
        let (log, out, err) = log_file(&self.dir, "server.log")?;
        let mut cmd = Command::new(&self.bin);
        let port = self.port.to_string();
        match self.sink {
            Sink::Nats => {
                cmd.args(["-js", "-a", "127.0.0.1", "-p", port.as_str(), "-sd"])
                    .arg(self.dir.join("store"));
            }
            _ => {
                let bulk = REDIS_MAX_BULK.to_string();
                cmd.args(["--port", port.as_str(), "--bind", "127.0.0.1", "--save", ""])
                    .args(["--appendonly", "yes", "--appendfsync", "always"])
                    .args([
                        "--protected-mode",
                        "no",
                        "--proto-max-bulk-len",
                        bulk.as_str(),
                    ])
                    .arg("--dir")
                    .arg(&self.dir);
            }
        }
        let mut child = cmd
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        if let Some(pid) = child.id() {
            live().0.push(pid);
        }
        let what = self.bin.display().to_string();
        wait_listening(self.port, &mut child, &what, &log).await?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            child.start_kill()?;
            child.wait().await?;
            live().0.retain(|p| Some(*p) != pid);
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let pid = child.id();
            let _ = child.start_kill();
            live().0.retain(|p| Some(*p) != pid);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The session's private RabbitMQ node (`chaos<port>@localhost`, its own data, logs and
/// configuration with [`RABBITMQ_MAX_MESSAGE`]).
struct RabbitNode {
    bin: PathBuf,
    port: u16,
    dist_port: u16,
    base: PathBuf,
    child: Option<Child>,
}

fn rabbit_slot() -> &'static tokio::sync::Mutex<Option<RabbitNode>> {
    static NODE: OnceLock<tokio::sync::Mutex<Option<RabbitNode>>> = OnceLock::new();
    NODE.get_or_init(|| tokio::sync::Mutex::new(None))
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl RabbitNode {
    async fn start() -> Result<Self> {
        let bin = server_binary(Sink::Rabbitmq).map_err(anyhow::Error::msg)?;
        let base = std::env::temp_dir().join(outbox_tests::unique("outbox-chaos-rabbitmq"));
        std::fs::create_dir_all(&base)?;
        std::fs::write(
            base.join("rabbitmq.conf"),
            format!("max_message_size = {RABBITMQ_MAX_MESSAGE}\n"),
        )?;
        std::fs::write(base.join("enabled_plugins"), "[].\n")?;
        // Run as root, the server script drops to the `rabbitmq` user, which must own the node's
        // directories.
        if is_root() {
            let _ = std::process::Command::new("chown")
                .args(["-R", "rabbitmq"])
                .arg(&base)
                .status();
        }
        live().1 = Some(base.join("pid"));
        let mut node = Self {
            bin,
            port: free_port()?,
            dist_port: free_port()?,
            base,
            child: None,
        };
        node.run().await?;
        Ok(node)
    }

    fn url(&self, port: u16) -> String {
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    }

    async fn run(&mut self) -> Result<()> {
        let b = |p: &str| self.base.join(p);
        let (log, out, err) = log_file(&self.base, "server.log")?;
        let started = Instant::now();
        let mut child = Command::new(&self.bin)
            .env("RABBITMQ_NODENAME", format!("chaos{}@localhost", self.port))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", b("mnesia"))
            .env("RABBITMQ_LOG_BASE", b("log"))
            .env("RABBITMQ_PID_FILE", b("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", b("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", b("rabbitmq"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", b("feature_flags"))
            .env("ERL_CRASH_DUMP", b("erl_crash.dump"))
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        wait_listening(self.port, &mut child, "rabbitmq-server", &log).await?;
        self.child = Some(child);
        eprintln!(
            "chaos:     private RabbitMQ node on 127.0.0.1:{} up in {:.1}s",
            self.port,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// SIGKILLs the Erlang VM (its pid is in the node's pid file; the server script goes with it).
    async fn kill9(&mut self) -> Result<()> {
        if let Ok(pid) = std::fs::read_to_string(self.base.join("pid")) {
            let pid = pid.trim().to_owned();
            if !pid.is_empty() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status().await;
            }
        }
        if let Some(mut child) = self.child.take()
            && tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
        {
            child.start_kill()?;
            child.wait().await?;
        }
        let _ = std::fs::remove_file(self.base.join("pid"));
        Ok(())
    }
}

/// Stops the session's RabbitMQ node, if one was started, and removes its directory.
pub async fn shutdown() {
    let mut slot = rabbit_slot().lock().await;
    if let Some(mut node) = slot.take() {
        let _ = node.kill9().await;
        let _ = std::fs::remove_dir_all(&node.base);
    }
    live().1 = None;
}

/// A loopback forwarder in front of a broker whose connections can all be closed at once, as a
/// server closing them would.
struct Forwarder {
    port: u16,
    cut: tokio::sync::watch::Sender<u64>,
    open: Arc<AtomicUsize>,
    /// While set, what the server sends is read and thrown away (acknowledgements and confirms
    /// never reach the relay); [`Forwarder::cut`] clears it.
    swallow: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies `from` to `to` until either side closes; while `swallow` is set the bytes are dropped.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    swallow: Option<Arc<AtomicBool>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if swallow.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Forwarder {
    async fn start(upstream: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, watch) = tokio::sync::watch::channel(0u64);
        let open = Arc::new(AtomicUsize::new(0));
        let swallow = Arc::new(AtomicBool::new(false));
        let (counter, muted) = (open.clone(), swallow.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut watch = watch.clone();
                watch.mark_unchanged();
                let counter = counter.clone();
                let muted = muted.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let (client_read, client_write) = inbound.into_split();
                    let (server_read, server_write) = outbound.into_split();
                    tokio::select! {
                        _ = pipe(client_read, server_write, None) => {}
                        _ = pipe(server_read, client_write, Some(muted)) => {}
                        _ = watch.changed() => {}
                    }
                    counter.fetch_sub(1, Ordering::SeqCst);
                    // All four halves dropped here: both sockets closed under the relay.
                });
            }
        });
        Ok(Self {
            port,
            cut,
            open,
            swallow,
            task,
        })
    }

    /// Closes every connection open now; returns how many.
    fn cut(&self) -> usize {
        let n = self.open.load(Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
        self.swallow.store(false, Ordering::SeqCst);
        n
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.send_modify(|g| *g += 1);
    }
}

/// What a destination held, read back through the broker's client.
#[derive(Debug, Default)]
pub struct Readback {
    /// Every record in the broker's order (stream sequence, queue order, stream entry order).
    pub records: Vec<Consumed>,
    /// Records whose broker-level message id (`Nats-Msg-Id`, AMQP `message_id`) is missing or
    /// differs from the `id` header: a duplicate must be detectable by the event id.
    pub id_mismatch: usize,
}

/// One run's private broker: the server, an optional forwarder the relay connects through, and
/// the destination's name.
pub struct Broker {
    /// Which sink.
    pub sink: Sink,
    server: Option<Server>,
    forwarder: Option<Forwarder>,
    destination: String,
    /// [`DEDUPE_OFF`]: the stream's duplicate window is 100 ms (its minimum), or this task deletes the
    /// relay's Redis dedupe keys.
    dedupe_off: bool,
    forgetter: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(t) = self.forgetter.take() {
            t.abort();
        }
    }
}

impl Broker {
    /// Starts (or, for RabbitMQ, reuses) the private broker for `sink` and prepares
    /// `destination`: a NATS stream capturing it with [`NATS_STREAM_MAX_MSG`], a durable
    /// RabbitMQ queue bound to the relay's exchange for it, nothing for Redis. With
    /// `forwarder`, the relay connects through a [`Forwarder`]. With
    /// `dedupe_off`, the [`DEDUPE_OFF`] mutant (the relay's dedupe keys are `chaos:<tag>:*`).
    pub async fn start(
        sink: Sink,
        destination: &str,
        forwarder: bool,
        dedupe_off: bool,
        tag: &str,
    ) -> Result<Self> {
        let server = match sink {
            Sink::Nats | Sink::Redis => Some(Server::start(sink).await?),
            Sink::Rabbitmq => {
                let mut slot = rabbit_slot().lock().await;
                let alive = match slot.as_mut().and_then(|n| n.child.as_mut()) {
                    Some(child) => child.try_wait().ok().flatten().is_none(),
                    None => false,
                };
                if !alive {
                    if let Some(mut old) = slot.take() {
                        let _ = old.kill9().await;
                        let _ = std::fs::remove_dir_all(&old.base);
                    }
                    *slot = Some(RabbitNode::start().await?);
                }
                None
            }
            Sink::Kafka => bail!("Kafka runs on Tansu or the mock cluster, not a private broker"),
        };
        let mut b = Self {
            sink,
            server,
            forwarder: None,
            destination: destination.to_owned(),
            dedupe_off,
            forgetter: None,
        };
        if forwarder {
            b.forwarder = Some(Forwarder::start(b.server_port().await?).await?);
        }
        b.prepare().await?;
        if dedupe_off && sink == Sink::Redis {
            b.forgetter = Some(tokio::spawn(forget_dedupe_keys(
                b.direct_url().await?,
                format!("chaos:{tag}:*"),
            )));
        }
        Ok(b)
    }

    async fn server_port(&self) -> Result<u16> {
        match &self.server {
            Some(s) => Ok(s.port),
            None => rabbit_slot()
                .lock()
                .await
                .as_ref()
                .map(|n| n.port)
                .context("the private RabbitMQ node is gone"),
        }
    }

    /// The URL the harness itself uses (never through the forwarder).
    async fn direct_url(&self) -> Result<String> {
        let port = self.server_port().await?;
        Ok(match self.sink {
            Sink::Nats => format!("nats://127.0.0.1:{port}"),
            Sink::Redis => format!("redis://127.0.0.1:{port}"),
            _ => format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        })
    }

    /// The relay's sink settings: `OUTBOX_SINK`, the URL (through the forwarder when there is
    /// one), short timeouts, and the relay's own size limits above the broker's.
    pub async fn relay_env(&self, tag: &str) -> Result<Vec<(String, String)>> {
        let port = match &self.forwarder {
            Some(f) => f.port,
            None => self.server_port().await?,
        };
        let kv = |k: &str, v: String| (k.to_owned(), v);
        let mut env = vec![kv("OUTBOX_SINK", self.sink.as_str().to_owned())];
        match self.sink {
            Sink::Nats => env.extend([
                kv("OUTBOX_NATS_URL", format!("nats://127.0.0.1:{port}")),
                kv("OUTBOX_NATS__DELIVERY_TIMEOUT", "3s".into()),
                kv("OUTBOX_NATS__CONNECT_TIMEOUT", "1s".into()),
            ]),
            Sink::Redis => env.extend([
                kv("OUTBOX_REDIS_URL", format!("redis://127.0.0.1:{port}")),
                kv("OUTBOX_REDIS__DELIVERY_TIMEOUT", "3s".into()),
                kv("OUTBOX_REDIS__CONNECT_TIMEOUT", "1s".into()),
                kv("OUTBOX_REDIS__DEDUPE_PREFIX", format!("chaos:{tag}")),
                kv(
                    "OUTBOX_REDIS__MAX_RECORD_BYTES",
                    (16 * 1024 * 1024).to_string(),
                ),
            ]),
            _ => {
                let url = match rabbit_slot().lock().await.as_ref() {
                    Some(n) => n.url(port),
                    None => bail!("the private RabbitMQ node is gone"),
                };
                env.extend([
                    kv("OUTBOX_RABBITMQ__URL", url),
                    kv("OUTBOX_RABBITMQ__EXCHANGE", EXCHANGE.to_owned()),
                    kv("OUTBOX_RABBITMQ__DELIVERY_TIMEOUT", "3s".into()),
                    kv("OUTBOX_RABBITMQ__CONNECT_TIMEOUT", "2s".into()),
                ]);
            }
        }
        Ok(env)
    }

    async fn prepare(&self) -> Result<()> {
        let url = self.direct_url().await?;
        match self.sink {
            Sink::Nats => {
                let js = nats_context(&url).await?;
                js.create_or_update_stream(async_nats::jetstream::stream::Config {
                    name: nats_stream_name(&self.destination),
                    subjects: vec![self.destination.clone()],
                    storage: async_nats::jetstream::stream::StorageType::File,
                    duplicate_window: if self.dedupe_off {
                        Duration::from_millis(100)
                    } else {
                        Duration::from_secs(120)
                    },
                    max_message_size: NATS_STREAM_MAX_MSG,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating a stream for {}", self.destination))?;
            }
            Sink::Rabbitmq => {
                use lapin::options::{
                    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
                };
                use lapin::types::FieldTable;
                let conn = amqp_connect(&url).await?;
                let ch = conn.create_channel().await?;
                ch.exchange_declare(
                    EXCHANGE.into(),
                    lapin::ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
                ch.queue_declare(
                    self.destination.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
                ch.queue_bind(
                    self.destination.as_str().into(),
                    EXCHANGE.into(),
                    self.destination.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
                conn.close(200, "prepared".into()).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// SIGKILLs the broker process and waits until it is gone.
    pub async fn kill9(&mut self) -> Result<()> {
        match self.server.as_mut() {
            Some(s) => s.kill9().await,
            None => match rabbit_slot().lock().await.as_mut() {
                Some(n) => n.kill9().await,
                None => Ok(()),
            },
        }
    }

    /// Starts the broker again on the same port and data; returns once it listens.
    pub async fn restart(&mut self) -> Result<()> {
        match self.server.as_mut() {
            Some(s) => s.run().await,
            None => match rabbit_slot().lock().await.as_mut() {
                Some(n) => n.run().await,
                None => bail!("the private RabbitMQ node is gone"),
            },
        }
    }

    /// From now until the next [`Broker::cut`], what the server sends through the forwarder is
    /// thrown away: the broker stores what the relay publishes, but its acknowledgements never
    /// arrive (a half-dead connection). `false` without a forwarder.
    pub fn swallow_acks(&self) -> bool {
        match &self.forwarder {
            Some(f) => {
                f.swallow.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Cuts the relay's connections from the server side: Redis `CLIENT KILL TYPE normal` (every
    /// client but the harness's own; the forwarder then closes the relay's side), else — and
    /// after [`Broker::swallow_acks`] — the forwarder closes every socket it carries.
    /// Returns how many connections were cut.
    pub async fn cut(&self) -> Result<usize> {
        let swallowing = self
            .forwarder
            .as_ref()
            .is_some_and(|f| f.swallow.load(Ordering::SeqCst));
        if self.sink == Sink::Redis && !swallowing {
            let mut conn = redis_connect(&self.direct_url().await?).await?;
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .arg("SKIPME")
                .arg("yes")
                .query_async(&mut conn)
                .await?;
            return Ok(usize::try_from(n)?);
        }
        let f = self
            .forwarder
            .as_ref()
            .context("no forwarder to cut connections with")?;
        Ok(f.cut())
    }

    /// Reads the destination back from its start through the broker's client, waiting (up to
    /// `timeout`) until at least `at_least` records are there.
    pub async fn read_all(&self, at_least: usize, timeout: Duration) -> Result<Readback> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = match self.sink {
                Sink::Nats => self.read_nats().await?,
                Sink::Redis => self.read_redis().await?,
                _ => self.read_rabbitmq().await?,
            };
            if r.records.len() >= at_least || Instant::now() > deadline {
                return Ok(r);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn read_nats(&self) -> Result<Readback> {
        let js = nats_context(&self.direct_url().await?).await?;
        let mut stream = js
            .get_stream(nats_stream_name(&self.destination))
            .await
            .with_context(|| format!("the stream of {}", self.destination))?;
        let state = stream.info().await?.state.clone();
        let mut out = Readback::default();
        if state.messages == 0 {
            return Ok(out);
        }
        for seq in state.first_sequence..=state.last_sequence {
            let m = stream
                .get_raw_message(seq)
                .await
                .with_context(|| format!("stream message {seq}"))?;
            let mut headers = BTreeMap::new();
            for (name, values) in m.headers.iter() {
                if let Some(v) = values.last() {
                    headers.insert(name.to_string(), v.as_str().to_owned());
                }
            }
            let msg_id = headers.get("Nats-Msg-Id");
            if msg_id.is_none() || msg_id != headers.get("id") {
                out.id_mismatch += 1;
            }
            out.records.push(Consumed {
                topic: self.destination.clone(),
                partition: 0,
                offset: i64::try_from(m.sequence)?,
                key: headers.get("Outbox-Key").cloned(),
                value: Some(String::from_utf8_lossy(&m.payload).into_owned()),
                headers,
                timestamp_ms: None,
            });
        }
        Ok(out)
    }

    async fn read_redis(&self) -> Result<Readback> {
        type Fields = Vec<(Vec<u8>, Vec<u8>)>;
        let mut conn = redis_connect(&self.direct_url().await?).await?;
        let mut out = Readback::default();
        let mut start = "-".to_owned();
        loop {
            let page: Vec<(String, Fields)> = redis::cmd("XRANGE")
                .arg(&self.destination)
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
                let mut r = Consumed {
                    topic: self.destination.clone(),
                    partition: 0,
                    offset: i64::try_from(out.records.len())?,
                    key: None,
                    value: None,
                    headers: BTreeMap::new(),
                    timestamp_ms: None,
                };
                for (name, value) in fields {
                    let name = String::from_utf8_lossy(&name).into_owned();
                    let value = String::from_utf8_lossy(&value).into_owned();
                    match name.as_str() {
                        "key" => r.key = Some(value),
                        "value" => r.value = Some(value),
                        "ts" => r.timestamp_ms = value.parse().ok(),
                        other => {
                            if let Some(h) = other.strip_prefix("h:") {
                                r.headers.insert(h.to_owned(), value);
                            }
                        }
                    }
                }
                out.records.push(r);
            }
        }
        Ok(out)
    }

    async fn read_rabbitmq(&self) -> Result<Readback> {
        use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable};
        let conn = amqp_connect(&self.direct_url().await?).await?;
        let ch = conn.create_channel().await?;
        let queue = ch
            .queue_declare(
                self.destination.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let expected = queue.message_count() as usize;
        ch.basic_qos(0, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                self.destination.as_str().into(),
                "outbox-chaos-reader".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut out = Readback::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.records.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(delivery)) = tokio::time::timeout(left, consumer.next()).await else {
                break;
            };
            let delivery = delivery?;
            let text = |v: &AMQPValue| match v {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                _ => None,
            };
            let headers: BTreeMap<String, String> = delivery
                .properties
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .filter_map(|(k, v)| text(v).map(|v| (k.as_str().to_owned(), v)))
                        .collect()
                })
                .unwrap_or_default();
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned());
            if message_id.is_none() || message_id.as_ref() != headers.get("id") {
                out.id_mismatch += 1;
            }
            out.records.push(Consumed {
                topic: self.destination.clone(),
                partition: 0,
                offset: i64::try_from(out.records.len())?,
                key: headers.get("aggregateId").cloned(),
                value: Some(String::from_utf8_lossy(&delivery.data).into_owned()),
                headers,
                timestamp_ms: None,
            });
        }
        // Nothing acknowledged: closing the channel puts every message back.
        drop(consumer);
        let _ = ch.close(200, "read".into()).await;
        let _ = conn.close(200, "read".into()).await;
        Ok(out)
    }

    /// Removes what the run left on a broker that outlives it (the RabbitMQ queue); the per-run
    /// servers go with their directories.
    pub async fn cleanup(self) {
        if self.sink == Sink::Rabbitmq
            && let Ok(url) = self.direct_url().await
            && let Ok(conn) = amqp_connect(&url).await
        {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(
                        self.destination.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = conn.close(200, "cleanup".into()).await;
        }
    }
}

/// The Redis half of [`DEDUPE_OFF`]: deletes the keys matching `pattern` every 10 ms, through
/// server restarts, until aborted.
async fn forget_dedupe_keys(url: String, pattern: String) {
    let script = redis::Script::new(
        "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
         redis.call('DEL', k) n = n + 1 end return n",
    );
    loop {
        if let Ok(mut conn) = redis_connect(&url).await {
            while script
                .arg(&pattern)
                .invoke_async::<i64>(&mut conn)
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn nats_stream_name(destination: &str) -> String {
    destination
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn nats_context(url: &str) -> Result<async_nats::jetstream::Context> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    Ok(async_nats::jetstream::new(client))
}

async fn amqp_connect(url: &str) -> Result<lapin::Connection> {
    lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .context("connecting to the private RabbitMQ node")
}

async fn redis_connect(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connecting to Redis at {url}"))
}

/// Inserts an event whose payload is `bytes` long on its own aggregate, followed by a healthy
/// event of the same aggregate (held behind it): both expected in the parked table. Returns the
/// poison event's id.
pub async fn broker_poison(
    db: &RunDb,
    aggregate_type: &str,
    bytes: usize,
    book: &SharedBook,
) -> Result<Uuid> {
    let poison = Uuid::new_v4();
    let behind = Uuid::new_v4();
    let aggregate = "poison-broker-limit";
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, aggregate_seq)
         VALUES ($1, $2, $3, 'Poison', jsonb_build_object('blob', repeat('b', $4)), 1)",
    )
    .bind(poison)
    .bind(aggregate_type)
    .bind(aggregate)
    .bind(i32::try_from(bytes)?)
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, aggregate_seq)
         VALUES ($1, $2, $3, 'Healthy', '{}', 2)",
    )
    .bind(behind)
    .bind(aggregate_type)
    .bind(aggregate)
    .execute(&db.pool)
    .await?;
    let mut b = book.lock().unwrap();
    b.expected_parked.insert(poison);
    b.expected_parked.insert(behind);
    Ok(poison)
}
