//! The account-service demo wired up for tests: three databases (write model, query model, legacy
//! list), a run-specific account topic, the account service in-process, the relay as a sidecar
//! process configured by `OUTBOX_*` variables, and projectors started on demand; and the
//! `account-demo` driver itself, run as a process on any sink ([`run_account_demo`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use account_service::projector::{Projector, ProjectorConfig};
use account_service::scenario::{self, Convergence};
use account_service::source::{EventSource, Sink};
use account_service::store::{self, Accounts};
use anyhow::{Context, Result, bail};

use crate::{RelayProcess, TestDb, create_topic, services, sinks, unique};

/// Everything the demo runs, for one test.
pub struct DemoEnv {
    /// The account service's database (accounts + outbox).
    pub write: TestDb,
    /// The query model's database.
    pub query: TestDb,
    /// The legacy application's database.
    pub legacy: TestDb,
    /// The account topic of this test.
    pub topic: String,
    /// The account service's base URL.
    pub service_url: String,
    /// The relay sidecar.
    pub relay: RelayProcess,
    service: tokio::task::JoinHandle<()>,
}

impl DemoEnv {
    /// Creates the databases and the topic (3 partitions), starts the service and the relay.
    pub async fn start(prefix: &str) -> Result<Self> {
        let write = TestDb::create(&format!("{prefix}_w")).await?;
        let query = TestDb::create(&format!("{prefix}_q")).await?;
        let legacy = TestDb::create(&format!("{prefix}_l")).await?;
        let topic = unique("outbox.event.account");
        create_topic(&topic, 3).await?;
        store::migrate(&mut *write.pool.acquire().await?).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let service_url = format!("http://{}", listener.local_addr()?);
        let app = account_service::http::router(Accounts::new(write.pool.clone()));
        let service = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let relay = RelayProcess::start(&write, &[], &[("OUTBOX_TOPIC", topic.as_str())]).await?;
        Ok(Self {
            write,
            query,
            legacy,
            topic,
            service_url,
            relay,
            service,
        })
    }

    /// Projector settings for this environment; `groups` distinguishes consumer groups (a new
    /// suffix = offsets reset to the beginning).
    pub fn projector_config(&self, groups: &str) -> ProjectorConfig {
        let mut c = ProjectorConfig::new(
            EventSource::Kafka {
                bootstrap_servers: services().bootstrap,
            },
            self.topic.clone(),
            self.query.url.clone(),
            self.legacy.url.clone(),
        );
        c.query_group = format!("account-query-{groups}");
        c.legacy_group = format!("legacy-app-{groups}");
        c
    }

    /// Starts a projector.
    pub async fn projector(&self, groups: &str) -> Result<Projector> {
        Projector::start(self.projector_config(groups)).await
    }

    /// Compares the read models with the write model now.
    pub async fn compare(&self) -> Result<Convergence> {
        scenario::compare(&self.write.pool, &self.query.pool, &self.legacy.pool).await
    }

    /// Waits until the read models equal the write model.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<Convergence> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.compare().await?;
            if c.converged() {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!(
                    "read models did not converge in {timeout:?}: {:#?}\nrelay log:\n{}",
                    &c.differences[..c.differences.len().min(10)],
                    self.relay.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Outbox rows written so far.
    pub async fn outbox_rows(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.write.pool)
            .await?)
    }

    /// Stops the service and the relay.
    pub async fn stop(self) -> Result<()> {
        self.service.abort();
        let (code, log) = self.relay.terminate(Duration::from_secs(20)).await?;
        if code != 0 {
            bail!("relay exited with {code}:\n{log}");
        }
        Ok(())
    }
}

/// How an `account-demo` run ended.
#[derive(Debug)]
pub struct DemoRun {
    /// Its exit code (0: the read models matched the write model).
    pub code: i32,
    /// What it printed (stdout, then stderr).
    pub output: String,
}

/// The directory with the workspace binaries next to the test executable (`target/<profile>`),
/// where `cargo build --bins` (or `scripts/test.sh`) puts `account-demo`, `account-service`,
/// `account-projector` and `outbox-relay`. Fails when `account-demo` is missing or older than
/// the example's sources, rather than test a stale demo.
pub fn demo_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("target/<profile> directory")?
        .to_path_buf();
    let demo = dir.join("account-demo");
    let built = std::fs::metadata(&demo)
        .and_then(|m| m.modified())
        .with_context(|| {
            format!(
                "{} is missing: build the binaries first (`cargo build --bins`)",
                demo.display()
            )
        })?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let mut dirs = vec![root.join("examples/account-service/src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                newest = newest.max(m);
            }
        }
    }
    if built < newest {
        bail!(
            "{} is older than examples/account-service/src: rebuild it (`cargo build --bins`)",
            demo.display()
        );
    }
    Ok(dir)
}

/// Runs `account-demo --sink <sink>` with `args` against the test services (PostgreSQL and the
/// sink's broker, from the same variables as the other tests), waiting at most `timeout`.
pub async fn run_account_demo(sink: Sink, args: &[&str], timeout: Duration) -> Result<DemoRun> {
    let dir = demo_bin_dir()?;
    let s = services();
    let mut cmd = tokio::process::Command::new(dir.join("account-demo"));
    cmd.arg("--sink")
        .arg(sink.name())
        .arg("--bin-dir")
        .arg(&dir)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &s.admin_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &s.bootstrap)
        .env("NATS_URL", sinks::nats::url())
        .env("AMQP_URL", sinks::rabbitmq::url())
        .env("REDIS_URL", sinks::redis::url())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| format!("account-demo --sink {sink} did not finish in {timeout:?}"))?
        .context("running account-demo")?;
    Ok(DemoRun {
        code: out.status.code().unwrap_or(-1),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}
