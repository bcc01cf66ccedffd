//! The relay under test: building it with the test features, and running it as a separate
//! process that the harness can SIGTERM, SIGKILL, SIGSTOP and SIGCONT.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// The two relay builds the harness uses.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `--features failpoints`: the real relay, with crash points that are inert unless
    /// `OUTBOX_FAILPOINT` is set.
    pub relay: PathBuf,
    /// `--features failpoints,mutants` in its own target directory, or `None` when mutants are
    /// not run.
    pub mutant: Option<PathBuf>,
}

fn target_dir(repo: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"))
}

fn cargo_build(repo: &Path, features: &str, target: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let args = [
        "build",
        "--release",
        "--locked",
        "-p",
        "outbox-relay",
        "--bin",
        "outbox-relay",
        "--features",
        features,
        "--target-dir",
    ];
    eprintln!(
        "chaos: building the relay: {cargo} {} {}",
        args.join(" "),
        target.display()
    );
    let started = Instant::now();
    let status = std::process::Command::new(&cargo)
        .current_dir(repo)
        .args(args)
        .arg(target)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building outbox-relay with features `{features}` failed");
    }
    eprintln!(
        "chaos: relay build ({features}) done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(target.join("release").join("outbox-relay"))
}

impl Binaries {
    /// Builds (or finds up to date) the relay with `failpoints`, and with `failpoints,mutants` in
    /// `<target>/chaos-mutants` when `mutants` is set. `OUTBOX_CHAOS_RELAY_BIN` and
    /// `OUTBOX_CHAOS_MUTANT_BIN` name prebuilt binaries instead.
    pub fn ensure(repo: &Path, mutants: bool) -> Result<Self> {
        let target = target_dir(repo);
        let relay = match std::env::var_os("OUTBOX_CHAOS_RELAY_BIN") {
            Some(p) => PathBuf::from(p),
            None => cargo_build(repo, "failpoints", &target)?,
        };
        let mutant = if mutants {
            Some(match std::env::var_os("OUTBOX_CHAOS_MUTANT_BIN") {
                Some(p) => PathBuf::from(p),
                None => cargo_build(repo, "failpoints,mutants", &target.join("chaos-mutants"))?,
            })
        } else {
            None
        };
        Ok(Self { relay, mutant })
    }
}

/// A relay process.
pub struct RelayProc {
    child: Child,
    pid: u32,
    log: Arc<Mutex<String>>,
    /// A name for messages (`a`, `b`).
    pub name: String,
    exited: Option<i32>,
}

impl RelayProc {
    /// Starts `bin run` with exactly `env` (plus `PATH`).
    pub fn start(bin: &Path, name: &str, env: &[(String, String)]) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let pid = child.id().context("relay pid")?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().context("piped stderr")?;
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Ok(Self {
            child,
            pid,
            log,
            name: name.to_owned(),
            exited: None,
        })
    }

    /// The collected stderr.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the log contains `needle` yet.
    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().contains(needle)
    }

    /// Waits until the log contains `needle` (or the process exits, or `timeout`).
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logged(needle) {
                return true;
            }
            if self.exit_code().is_some() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// The exit code if it has exited (-1 when killed by a signal).
    pub fn exit_code(&mut self) -> Option<i32> {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited = Some(status.code().unwrap_or(-1));
        }
        self.exited
    }

    /// Sends a signal through `kill(1)`.
    pub async fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.pid);
        }
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        if self.exit_code().is_none() {
            let _ = self.signal("KILL").await;
            let _ = self.child.wait().await;
        }
        self.exit_code();
    }

    /// SIGTERM and wait for the exit code (SIGKILL after `timeout`; `None` then).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        if let Some(code) = self.exit_code() {
            return Some(code);
        }
        let _ = self.signal("CONT").await;
        let _ = self.signal("TERM").await;
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status.code().unwrap_or(-1));
                self.exited
            }
            _ => {
                self.kill9().await;
                None
            }
        }
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        if let Some(code) = self.exit_code() {
            return Some(code);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exited = Some(status.code().unwrap_or(-1));
                self.exited
            }
            _ => None,
        }
    }
}
