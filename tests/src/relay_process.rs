//! The relay as a separate `outbox-relay` process: building or locating the binary, starting it
//! with nothing but the environment it is given, capturing its log, and stopping it with
//! signals. [`RelayChild`] is the part the benchmark and the fault harness share with the tests;
//! [`RelayProcess`] is the tests' relay against the test services.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::database::TestDb;
use crate::services::services;

/// A `cargo build` of the `outbox-relay` binary.
#[derive(Debug, Clone, Default)]
pub struct RelayBuild {
    /// The directory cargo runs in (this process's when `None`).
    pub repo: Option<PathBuf>,
    /// Builds the release profile (`--release`) instead of the dev profile.
    pub release: bool,
    /// Refuses to update `Cargo.lock` (`--locked`).
    pub locked: bool,
    /// Prints nothing but errors (`--quiet`).
    pub quiet: bool,
    /// The relay's cargo features (`--features`), none when `None`.
    pub features: Option<String>,
    /// The target directory (`--target-dir`), cargo's default when `None`.
    pub target_dir: Option<PathBuf>,
}

impl RelayBuild {
    /// The `cargo build` command for these settings, run by the cargo binary `cargo`.
    pub fn command(&self, cargo: &OsStr) -> std::process::Command {
        let mut cmd = std::process::Command::new(cargo);
        if let Some(repo) = &self.repo {
            cmd.current_dir(repo);
        }
        cmd.arg("build");
        if self.quiet {
            cmd.arg("--quiet");
        }
        if self.release {
            cmd.arg("--release");
        }
        if self.locked {
            cmd.arg("--locked");
        }
        cmd.args(["-p", "outbox-relay", "--bin", "outbox-relay"]);
        if let Some(features) = &self.features {
            cmd.args(["--features", features]);
        }
        if let Some(target) = &self.target_dir {
            cmd.arg("--target-dir").arg(target);
        }
        cmd
    }

    /// Runs the build; fails unless cargo exits successfully.
    pub fn run(&self, cargo: &OsStr) -> Result<()> {
        let status = self
            .command(cargo)
            .status()
            .context("running cargo build for outbox-relay")?;
        if !status.success() {
            bail!(
                "building outbox-relay (features `{}`) failed: {status}",
                self.features.as_deref().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Where the binary lands in the target directory `target` for this build's profile.
    pub fn binary_in(&self, target: &Path) -> PathBuf {
        let profile = if self.release { "release" } else { "debug" };
        target.join(profile).join("outbox-relay")
    }
}

/// The `outbox-relay` binary: `$RELAY_BIN` when set (scripts/test.sh builds it first),
/// otherwise the one next to the test executable, (re)built once per test process so a test
/// never runs a stale relay.
pub fn relay_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("RELAY_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test>-<hash> → target/<profile>/outbox-relay
        let profile_dir = exe
            .parent()
            .and_then(|p| p.parent())
            .expect("target/<profile> directory");
        let bin = profile_dir.join("outbox-relay");
        if is_fresh(&bin) {
            return bin;
        }
        let build = RelayBuild {
            quiet: true,
            release: profile_dir.file_name().and_then(|n| n.to_str()) == Some("release"),
            ..RelayBuild::default()
        };
        if let Err(e) = build.run(OsStr::new(env!("CARGO"))) {
            panic!("{e:#}");
        }
        bin
    })
    .clone()
}

/// Whether `bin` exists and is newer than every source file it is built from (building it
/// with `-p outbox-relay` resolves features differently from the test build, so it is only
/// rebuilt when it is really stale).
fn is_fresh(bin: &Path) -> bool {
    fn newest(dir: &Path, acc: &mut std::time::SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                newest(&p, acc);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                *acc = (*acc).max(m);
            }
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return false;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut latest = std::time::SystemTime::UNIX_EPOCH;
    for dir in ["outbox-relay/src", "outbox-core/src", "outbox-macros/src"] {
        newest(&root.join(dir), &mut latest);
    }
    for file in [
        "Cargo.lock",
        "outbox-relay/Cargo.toml",
        "outbox-core/Cargo.toml",
    ] {
        if let Ok(m) = std::fs::metadata(root.join(file)).and_then(|m| m.modified()) {
            latest = latest.max(m);
        }
    }
    built >= latest
}

/// What a one-shot `outbox-relay` command printed, and how it exited.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The exit code (-1 when a signal ended it).
    pub code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Standard output followed by standard error.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `outbox-relay <args>` to completion with nothing in its environment but `env`.
pub async fn relay_cli(args: &[&str], env: &[(&str, &str)]) -> Result<CliOutput> {
    let out = Command::new(relay_binary())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .await
        .context("running outbox-relay")?;
    Ok(CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// [`relay_cli`] against `db` and the test broker (`OUTBOX_DATABASE_URL`,
/// `OUTBOX_KAFKA_BOOTSTRAP_SERVERS`, `RUST_LOG=info`), with `env` on top.
pub async fn relay_cli_on(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Result<CliOutput> {
    let bootstrap = services().bootstrap;
    let mut all = vec![
        ("OUTBOX_DATABASE_URL", db.url.as_str()),
        ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
        ("RUST_LOG", "info"),
    ];
    all.extend_from_slice(env);
    relay_cli(args, &all).await
}

/// The command that runs `bin` with `args` and an empty environment but `PATH` (the caller adds
/// the rest), stdin and stdout closed, stderr piped for the log, killed when its handle drops.
pub fn relay_command(bin: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A relay's stderr collected line by line, shared with the task that reads it.
#[derive(Debug, Clone, Default)]
pub struct CapturedLog(Arc<Mutex<String>>);

impl CapturedLog {
    /// Everything read so far, one line per relay log line.
    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a line read so far contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(needle)
    }

    fn push_line(&self, line: &str) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.push_str(line);
        log.push('\n');
    }
}

/// A started relay process whose stderr is read by a task of its own.
pub struct RelayChild {
    child: Child,
    pid: u32,
    exited: Option<ExitStatus>,
}

impl RelayChild {
    /// Starts `cmd` (from [`relay_command`]) and hands every line of its stderr, in order, to
    /// `on_line` as soon as it is read.
    pub fn spawn(
        mut cmd: Command,
        mut on_line: impl FnMut(String) + Send + 'static,
    ) -> Result<Self> {
        let program = cmd.as_std().get_program().to_owned();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", program.to_string_lossy()))?;
        let pid = child.id().context("relay exited at once")?;
        let stderr = child.stderr.take().context("relay stderr is not piped")?;
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                on_line(line);
            }
        });
        Ok(Self {
            child,
            pid,
            exited: None,
        })
    }

    /// [`RelayChild::spawn`], collecting the whole stderr.
    pub fn spawn_logged(cmd: Command) -> Result<(Self, CapturedLog)> {
        let log = CapturedLog::default();
        let sink = log.clone();
        let child = Self::spawn(cmd, move |line| sink.push_line(&line))?;
        Ok((child, log))
    }

    /// The process id it was started with.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process id while it has not been reaped, `None` after.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    /// Its exit code if it has exited (-1 when a signal ended it), without waiting.
    pub fn exit_code(&mut self) -> Option<i32> {
        self.try_wait()
            .ok()
            .flatten()
            .map(|s| s.code().unwrap_or(-1))
    }

    /// Sends `signal` (a name such as `TERM`) through `kill(1)`; fails once it has been reaped.
    pub async fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.id().context("relay already exited")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// Waits for it to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        let status = self.child.wait().await?;
        self.exited = Some(status);
        Ok(status)
    }

    /// Waits at most `timeout` for it to exit: `None` when it is still running.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(status) => status.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// SIGKILL, then waits until it is gone.
    pub async fn kill9(&mut self) -> Result<ExitStatus> {
        self.signal("KILL").await?;
        Ok(self.wait().await?)
    }
}

/// A relay running as a separate `outbox-relay` process against the test services.
pub struct RelayProcess {
    /// The process.
    pub child: RelayChild,
    log: CapturedLog,
}

impl RelayProcess {
    /// Starts `outbox-relay run` with these extra arguments and environment.
    pub async fn start(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let mut cmd = relay_command(&relay_binary(), &["run"]);
        cmd.args(args)
            .env("OUTBOX_DATABASE_URL", &db.url)
            .env("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", services().bootstrap)
            .env("OUTBOX_POLL_INTERVAL", "200ms")
            .env("OUTBOX_STANDBY_INTERVAL", "200ms")
            .env(
                "RUST_LOG",
                std::env::var("RELAY_LOG").unwrap_or_else(|_| "info".into()),
            );
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, log) = RelayChild::spawn_logged(cmd)?;
        Ok(Self { child, log })
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log.contains(needle) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("relay log never showed `{needle}`; log:\n{}", self.log())
    }

    /// Sends a signal (`libc`-free: through the `kill` command).
    pub async fn signal(&self, signal: &str) -> Result<()> {
        self.child.signal(signal).await
    }

    /// SIGTERM, then waits for the exit code.
    pub async fn terminate(mut self, timeout: Duration) -> Result<(i32, String)> {
        self.signal("TERM").await?;
        let status = self
            .child
            .wait_timeout(timeout)
            .await?
            .context("relay did not exit after SIGTERM")?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok((status.code().unwrap_or(-1), self.log()))
    }

    /// SIGKILL, then waits for it to be gone.
    pub async fn kill9(mut self) -> Result<String> {
        self.child.kill9().await?;
        Ok(self.log())
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(mut self, timeout: Duration) -> Result<(i32, String)> {
        let status = self
            .child
            .wait_timeout(timeout)
            .await?
            .with_context(|| format!("relay did not exit; log:\n{}", self.log()))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok((status.code().unwrap_or(-1), self.log()))
    }
}

/// The relay's log goes to the test's stderr when the handle is dropped: the test runner shows it
/// only for a test that failed, which is when it is needed (also after an early `?` return).
impl Drop for RelayProcess {
    fn drop(&mut self) {
        let pid = self
            .child
            .id()
            .map_or("exited".to_owned(), |p| p.to_string());
        eprintln!(
            "---- relay process ({pid}) log ----\n{}---- end of relay log ----",
            self.log()
        );
    }
}
