//! The relay under test, as a separate `outbox-relay` process: start, admin endpoint, metrics,
//! CPU time and peak RSS from `/proc`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox_tests::relay_process::{RelayBuild, RelayChild, relay_command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The `outbox-relay` binary of the same profile as this benchmark: `$RELAY_BIN` when set,
/// otherwise `<target>/<profile>/outbox-relay` next to this executable, built with cargo into
/// that same target directory when it is missing or older than this executable (which is
/// relinked whenever the relay library changes).
pub fn binary(repo: &Path) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("RELAY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("locating the benchmark executable")?;
    let dir = exe
        .parent()
        .context("the benchmark executable has no directory")?
        .to_owned();
    let target_dir = dir.parent().context("no target directory")?.to_owned();
    let release = dir.file_name().and_then(|n| n.to_str()) == Some("release");
    let bin = dir.join("outbox-relay");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(b), Some(e)) = (modified(&bin), modified(&exe))
        && b >= e
    {
        return Ok(bin);
    }
    let build = RelayBuild {
        repo: Some(repo.to_owned()),
        release,
        quiet: true,
        target_dir: Some(target_dir.clone()),
        ..RelayBuild::default()
    };
    eprintln!(
        "bench: building outbox-relay ({} profile) in {}",
        if release { "release" } else { "dev" },
        target_dir.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    match build.run(&cargo) {
        Ok(()) => {}
        Err(e) if bin.exists() => {
            eprintln!(
                "bench: warning: cargo build of outbox-relay failed ({e:#}); using the existing binary"
            );
        }
        Err(e) => return Err(e),
    }
    Ok(bin)
}

/// What the relay's log told us.
#[derive(Debug, Default)]
struct LogState {
    admin: Option<String>,
    started: Option<Instant>,
    tail: VecDeque<String>,
}

impl LogState {
    /// Takes in one JSON log line read at `now`: the admin address, the start time, the tail.
    fn observe(&mut self, line: String, now: Instant) {
        let parsed: Option<serde_json::Value> = serde_json::from_str(&line).ok();
        let fields = parsed.as_ref().and_then(|v| v.get("fields"));
        let message = fields
            .and_then(|f| f.get("message"))
            .and_then(|m| m.as_str())
            .unwrap_or_default();
        if message == "admin endpoint listening" {
            self.admin = fields
                .and_then(|f| f.get("addr"))
                .and_then(|a| a.as_str())
                .map(str::to_owned);
        } else if message == "relay started" {
            self.started = Some(now);
        }
        if self.tail.len() >= 200 {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

/// A running relay process.
pub struct RelayProcess {
    child: RelayChild,
    state: Arc<Mutex<LogState>>,
    /// The admin endpoint's address.
    pub admin: String,
    /// When the relay logged `relay started` (pre-flight done, about to open the source).
    pub started: Instant,
}

impl RelayProcess {
    /// Starts `outbox-relay --log-format json run` with these `OUTBOX_*` variables, and waits
    /// for its admin endpoint and its `relay started` line.
    pub async fn start(bin: &Path, env: &[(String, String)]) -> Result<Self> {
        let mut cmd = relay_command(bin, &["--log-format", "json", "run"]);
        cmd.env("RUST_LOG", "info,sqlx=warn,rdkafka=warn")
            .env("OUTBOX_ADMIN_ADDR", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k, v)));
        let state = Arc::new(Mutex::new(LogState::default()));
        let sink = state.clone();
        let mut child = RelayChild::spawn(cmd, move |line| {
            let read_at = Instant::now();
            sink.lock().expect("log state").observe(line, read_at);
        })?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            {
                let s = state.lock().expect("log state");
                if let (Some(admin), Some(started)) = (&s.admin, s.started) {
                    let (admin, started) = (admin.clone(), started);
                    drop(s);
                    return Ok(Self {
                        child,
                        state,
                        admin,
                        started,
                    });
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the relay exited during start-up ({status}); log:\n{}",
                    tail(&state)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay did not start within 60 s; log:\n{}",
                    tail(&state)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        tail(&self.state)
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the relay exited ({status}); log:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Its `/metrics`, as series name (with labels) → value.
    pub async fn metrics(&self) -> Result<Metrics> {
        let body = http_get(&self.admin, "/metrics").await?;
        Ok(Metrics::parse(&body))
    }

    /// User + system CPU time so far.
    pub fn cpu(&self) -> Result<Duration> {
        cpu_time(self.child.pid())
    }

    /// Peak resident set size (`VmHWM`), bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .context("no VmHWM in /proc/<pid>/status")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// SIGTERM, then waits (SIGKILL after 30 s).
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.child.signal("TERM").await;
        match self.child.wait_timeout(Duration::from_secs(30)).await? {
            Some(status) => {
                if !status.success() {
                    eprintln!(
                        "bench: warning: the relay exited with {status}; log:\n{}",
                        self.log_tail()
                    );
                }
            }
            None => {
                eprintln!("bench: warning: the relay did not stop within 30 s; killing it");
                self.child.kill9().await?;
            }
        }
        Ok(())
    }
}

fn tail(state: &Arc<Mutex<LogState>>) -> String {
    let s = state.lock().expect("log state");
    let skip = s.tail.len().saturating_sub(30);
    s.tail
        .iter()
        .skip(skip)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when it cannot be asked).
pub fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// User + system CPU time of a process, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 overall: 11 and 12 counted from `state` (0-based).
    let ticks: u64 = fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
        .context("no utime/stime in /proc/<pid>/stat")?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// Parsed Prometheus text.
#[derive(Debug, Default, Clone)]
pub struct Metrics(HashMap<String, f64>);

impl Metrics {
    fn parse(body: &str) -> Self {
        Self(
            body.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (name, value) = l.rsplit_once(' ')?;
                    Some((name.to_owned(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// A series' value (0 when absent).
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// A histogram's cumulative buckets as (upper bound, count), `+Inf` last.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut out: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// Quantile `q` of the difference of two cumulative histograms (`after − before`), linearly
/// interpolated inside the bucket, in the histogram's unit; `None` without observations.
pub fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(b, c)| {
            let prev = before
                .iter()
                .find(|(bb, _)| bb == b)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            (*b, c - prev)
        })
        .collect();
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for (bound, count) in diff {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower_bound);
            }
            let width = count - lower_count;
            let frac = if width > 0.0 {
                (rank - lower_count) / width
            } else {
                0.0
            };
            return Some(lower_bound + (bound - lower_bound) * frac);
        }
        lower_bound = bound;
        lower_count = count;
    }
    None
}

/// A raw HTTP/1.1 GET on loopback; returns the body of a 200 answer.
pub async fn http_get(addr: &str, path: &str) -> Result<String> {
    get_with_headers(addr, path, "").await
}

/// GET `path` with `Authorization: Bearer <token>`; the body, or an error unless 200.
pub async fn http_get_authorized(addr: &str, path: &str, token: &str) -> Result<String> {
    get_with_headers(addr, path, &format!("Authorization: Bearer {token}\r\n")).await
}

async fn get_with_headers(addr: &str, path: &str, headers: &str) -> Result<String> {
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("admin endpoint did not answer within 10 s")??;
    let status = response.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        bail!("GET {path}: HTTP {status}");
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
