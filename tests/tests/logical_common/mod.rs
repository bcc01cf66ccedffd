//! Helpers shared by the `logical_*` end-to-end tests (included with `mod logical_common;`).
#![allow(dead_code, unused_imports)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox_core::WriteMode;
use outbox_relay::config::SourceKind;
pub use outbox_tests::writers::Workload;
use outbox_tests::*;
use sqlx::PgPool;

pub const QUIET: Duration = Duration::from_millis(1500);
pub const LONG: Duration = Duration::from_secs(90);

/// A relay configuration for the logical source on `db` with short intervals for tests.
pub fn logical_config(db: &TestDb, mode: WriteMode, slot: &str) -> RelayConfig {
    let mut c = relay_config(db);
    c.source = SourceKind::Logical;
    c.write_mode = mode;
    c.logical.slot = slot.to_owned();
    c.logical.publication = format!("{slot}_pub");
    c.logical.heartbeat_interval = Duration::from_millis(500);
    c.logical.status_interval = Duration::from_millis(200);
    c
}

/// Environment for an `outbox-relay` process running the logical source.
pub fn logical_env(mode: WriteMode, slot: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_SOURCE", "logical".to_owned()),
        ("OUTBOX_WRITE_MODE", mode.as_str().to_owned()),
        ("OUTBOX_SLOT", slot.to_owned()),
        ("OUTBOX_PUBLICATION", format!("{slot}_pub")),
        ("OUTBOX_HEARTBEAT_INTERVAL", "500ms".to_owned()),
    ]
}

/// `env` as the borrowed pairs [`RelayProcess::start`] takes.
pub fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The slot's `confirmed_flush_lsn` as a number (None: no such slot).
pub async fn confirmed_flush(pool: &PgPool, slot: &str) -> Result<Option<u64>> {
    let v: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    Ok(v.flatten().map(|x| x as u64))
}

/// The server's current WAL position as a number.
pub async fn current_wal(pool: &PgPool) -> Result<u64> {
    let v: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
        .fetch_one(pool)
        .await?;
    Ok(v as u64)
}

/// Waits until the slot exists and has confirmed at least `lsn`.
pub async fn wait_confirmed(pool: &PgPool, slot: &str, lsn: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = confirmed_flush(pool, slot).await?;
        if c.is_some_and(|c| c >= lsn) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("slot {slot} never confirmed {lsn:#x} (at {c:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a relay process on `db` with `env` and returns it once its slot `slot` is active and
/// its replication stream has started.
pub async fn start_streaming(
    db: &TestDb,
    slot: &str,
    env: &[(&str, &str)],
) -> Result<RelayProcess> {
    let relay = RelayProcess::start(db, &[], env).await?;
    wait_slot_active(&db.pool, slot, LONG).await?;
    relay
        .wait_for_log("replication stream started", LONG)
        .await?;
    Ok(relay)
}

/// Waits until the slot exists, has found its consistent point and a session streams from it.
///
/// A slot is `active` while it is still being created, before its consistent point is known;
/// transactions that commit before that point are never decoded. In `insert_delete` and
/// `logical_message` modes nothing recovers them, so writers must not start before
/// `confirmed_flush_lsn` is set.
pub async fn wait_slot_active(pool: &PgPool, slot: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let active: Option<bool> = sqlx::query_scalar(
            "SELECT active AND confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots
             WHERE slot_name = $1",
        )
        .bind(slot)
        .fetch_optional(pool)
        .await?;
        if active == Some(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("slot {slot} never became active");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drops every slot of this test (and its marker) so the server is left clean.
pub async fn drop_slots(pool: &PgPool, slot: &str) -> Result<()> {
    for _ in 0..100 {
        let r = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name IN ($1, $1 || '_bf') AND NOT active",
        )
        .bind(slot)
        .execute(pool)
        .await;
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ($1, $1 || '_bf')",
        )
        .bind(slot)
        .fetch_one(pool)
        .await?;
        if r.is_ok() && left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("could not drop slot {slot}")
}

/// Terminates the walsender streaming from `slot` and drops the slot (retrying until the drop
/// wins the race against the relay's reconnect).
pub async fn kill_and_drop_slot(pool: &PgPool, slot: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
        )
        .bind(slot)
        .execute(pool)
        .await?;
        match sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot)
            .execute(pool)
            .await
        {
            Ok(_) => return Ok(()),
            // Gone already: killing the session that was (re)creating it dropped it.
            Err(e) if e.to_string().contains("does not exist") => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("drop raced with the relay: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e).context("dropping the slot"),
        }
    }
}

/// Prints, for each aggregate with a first sighting below its high mark, its records in offset
/// order (diagnostics for a failed order check).
pub fn explain_inversions(records: &[Consumed]) {
    use std::collections::{HashMap, HashSet};
    let mut sorted: Vec<&Consumed> = records.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    let mut by_key: HashMap<String, Vec<&Consumed>> = HashMap::new();
    for r in sorted {
        by_key
            .entry(r.key.clone().unwrap_or_default())
            .or_default()
            .push(r);
    }
    for (key, rs) in by_key {
        let mut seen = HashSet::new();
        let mut high = i64::MIN;
        let mut bad = false;
        for r in &rs {
            let seq = r
                .header("outbox-aggregate-seq")
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(-1);
            let first = seen.insert(r.event_id());
            if seq < high && first {
                bad = true;
            }
            high = high.max(seq);
        }
        if bad {
            let line: Vec<String> = rs
                .iter()
                .map(|r| {
                    format!(
                        "{}@{}",
                        r.header("outbox-aggregate-seq").unwrap_or("?"),
                        r.offset
                    )
                })
                .collect();
            println!("inversion in {key}: {}", line.join(" "));
        }
    }
}

/// A throwaway PostgreSQL cluster (for settings the shared one must not have, or for a server
/// with no other activity). Stopped and deleted on drop.
pub struct TempCluster {
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

fn as_postgres(bin: &std::path::Path, args: &[&str]) -> Result<std::process::Output> {
    let root = std::process::Command::new("id").arg("-u").output()?.stdout == b"0\n";
    let out = if root {
        std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin)
            .args(args)
            .output()?
    } else {
        std::process::Command::new(bin).args(args).output()?
    };
    Ok(out)
}

impl TempCluster {
    /// initdb + start with `wal_level` (and `extra` lines appended to postgresql.conf).
    pub fn start(wal_level: &str, extra: &str) -> Result<Self> {
        let bin = std::path::PathBuf::from(
            std::env::var("SERVICES_PG_BIN")
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        let (dir, port) = cluster_dir("outbox-logical-pg")?;
        let data = dir.join("data");
        let out = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().context("path")?,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = {wal_level}\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             fsync = off\nsynchronous_commit = on\n{extra}\n",
            dir.display()
        );
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?
            .write_all(conf.as_bytes())?;
        let log = dir.join("server.log");
        let out = as_postgres(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().context("path")?,
                "-l",
                log.to_str().context("path")?,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {} {}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(Self { dir, bin, port })
    }

    /// URL of database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A physical streaming standby of this cluster (`pg_basebackup -R`, asynchronous), started
    /// on a port of its own. It carries every database and table of the primary, but no
    /// replication slot (PostgreSQL 15 has no failover slots).
    pub fn standby(&self) -> Result<TempCluster> {
        let (dir, port) = cluster_dir("outbox-logical-standby")?;
        let data = dir.join("data");
        let out = as_postgres(
            &self.bin.join("pg_basebackup"),
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                data.to_str().context("path")?,
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
        )?;
        if !out.status.success() {
            bail!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n",
            dir.display()
        );
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?
            .write_all(conf.as_bytes())?;
        let standby = TempCluster {
            dir,
            bin: self.bin.clone(),
            port,
        };
        standby.pg_ctl(&["-t", "60", "start"])?;
        Ok(standby)
    }

    /// `pg_ctl -D <data> -w <args…>` (with the server log in the cluster's directory).
    pub fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let mut all = vec![
            "-D",
            data.to_str().context("path")?,
            "-l",
            log.to_str().context("path")?,
            "-w",
        ];
        all.extend_from_slice(args);
        let out = as_postgres(&self.bin.join("pg_ctl"), &all)?;
        if !out.status.success() {
            bail!(
                "pg_ctl {args:?} failed: {} {}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// A [`TestDb`] handle on the cluster's database `name`.
    pub async fn db(&self, name: &str) -> Result<TestDb> {
        let url = self.url(name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        Ok(TestDb {
            url,
            name: name.into(),
            pool,
        })
    }

    /// A [`TestDb`] handle on the cluster's `postgres` database.
    pub async fn test_db(&self) -> Result<TestDb> {
        let url = self.url("postgres");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        Ok(TestDb {
            url,
            name: "postgres".into(),
            pool,
        })
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh directory for a private cluster (owned by `postgres`, for `initdb` run as that user
/// when the tests run as root) and a free port for it.
fn cluster_dir(prefix: &str) -> Result<(std::path::PathBuf, u16)> {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir)?;
    let _ = std::process::Command::new("chown")
        .arg("postgres")
        .arg(&dir)
        .status();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok((dir, port))
}

/// Whether the replication slot `slot` exists on `db`'s server.
pub async fn slot_exists(db: &TestDb, slot: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(slot)
    .fetch_one(&db.pool)
    .await?)
}

/// A logical source configuration for `db`'s default outbox table in `mode`, on the slot `slot`.
pub fn source_config(
    db: &TestDb,
    mode: WriteMode,
    slot: &str,
) -> Result<outbox_relay::source::logical::LogicalConfig> {
    let mut cfg = outbox_relay::source::logical::LogicalConfig::new(
        db.url.clone(),
        outbox_core::OutboxTable::default(),
        mode,
    );
    cfg.slot = outbox_relay::source::logical::SlotName::parse(slot)?;
    Ok(cfg)
}

/// Writers of `work` that keep committing (and sometimes rolling back) until `stop` is set.
pub fn background_writers(
    work: &Workload,
    mode: WriteMode,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<()>> {
    let work = work.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            work.write(mode, 3, 5).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
}
