//! Where PostgreSQL and the broker are: taken from the environment (`DATABASE_URL`,
//! `KAFKA_BOOTSTRAP_SERVERS`), started with testcontainers under the `docker` feature, or started
//! privately with `scripts/services.sh` for a harness process (the benchmark, the fault runs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

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

/// Services started privately with `SERVICES_DIR=<dir> scripts/services.sh up` and stopped with
/// the same `SERVICES_DIR`, so that a harness only ever stops a cluster it started itself.
#[derive(Debug, Clone)]
pub struct ServicesScript {
    repo: PathBuf,
    dir: PathBuf,
}

impl ServicesScript {
    /// The script of the repository at `repo`, with its state in `dir`.
    pub fn new(repo: &Path, dir: &Path) -> Self {
        Self {
            repo: repo.to_owned(),
            dir: dir.to_owned(),
        }
    }

    /// Its `SERVICES_DIR`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the services (ignoring any `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` of this
    /// process) and returns the variables the script exported in `<dir>/env`.
    pub fn up(&self) -> Result<HashMap<String, String>> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let status = self
            .command("up")
            .env_remove("DATABASE_URL")
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .status()
            .context("running scripts/services.sh up")?;
        if !status.success() {
            bail!("scripts/services.sh up failed ({status})");
        }
        read_env_file(&self.dir.join("env"))
    }

    /// Stops the services started with this `SERVICES_DIR`.
    pub fn down(&self) -> std::io::Result<ExitStatus> {
        self.command("down").status()
    }

    fn command(&self, verb: &str) -> Command {
        let mut cmd = Command::new(self.repo.join("scripts").join("services.sh"));
        cmd.arg(verb).env("SERVICES_DIR", &self.dir);
        cmd
    }
}

/// Reads the `[export ]NAME=value` lines of a file written by `scripts/services.sh` (quotes
/// around a value are removed).
pub fn read_env_file(path: &Path) -> Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            Some((
                k.trim().to_owned(),
                v.trim().trim_matches(['"', '\'']).to_owned(),
            ))
        })
        .collect())
}
