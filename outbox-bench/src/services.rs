//! PostgreSQL and the brokers: taken from the environment, or started privately with
//! `scripts/services.sh` in `<repo>/.services/bench` and stopped again at the end.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use outbox_tests::services::ServicesScript;

/// Where the services are, and whether this process owns them.
#[derive(Debug)]
pub struct Services {
    /// URL of the server's `postgres` database (used to create per-section databases).
    pub admin_url: String,
    /// Kafka bootstrap servers.
    pub bootstrap: String,
    /// Directory of the PostgreSQL client binaries (`pg_recvlogical`), when known.
    pub pg_bin: Option<PathBuf>,
    /// The other sinks' brokers (the `sinks` section).
    pub brokers: BrokerUrls,
    /// The repository root (for `scripts/services.sh`).
    repo: PathBuf,
    /// `SERVICES_DIR` of the services this process started, if it started them.
    owned: Option<PathBuf>,
}

impl Services {
    /// Uses `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` when both are set; otherwise starts
    /// private services with `SERVICES_DIR=<repo>/.services/bench`.
    pub fn acquire(repo: &Path) -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let (Some(admin_url), Some(bootstrap)) =
            (env("DATABASE_URL"), env("KAFKA_BOOTSTRAP_SERVERS"))
        {
            eprintln!("bench: using DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS from the environment");
            return Ok(Self {
                admin_url,
                bootstrap,
                pg_bin: env("SERVICES_PG_BIN")
                    .map(PathBuf::from)
                    .or_else(find_pg_bin),
                brokers: BrokerUrls::from_lookup(env),
                repo: repo.to_owned(),
                owned: None,
            });
        }
        let script = ServicesScript::new(repo, &repo.join(".services").join("bench"));
        eprintln!(
            "bench: starting private services (SERVICES_DIR={})",
            script.dir().display()
        );
        let mut services = Self {
            admin_url: String::new(),
            bootstrap: String::new(),
            pg_bin: None,
            brokers: BrokerUrls::default(),
            repo: repo.to_owned(),
            // Owned from here on: a failed start is still torn down.
            owned: Some(script.dir().to_owned()),
        };
        let vars = script.up()?;
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .with_context(|| format!("{k} missing from {}/env", script.dir().display()))
        };
        services.admin_url = get("DATABASE_URL")?;
        services.bootstrap = get("KAFKA_BOOTSTRAP_SERVERS")?;
        services.pg_bin = get("SERVICES_PG_BIN").ok().map(PathBuf::from);
        // The environment first (as for the tests), then what the script found or started.
        services.brokers = BrokerUrls::from_lookup(|k| {
            env(k).or_else(|| vars.get(k).filter(|v| !v.is_empty()).cloned())
        });
        Ok(services)
    }

    /// Whether this process started the services (and so stops them).
    pub fn owned(&self) -> bool {
        self.owned.is_some()
    }

    /// Stops the services this process started (only those: `SERVICES_DIR` is always ours).
    pub fn release(&mut self) {
        if let Some(dir) = self.owned.take() {
            eprintln!("bench: stopping private services");
            let status = ServicesScript::new(&self.repo, &dir).down();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!(
                    "bench: warning: `SERVICES_DIR={} scripts/services.sh down` failed: {status:?}",
                    dir.display()
                );
            }
        }
    }
}

/// Where the NATS, Redis and RabbitMQ servers of the `sinks` section are.
#[derive(Debug, Clone)]
pub struct BrokerUrls {
    /// `NATS_URL`, else `nats://127.0.0.1:4222`.
    pub nats: String,
    /// `REDIS_URL`, else `redis://127.0.0.1:6379`.
    pub redis: String,
    /// `AMQP_URL`, else `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp: String,
}

impl Default for BrokerUrls {
    fn default() -> Self {
        Self::from_lookup(|_| None)
    }
}

impl BrokerUrls {
    /// The URLs `lookup` gives for `NATS_URL`, `REDIS_URL` and `AMQP_URL`, the standard loopback
    /// ports for those it does not.
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            nats: lookup("NATS_URL").unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned()),
            redis: lookup("REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned()),
            amqp: lookup("AMQP_URL")
                .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.release();
    }
}

/// The newest `/usr/lib/postgresql/<v>/bin` holding `pg_recvlogical`.
fn find_pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_recvlogical").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, d)| d)
}
