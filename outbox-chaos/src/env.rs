//! The services a chaos run uses: PostgreSQL and the Tansu broker, either given through
//! `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` or started by the harness itself with
//! `SERVICES_DIR=<repo>/.services/chaos scripts/services.sh up` (and stopped with the same
//! `SERVICES_DIR` at the end). Only a cluster the harness started itself may be stopped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outbox_tests::services::ServicesScript;

/// A PostgreSQL cluster the harness started itself (and may therefore stop and restart).
#[derive(Debug, Clone)]
pub struct OwnCluster {
    /// The `SERVICES_DIR` it was started with.
    pub services_dir: PathBuf,
    /// Its data directory (`SERVICES_PGDATA`).
    pub pgdata: PathBuf,
    /// The PostgreSQL binaries (`SERVICES_PG_BIN`).
    pub pg_bin: PathBuf,
}

/// Where the services are.
#[derive(Debug, Clone)]
pub struct Env {
    /// The repository root.
    pub repo: PathBuf,
    /// URL of the server's `postgres` database.
    pub admin_url: String,
    /// Tansu's bootstrap servers.
    pub tansu: String,
    /// Set when the harness started the services itself.
    pub own: Option<OwnCluster>,
}

impl Env {
    /// Uses the services named in the environment, or starts private ones.
    pub fn acquire(repo: &Path) -> Result<Self> {
        let db = std::env::var("DATABASE_URL").ok();
        let kafka = std::env::var("KAFKA_BOOTSTRAP_SERVERS").ok();
        if let (Some(admin_url), Some(tansu)) = (db, kafka) {
            eprintln!(
                "chaos: using the services from DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS \
                 (scenarios that stop PostgreSQL are skipped: the cluster is not ours)"
            );
            return Ok(Self {
                repo: repo.to_path_buf(),
                admin_url,
                tansu,
                own: None,
            });
        }
        let script = ServicesScript::new(repo, &repo.join(".services").join("chaos"));
        eprintln!(
            "chaos: starting private services: SERVICES_DIR={} scripts/services.sh up",
            script.dir().display()
        );
        let vars = script.up()?;
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .with_context(|| format!("{k} missing from {}/env", script.dir().display()))
        };
        Ok(Self {
            repo: repo.to_path_buf(),
            admin_url: get("DATABASE_URL")?,
            tansu: get("KAFKA_BOOTSTRAP_SERVERS")?,
            own: Some(OwnCluster {
                services_dir: script.dir().to_owned(),
                pgdata: PathBuf::from(get("SERVICES_PGDATA")?),
                pg_bin: PathBuf::from(get("SERVICES_PG_BIN")?),
            }),
        })
    }

    /// Stops the services if the harness started them (with the same `SERVICES_DIR`).
    pub fn release(&self) {
        if let Some(own) = &self.own {
            eprintln!(
                "chaos: stopping private services: SERVICES_DIR={} scripts/services.sh down",
                own.services_dir.display()
            );
            let _ = ServicesScript::new(&self.repo, &own.services_dir).down();
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl OwnCluster {
    /// Runs a PostgreSQL binary, as the `postgres` OS user when we are root.
    fn pg(&self, tool: &str, args: &[&str]) -> Result<()> {
        let bin = self.pg_bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let out = cmd
            .args(args)
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: no shutdown checkpoint, every session cut (crash recovery at
    /// the next start).
    pub fn stop_immediate(&self) -> Result<()> {
        let d = self.pgdata.to_string_lossy().into_owned();
        self.pg("pg_ctl", &["-D", &d, "-m", "immediate", "-w", "stop"])
    }

    /// Starts the cluster again and waits until it accepts connections.
    pub fn start(&self) -> Result<()> {
        let d = self.pgdata.to_string_lossy().into_owned();
        let log = self
            .pgdata
            .parent()
            .unwrap_or(&self.pgdata)
            .join("server.log")
            .to_string_lossy()
            .into_owned();
        self.pg("pg_ctl", &["-D", &d, "-l", &log, "-w", "-t", "60", "start"])
    }
}

/// Sleeps, for readability at call sites.
pub async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
