//! The relay under test: building it with the test features, and running it as a separate
//! process that the harness can SIGTERM, SIGKILL, SIGSTOP and SIGCONT.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use outbox_tests::relay_process::{CapturedLog, RelayBuild, RelayChild, relay_command};

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
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = RelayBuild {
        repo: Some(repo.to_owned()),
        release: true,
        locked: true,
        features: Some(features.to_owned()),
        target_dir: Some(target.to_owned()),
        ..RelayBuild::default()
    };
    eprintln!("chaos: building the relay: {:?}", build.command(&cargo));
    let started = Instant::now();
    build.run(&cargo)?;
    eprintln!(
        "chaos: relay build ({features}) done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(build.binary_in(target))
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
    child: RelayChild,
    log: CapturedLog,
    /// A name for messages (`a`, `b`).
    pub name: String,
}

impl RelayProc {
    /// Starts `bin run` with exactly `env` (plus `PATH`).
    pub fn start(bin: &Path, name: &str, env: &[(String, String)]) -> Result<Self> {
        let mut cmd = relay_command(bin, &["run"]);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let (child, log) = RelayChild::spawn_logged(cmd)?;
        Ok(Self {
            child,
            log,
            name: name.to_owned(),
        })
    }

    /// The collected stderr.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Whether the log contains `needle` yet.
    pub fn logged(&self, needle: &str) -> bool {
        self.log.contains(needle)
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
        self.child.exit_code()
    }

    /// Sends a signal through `kill(1)`.
    pub async fn signal(&self, signal: &str) -> Result<()> {
        self.child.signal(signal).await
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        if self.exit_code().is_none() {
            let _ = self.child.kill9().await;
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
        match self.wait_exit(timeout).await {
            Some(code) => Some(code),
            None => {
                self.kill9().await;
                None
            }
        }
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        match self.child.wait_timeout(timeout).await {
            Ok(Some(status)) => Some(status.code().unwrap_or(-1)),
            _ => None,
        }
    }
}
